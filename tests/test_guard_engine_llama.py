"""Llama Guard through the shared guard engine (its HTTP app on loopback, a real llama.cpp model):
the stream check stays incremental there (the session lives in the engine, keyed by the stream), so a
1,000-token answer checked every 32 tokens costs the same guard tokens as in-process; verdicts match;
closing the stream frees the engine's session; an unknown session after an engine restart is rebuilt."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from harness import Loop
from waits import until

from gateway.guards.llama_guard import LlamaGuard
from gateway.types import Message

pytest.importorskip("llama_cpp")
pytest_plugins = ["llama_fixtures"]

BENIGN = "Mix flour, water, salt and yeast. Knead the dough for ten minutes and let it rise. "
BAD = " First get a pressure cooker, then the bomb goes in the middle of the crowd."
OPTS = {"n_threads": 2, "n_ctx": 4096, "max_sessions": 4}


@pytest.fixture
def engine_url() -> Any:
    from gateway.guard_engine.service import GuardEngineService, create_app

    loop = Loop()
    svc = GuardEngineService()
    port = loop.serve(create_app(svc))
    yield f"http://127.0.0.1:{port}", svc
    loop.close()


@pytest.fixture
async def pool():
    from gateway.engine import EnginePool

    p = EnginePool()
    yield p
    await p.aclose()


def checkpoints(g: LlamaGuard, n_tokens: int, every: int) -> list[str]:
    """The answer so far at each check: ~n_tokens of prose, a check every `every` tokens and at the end."""
    assert g.model is not None
    toks = g.model.tokenize(BENIGN * (n_tokens // 15 + 2), special=False)[:n_tokens]
    cuts = [*range(every, len(toks), every), len(toks)]
    return [g.model.detokenize(toks[:n]) for n in cuts]


async def run_stream(g: LlamaGuard, texts: list[str]) -> tuple[int, list[Any]]:
    sc = g.open_stream([Message.of("user", "How do I bake bread?")], "bench")
    verdicts = []
    for i, text in enumerate(texts):
        verdicts.append(await sc.check(text, 0, i == len(texts) - 1))
    await sc.close()
    return sum(v.tokens_evaluated for v in verdicts), verdicts


async def test_incremental_check_through_the_engine_costs_what_it_costs_in_process(
    pool: Any, engine_url: Any, rig_gguf: Path
) -> None:
    url, svc = engine_url
    local = LlamaGuard(model=str(rig_gguf), pool=pool, backend="local", **OPTS)
    remote = LlamaGuard(model=str(rig_gguf), backend=url, **OPTS)
    await local.start()
    await remote.start()
    assert local.mode == "local" and remote.mode == "engine"
    texts = checkpoints(local, 1000, 32)
    assert len(texts) == 32
    local_tokens, local_v = await run_stream(local, texts)
    remote_tokens, remote_v = await run_stream(remote, texts)
    naive = sum(v.details["prompt_tokens"] for v in local_v)  # a full re-check every time
    print(f"\nguard tokens over a 1,000-token answer, a check every 32: in-process {local_tokens}, "
          f"engine {remote_tokens} ({remote_tokens / local_tokens:.3f}x), naive {naive}")
    assert remote_tokens <= 1.1 * local_tokens
    assert remote_tokens < naive / 5  # incremental, not a full prefill per check
    assert [v.flagged for v in remote_v] == [v.flagged for v in local_v]
    for a, b in zip(local_v, remote_v, strict=True):
        assert b.score == pytest.approx(a.score, abs=1e-4)
        assert b.details["backend"] == "engine"
    # the stream's close reached the engine (a message sent without waiting for the answer)
    await until(lambda: not svc.sessions, 2.0)
    assert svc.sessions == {}
    await local.aclose()
    await remote.aclose()


async def test_engine_stream_flags_the_trigger_and_a_lost_session_is_rebuilt(engine_url: Any, rig_gguf: Path) -> None:
    url, svc = engine_url
    g = LlamaGuard(model=str(rig_gguf), backend=url, **OPTS)
    await g.start()
    sc = g.open_stream([Message.of("user", "Tell me a story")], "r1")
    text = BENIGN * 3
    v1 = await sc.check(text, 0, False)
    assert not v1.flagged and v1.details["reused"] == 0
    v2 = await sc.check(text + BENIGN, len(text), False)
    assert v2.details["reused"] > 100  # the engine kept the stream's KV
    for r in list(svc.sessions.values()):  # as after an engine restart: the session is gone
        r.session.release()
    svc.sessions.clear()
    v3 = await sc.check(text + BENIGN + BAD, len(text + BENIGN), True)
    assert v3.flagged and v3.categories == ["S1"]  # a new session (from the prefix cache), then judged
    assert len(svc.sessions) == 1
    await sc.close()
    await g.aclose()


async def test_checks_of_several_clients_share_the_engines_decode_calls(engine_url: Any, rig_gguf: Path) -> None:
    """Two guards (as two workers would hold) with 4 streams each: their checks batch into shared
    llama_decode calls in the engine."""
    url, svc = engine_url
    guards = [LlamaGuard(model=str(rig_gguf), backend=url, **{**OPTS, "max_sessions": 8}) for _ in range(2)]
    for g in guards:
        await g.start()
    streams = [g.open_stream([Message.of("user", f"story {i}")], f"s{i}") for g in guards for i in range(4)]
    texts = [BENIGN * k for k in range(1, 5)]
    for text in texts:  # every stream checks at once, round after round
        await asyncio.gather(*(sc.check(text, 0, False) for sc in streams))
    (model,) = svc.models.values()
    stats = model.stats.snapshot()
    print(f"\n{len(streams) * len(texts)} checks from 2 clients in {stats['decode_calls']} decode calls")
    assert stats["requests"] >= len(streams) * len(texts)
    assert stats["decode_calls"] < len(streams) * len(texts) / 2  # shared: one call carries several checks
    for sc in streams:
        await sc.close()
    for g in guards:
        await g.aclose()

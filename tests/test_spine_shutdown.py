"""`guardgate serve` as a user runs it: SIGTERM lets in-flight streams finish, up to the grace deadline."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading

import httpx
import pytest
from aiohttp import web
from harness import openai_text_stream, stream_frames
from waits import Hold, wait_ready, wait_until

pytestmark = pytest.mark.slow  # starts `guardgate serve`

PIECES = [f"p{i} " for i in range(30)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_gateway(upstream_url: str, *extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", "--upstream", upstream_url,
                             "--port", str(port), "--log-level", "WARNING", "--policy", "none", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, timeout=60)
    except AssertionError:
        proc.kill()
        raise AssertionError(f"gateway did not start: {proc.stdout.read().decode() if proc.stdout else ''}") from None
    return proc, url


@pytest.fixture
def held_upstream(make_stack):
    """Streams the first frames, then the rest only once the test releases `st.hold`."""
    hold = Hold()
    frames = openai_text_stream(PIECES)

    async def handler(request: web.Request, up) -> web.StreamResponse:
        resp = await stream_frames(request, frames[:5], eof=False)
        await hold.wait(timeout=30)
        return await stream_frames(request, frames[5:], response=resp)

    st = make_stack(handler=handler)
    st.hold = hold
    return st


def test_sigterm_finishes_inflight_stream(held_upstream) -> None:
    proc, url = start_gateway(held_upstream.upstream_url)
    got: dict[str, bytes] = {}
    under_way = threading.Event()

    def client() -> None:
        body = b""
        with httpx.Client(timeout=30) as c, c.stream("POST", url + "/v1/chat/completions",
                                                     json={"model": "m", "messages": [], "stream": True}) as r:
            for chunk in r.iter_bytes():
                body += chunk
                under_way.set()
        got["body"] = body

    def refused() -> bool:
        try:
            httpx.get(url + "/healthz", timeout=1)
        except httpx.ConnectError:
            return True
        except httpx.HTTPError:
            pass
        return False

    t = threading.Thread(target=client)
    t.start()
    try:
        assert under_way.wait(20)  # the stream is under way (its first bytes reached the client)
        proc.send_signal(signal.SIGTERM)
        # shutting down: the listener is closed (new connections are refused) while the stream is held
        assert wait_until(refused, timeout=20)
        assert t.is_alive() and "body" not in got
    finally:
        held_upstream.hold.release()  # now the upstream sends the rest
    t.join(20)
    assert proc.wait(20) == 0
    assert got["body"] == b"".join(openai_text_stream(PIECES))  # whole stream, [DONE] included


def test_config_error_names_file_and_line(tmp_path) -> None:
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text("upstreams:\n  main:\n    base_url: http://x/v1\n    dialect: klingon\n")
    r = subprocess.run([sys.executable, "-m", "gateway.cli", "serve", "--config", str(cfg)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert f"{cfg}:4:" in r.stderr and "dialect" in r.stderr

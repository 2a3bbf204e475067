"""`guardgate serve` as a user runs it: SIGTERM lets in-flight streams finish, up to the grace deadline."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
from aiohttp import web
from harness import openai_text_stream, stream_frames

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
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"gateway did not start: {proc.stdout.read().decode() if proc.stdout else ''}")


@pytest.fixture
def slow_upstream(make_stack):
    async def handler(request: web.Request, up) -> web.StreamResponse:
        return await stream_frames(request, openai_text_stream(PIECES), delay=0.05)  # ~1.6 s

    return make_stack(handler=handler)


def test_sigterm_finishes_inflight_stream(slow_upstream) -> None:
    proc, url = start_gateway(slow_upstream.upstream_url)
    got: dict[str, bytes] = {}

    def client() -> None:
        with httpx.Client(timeout=30) as c:
            r = c.post(url + "/v1/chat/completions", json={"model": "m", "messages": [], "stream": True})
            got["body"] = r.content

    t = threading.Thread(target=client)
    t.start()
    time.sleep(0.4)  # the stream is under way
    proc.send_signal(signal.SIGTERM)
    t.join(20)
    assert proc.wait(20) == 0
    assert got["body"] == b"".join(openai_text_stream(PIECES))  # whole stream, [DONE] included
    # and the listener is closed: new connections are refused
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/healthz", timeout=1)


def test_config_error_names_file_and_line(tmp_path) -> None:
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text("upstreams:\n  main:\n    base_url: http://x/v1\n    dialect: klingon\n")
    r = subprocess.run([sys.executable, "-m", "gateway.cli", "serve", "--config", str(cfg)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert f"{cfg}:4:" in r.stderr and "dialect" in r.stderr

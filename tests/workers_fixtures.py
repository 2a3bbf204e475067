"""`guardgate serve --workers N` as a real process tree, for the worker and deployment tests.

`Served` starts the supervisor with stdout/stderr in a log file, waits until every worker printed
its listening line and /readyz answers, and knows the worker pids (the supervisor's children in
/proc) and the guard engine's socket (from the supervisor's startup line).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from harness import Loop, ScriptedUpstream, openai_text_stream, stream_frames

ROOT = Path(__file__).resolve().parent.parent
STREAM_PIECES = 15  # a stream is 15 words, 0.1 s apart: ~1.5 s in flight


def poll(pred: Any, timeout: float = 20.0, interval: float = 0.05) -> Any:
    """Wait for `pred()` to be truthy (returns its value) or fail the test."""
    end = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > end:
            pytest.fail(f"condition not met within {timeout} s: {getattr(pred, '__name__', pred)}")
        time.sleep(interval)


@pytest.fixture
def upstream() -> Iterator[tuple[ScriptedUpstream, str]]:
    """An OpenAI upstream: chat answers echo the last user message; streams take ~1.5 s."""

    async def handler(request: web.Request, up: ScriptedUpstream) -> web.StreamResponse:
        body = await request.json()
        if body.get("stream"):
            pieces = body.get("x_pieces") or [f"w{i} " for i in range(STREAM_PIECES)]
            return await stream_frames(request, openai_text_stream(pieces), delay=float(body.get("x_delay", 0.1)))
        text = body["messages"][-1]["content"]
        return web.json_response({"id": "c1", "object": "chat.completion", "created": 1, "model": "gpt-test",
                                  "choices": [{"index": 0, "message": {"role": "assistant", "content": f"echo {text}"},
                                               "finish_reason": "stop"}],
                                  "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}})

    loop = Loop()
    up = ScriptedUpstream(handler=handler)
    port = loop.serve(up.app())
    yield up, f"http://127.0.0.1:{port}/v1"
    loop.close()


def children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def maps(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


class Served:
    """One `guardgate serve --workers N` process tree."""

    def __init__(self, tmp: Path, config: Path, workers: int = 2, env: dict[str, str] | None = None,
                 args: tuple[str, ...] = ()) -> None:
        self.log_path = tmp / f"serve-{time.monotonic_ns()}.log"
        self.workers = workers
        full_env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                    **(env or {})}
        full_env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config), "--workers", str(workers),
             *args], cwd=tmp, env=full_env, stdout=self._log, stderr=subprocess.STDOUT)
        self.url = ""
        self.engine_socket: str | None = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 90.0) -> Served:
        def started() -> bool:
            if self.proc.poll() is not None:
                pytest.fail(f"guardgate serve exited ({self.proc.returncode}):\n{self.log()[-3000:]}")
            return self.log().count("guardgate listening on") >= self.workers and "workers on http://" in self.log()

        poll(started, timeout)
        m = re.search(r"workers on (http://[^ ]+) ", self.log())
        assert m
        self.url = m.group(1)
        e = re.search(r"guard engine unix:(\S+) \(pid", self.log())
        self.engine_socket = e.group(1) if e else None
        poll(lambda: self.get("/readyz").status_code == 200, timeout)
        return self

    def get(self, path: str, **kw: Any) -> httpx.Response:
        try:
            return httpx.get(self.url + path, timeout=10, **kw)
        except httpx.HTTPError as e:
            return httpx.Response(599, text=str(e))

    def chat(self, text: str = "hi", client: httpx.Client | None = None, **body: Any) -> httpx.Response:
        payload = {"model": "gpt-test", "messages": [{"role": "user", "content": text}], **body}
        c = client or httpx
        return c.post(self.url + "/v1/chat/completions", json=payload, timeout=30,
                      headers={"Connection": "close"})

    def worker_pids(self) -> list[int]:
        engine = self.engine_pid()
        return [p for p in children(self.proc.pid) if p != engine]

    def engine_pid(self) -> int | None:
        m = re.search(r"guard engine unix:\S+ \(pid (\d+)\)", self.log())
        return int(m.group(1)) if m else None

    def engine(self) -> httpx.Client:
        assert self.engine_socket, "no guard engine was started"
        return httpx.Client(transport=httpx.HTTPTransport(uds=self.engine_socket), base_url="http://engine",
                            timeout=10)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                for p in children(self.proc.pid):
                    os.kill(p, signal.SIGKILL)
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Any]:
    """serve(config_path, workers=2, env=..., wait=True) -> Served; all stopped at the end."""
    started: list[Served] = []

    def start(config: Path, workers: int = 2, env: dict[str, str] | None = None, wait: bool = True,
              args: tuple[str, ...] = ()) -> Served:
        s = Served(tmp_path, config, workers, env, args)
        started.append(s)
        return s.wait_ready() if wait else s

    yield start
    for s in started:
        s.stop()


def gateway_yaml(tmp: Path, upstream_url: str, *, policy: str | None = None, extra: str = "",
                 name: str = "gateway.yaml") -> Path:
    conf = tmp / name
    lines = ["listen: {host: 127.0.0.1, port: 0}", "upstreams:",
             f'  main: {{base_url: "{upstream_url}", dialect: openai}}']
    if policy:
        lines.append(f"policy: {policy}")
    conf.write_text("\n".join(lines) + "\n" + extra)
    conf.chmod(0o600)
    return conf


def access_pids(log: str) -> set[str]:
    """Pids of the workers that logged an access line (the worker log format has the pid)."""
    return set(re.findall(r"^\S+ \S+ (\d+) guardgate\.access ", log, re.M))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])

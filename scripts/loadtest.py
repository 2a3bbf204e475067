"""Load test: N concurrent streaming clients through a Guardgate subprocess, every stream checked.

    python scripts/loadtest.py [--streams 500] [--seconds 60] [--path relay|gate|translate]
                               [--chunks 20] [--chunk-delay-ms 50] [--max-requests 0] [--answers json] [--json]

Everything runs on loopback: a scripted upstream (bench/fake_upstream.py), `guardgate serve` in
front of it, and N client loops in this process. Each request asks the upstream for its own text
(header `X-Script-Text`: tokens like `s12r7t3`, unique to client 12's 7th request), so any token
lost, duplicated, reordered or delivered to the wrong client is detected. Paths:
  relay      openai → openai, no policy (the byte relay)
  gate       the same with bench/regex-stream.yaml (decoded, stream gate with a regex step)
  translate  openai client → llama-dialect upstream (every event decoded and re-encoded)

`--answers json`: non-stream requests instead, each answer's JSON text checked the same way (answers
of many lengths under one head: a relay that mixed up bodies or lengths would show here).

Bounded: clients stop starting requests at `--seconds` (or after `--max-requests`), in-flight
streams get a grace period, each request has a timeout, and every process is stopped at the end.
Reports requests, lost / mixed tokens, errors by kind, TTFT and stream time, and the gateway's RSS
at start, after warm-up, at peak and at the end. Exit status 0 only when every stream was exact.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
TOKEN = re.compile(r"^s(\d+)r(\d+)t(\d+)$")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


@dataclass
class Report:
    path: str
    streams: int
    seconds: float
    answers: str = "stream"  # or "json": non-stream requests
    requests: int = 0
    ok: int = 0
    tokens_expected: int = 0
    tokens_lost: int = 0
    tokens_mixed: int = 0  # tokens of another stream delivered to this one
    tokens_garbled: int = 0  # tokens that belong to no stream, duplicates, reordering
    errors: dict[str, int] = field(default_factory=dict)
    ttft_ms_p50: float = 0.0
    ttft_ms_p99: float = 0.0
    stream_ms_p50: float = 0.0
    stream_ms_p99: float = 0.0
    streams_per_s: float = 0.0
    peak_concurrency: int = 0
    rss_kib_start: int = 0
    rss_kib_warm: int = 0
    rss_kib_peak: int = 0
    rss_kib_end: int = 0
    rss_samples: list[tuple[float, int]] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def clean(self) -> bool:
        return (self.requests > 0 and self.ok == self.requests and not self.tokens_lost and not self.tokens_mixed
                and not self.tokens_garbled and not self.errors)


def expected_text(cid: int, seq: int, chunks: int) -> str:
    return " ".join(f"s{cid}r{seq}t{i}" for i in range(chunks))


def content_of(line: bytes) -> tuple[str, str | None]:
    """(text delta, error message) of one `data:` line of an OpenAI chat stream."""
    obj = json.loads(line[6:])
    if obj.get("error"):
        return "", str(obj["error"].get("message") if isinstance(obj["error"], dict) else obj["error"])
    out = []
    for ch in obj.get("choices") or ():
        c = (ch.get("delta") or {}).get("content")
        if c:
            out.append(c)
    return "".join(out), None


class Load:
    def __init__(self, base: str, report: Report, chunks: int, deadline: float, max_requests: int,
                 timeout: float) -> None:
        self.base, self.r, self.chunks, self.deadline = base, report, chunks, deadline
        self.stream = report.answers == "stream"
        self.max_requests, self.timeout = max_requests, timeout
        self.ttft: list[float] = []
        self.total: list[float] = []
        self.started = 0
        self.inflight = 0
        self.errors: Counter[str] = Counter()

    def _more(self) -> bool:
        if time.monotonic() >= self.deadline:
            return False
        return not self.max_requests or self.started < self.max_requests

    async def client(self, session: aiohttp.ClientSession, cid: int) -> None:
        seq = 0
        while self._more():
            self.started += 1
            seq += 1
            await self.one(session, cid, seq)

    async def one(self, session: aiohttp.ClientSession, cid: int, seq: int) -> None:
        want = expected_text(cid, seq, self.chunks)
        body = {"model": "bench", "messages": [{"role": "user", "content": f"client {cid}"}], "stream": self.stream}
        self.r.requests += 1
        self.inflight += 1
        self.r.peak_concurrency = max(self.r.peak_concurrency, self.inflight)
        t0 = time.perf_counter()
        ttft = 0.0
        parts: list[str] = []
        error: str | None = None
        done = False
        try:
            async with asyncio.timeout(self.timeout):
                async with session.post(self.base + "/chat/completions", json=body,
                                        headers={"X-Script-Text": want}) as resp:
                    if resp.status != 200:
                        error = f"http_{resp.status}"
                        await resp.read()
                    elif not self.stream:
                        ttft = time.perf_counter() - t0
                        parts.append(json.loads(await resp.read())["choices"][0]["message"]["content"])
                    else:
                        buf = b""
                        async for chunk in resp.content.iter_any():
                            if not ttft:
                                ttft = time.perf_counter() - t0
                            buf += chunk
                            *lines, buf = buf.split(b"\n")
                            for line in lines:
                                if line.startswith(b"data: [DONE]"):
                                    done = True
                                elif line.startswith(b"data: "):
                                    text, err = content_of(line)
                                    if err:
                                        error = error or "error_frame"
                                    parts.append(text)
                        if not done and error is None:
                            error = "no_done"
        except TimeoutError:
            error = "timeout"
        except aiohttp.ClientError as e:
            error = type(e).__name__
        except (ValueError, KeyError, IndexError, TypeError):
            error = "bad_json"
        finally:
            self.inflight -= 1
        elapsed = time.perf_counter() - t0
        got = "".join(parts)
        self.check(cid, seq, want, got)
        if error:
            self.errors[error] += 1
        elif got == want:
            self.r.ok += 1
            self.ttft.append(ttft)
            self.total.append(elapsed)

    def check(self, cid: int, seq: int, want: str, got: str) -> None:
        exp = want.split(" ")
        self.r.tokens_expected += len(exp)
        if got == want:
            return
        recv = got.split()
        mine = f"s{cid}r{seq}t"
        foreign = [t for t in recv if not t.startswith(mine)]
        self.r.tokens_mixed += sum(1 for t in foreign if TOKEN.match(t))
        self.r.tokens_garbled += sum(1 for t in foreign if not TOKEN.match(t))
        own = [t for t in recv if t.startswith(mine)]
        self.r.tokens_lost += len(set(exp) - set(own))
        if own != [t for t in exp if t in set(own)]:
            self.r.tokens_garbled += 1  # duplicated or out of order


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return 0.0
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] * 1000


def spawn(args: list[str]) -> subprocess.Popen:
    # stderr goes to a file, never an unread pipe: a chatty child would block once the pipe is full
    log = tempfile.TemporaryFile()  # noqa: SIM115  (closed with the process object)
    p = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    p.log = log  # type: ignore[attr-defined]
    return p


def stderr_tail(p: subprocess.Popen, n: int = 2000) -> str:
    log = p.log  # type: ignore[attr-defined]
    log.seek(0)
    return log.read().decode(errors="replace")[-n:]


async def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < end:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args[1:3]} exited: {stderr_tail(proc)}")
            try:
                async with s.get(url) as r:
                    if r.status < 500:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} did not come up in {timeout} s")


async def run(streams: int = 500, seconds: float = 60, path: str = "relay", chunks: int = 20,
              chunk_delay_ms: float = 50, max_requests: int = 0, timeout: float = 60, grace: float = 30,
              warmup: float | None = None, quiet: bool = False, answers: str = "stream") -> Report:
    """Start the upstream and the gateway, run the load, stop everything; the report."""
    report = Report(path=path, streams=streams, seconds=seconds, answers=answers)
    up_port, gw_port = free_port(), free_port()
    dialect = "llama" if path == "translate" else "openai"
    procs = [spawn([PY, "bench/fake_upstream.py", "--port", str(up_port), "--chunks", str(chunks),
                    "--chunk-delay-ms", str(chunk_delay_ms), "--dialect", dialect])]
    cmd = [PY, "-m", "gateway.cli", "serve", "--upstream", f"http://127.0.0.1:{up_port}/v1",
           "--upstream-dialect", dialect, "--port", str(gw_port), "--log-level", "WARNING"]
    cmd += ["--policy", "bench/regex-stream.yaml" if path == "gate" else "none"]
    procs.append(spawn(cmd))
    gw = procs[1]
    try:
        await wait_ready(f"http://127.0.0.1:{up_port}/v1/models", procs[0])
        await wait_ready(f"http://127.0.0.1:{gw_port}/healthz", gw)
        report.rss_kib_start = rss_kib(gw.pid)
        t_start = time.monotonic()
        warm_at = t_start + (warmup if warmup is not None else min(10.0, seconds / 5))
        load = Load(f"http://127.0.0.1:{gw_port}/v1", report, chunks, t_start + seconds, max_requests, timeout)

        async def sample() -> None:
            while True:
                now = time.monotonic()
                kib = rss_kib(gw.pid)
                report.rss_samples.append((round(now - t_start, 2), kib))
                report.rss_kib_peak = max(report.rss_kib_peak, kib)
                if not report.rss_kib_warm and now >= warm_at:
                    report.rss_kib_warm = kib
                await asyncio.sleep(0.25)

        sampler = asyncio.create_task(sample())
        conn = aiohttp.TCPConnector(limit=0, force_close=False)
        async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=None)) as session:
            clients = [asyncio.create_task(load.client(session, i)) for i in range(streams)]
            _, pending = await asyncio.wait(clients, timeout=seconds + grace)
            for t in pending:
                t.cancel()
                load.errors["cancelled_at_grace"] += 1
            if pending:
                await asyncio.wait(pending)
        report.wall_s = round(time.monotonic() - t_start, 2)
        await asyncio.sleep(1.0)  # let the gateway release what the last streams held
        report.rss_kib_end = rss_kib(gw.pid)
        sampler.cancel()
        report.errors = dict(load.errors)
        report.ttft_ms_p50, report.ttft_ms_p99 = round(pct(load.ttft, 0.5), 2), round(pct(load.ttft, 0.99), 2)
        report.stream_ms_p50, report.stream_ms_p99 = round(pct(load.total, 0.5), 2), round(pct(load.total, 0.99), 2)
        report.streams_per_s = round(report.requests / max(report.wall_s, 1e-9), 1)
        if not report.rss_kib_warm:
            report.rss_kib_warm = report.rss_kib_peak
        if gw.poll() is not None:
            report.errors["gateway_died"] = 1
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
    return report


def summary(r: Report) -> str:
    mib = lambda k: f"{k / 1024:.1f}"  # noqa: E731
    growth = (r.rss_kib_end - r.rss_kib_warm) / 1024
    return "\n".join([
        f"loadtest: path={r.path} answers={r.answers} streams={r.streams} seconds={r.seconds:g} wall={r.wall_s:g}s "
        f"CPUs={os.cpu_count()}",
        f"  requests {r.requests}  exact {r.ok}  ({r.streams_per_s:g} streams/s, peak concurrency "
        f"{r.peak_concurrency})",
        f"  tokens expected {r.tokens_expected}  lost {r.tokens_lost}  mixed {r.tokens_mixed}  "
        f"garbled {r.tokens_garbled}",
        f"  errors {r.errors or 0}",
        f"  TTFT p50 {r.ttft_ms_p50:.1f} ms  p99 {r.ttft_ms_p99:.1f} ms; stream p50 {r.stream_ms_p50:.1f} ms  "
        f"p99 {r.stream_ms_p99:.1f} ms",
        f"  gateway RSS MiB: start {mib(r.rss_kib_start)}  warm {mib(r.rss_kib_warm)}  peak {mib(r.rss_kib_peak)}  "
        f"end {mib(r.rss_kib_end)}  (end - warm {growth:+.1f})",
        f"  verdict: {'PASS' if r.clean else 'FAIL'}",
    ])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", type=int, default=500)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--path", choices=("relay", "gate", "translate"), default="relay")
    ap.add_argument("--chunks", type=int, default=20)
    ap.add_argument("--chunk-delay-ms", type=float, default=50)
    ap.add_argument("--max-requests", type=int, default=0, help="stop after this many requests (0: no limit)")
    ap.add_argument("--timeout", type=float, default=60, help="per request")
    ap.add_argument("--answers", choices=("stream", "json"), default="stream", help="json: non-stream requests")
    ap.add_argument("--json", action="store_true", help="print the report as JSON too")
    a = ap.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    r = asyncio.run(run(a.streams, a.seconds, a.path, a.chunks, a.chunk_delay_ms, a.max_requests, a.timeout,
                        answers=a.answers))
    print(summary(r))
    if a.json:
        d = asdict(r)
        d["rss_samples"] = d["rss_samples"][:: max(1, len(d["rss_samples"]) // 60)]
        print(json.dumps(d))
    return 0 if r.clean else 1


if __name__ == "__main__":
    sys.exit(main())

"""Latency and throughput Guardgate adds, measured side by side on loopback in one run.

    python bench/bench_relay.py [--requests 300] [--concurrency 32] [--seconds 4] [--chunks 20]

Targets (each a separate process, so the load generator does not share a loop with them):
  direct       the scripted upstream itself (bench/fake_upstream.py)
  relay        guardgate serve → openai upstream (byte relay, no policy)
  translated   guardgate serve → llama-dialect upstream (openai client; every event re-encoded)
  gate-regex   guardgate serve --policy bench/regex-stream.yaml (stream gate with the regex guard)
Latency requests are interleaved round-robin across targets so machine noise hits all alike.
Prints p50/p99 per target and the gateway's added p50/p99 and RPS as ratios to direct.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Target:
    name: str
    base: str  # e.g. http://127.0.0.1:PORT/v1
    procs: list[subprocess.Popen] = field(default_factory=list)
    lat: dict[str, list[float]] = field(default_factory=lambda: {"json": [], "ttft": [], "stream": []})
    rps: dict[str, float] = field(default_factory=dict)


LOG = open(os.devnull, "wb") if not os.environ.get("BENCH_LOG") else open(os.environ["BENCH_LOG"], "ab")  # noqa: SIM115


def spawn(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=LOG,
                            env={**os.environ, **(env or {})})


async def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 60) -> bool:
    end = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < end:
            if proc.poll() is not None:
                return False
            try:
                async with s.get(url) as r:
                    if r.status < 500:
                        return True
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    return False


def gateway_cmd(port: int, upstream: str, dialect: str = "openai", policy: str | None = None) -> list[str]:
    cmd = [PY, "-m", "gateway.cli", "serve", "--upstream", upstream, "--upstream-dialect", dialect,
           "--port", str(port), "--log-level", "WARNING"]
    cmd += ["--policy", policy or "none"]  # none: the plain relay (serve guards with `starter` by default)
    return cmd


async def start_targets(chunks: int, want: list[str]) -> list[Target]:
    up_port, ll_port = free_port(), free_port()
    up = spawn([PY, "bench/fake_upstream.py", "--port", str(up_port), "--chunks", str(chunks)])
    ll = spawn([PY, "bench/fake_upstream.py", "--port", str(ll_port), "--chunks", str(chunks), "--dialect", "llama"])
    direct = Target("direct", f"http://127.0.0.1:{up_port}/v1", [up, ll])
    targets = [direct]
    specs = {
        "relay": (f"http://127.0.0.1:{up_port}/v1", "openai", None),
        "translated": (f"http://127.0.0.1:{ll_port}/v1", "llama", None),
        "gate-regex": (f"http://127.0.0.1:{up_port}/v1", "openai", "bench/regex-stream.yaml"),
    }
    for name in want:
        if name not in specs:
            continue
        base, dialect, policy = specs[name]
        port = free_port()
        proc = spawn(gateway_cmd(port, base, dialect, policy))
        targets.append(Target(name, f"http://127.0.0.1:{port}/v1", [proc]))
    ok = [await wait_ready(direct.base + "/models", up)]
    ok.append(await wait_ready(f"http://127.0.0.1:{ll_port}/v1/models", ll))
    for t in targets[1:]:
        if not await wait_ready(t.base.rsplit("/v1", 1)[0] + "/healthz", t.procs[0]):
            print(f"[{t.name}] did not start; skipped (set BENCH_LOG=FILE to keep its output)", file=sys.stderr)
            t.base = ""
    return [t for t in targets if t.base]


BODY = {"model": "bench", "messages": [{"role": "user", "content": "Say something."}]}


async def one(session: aiohttp.ClientSession, t: Target, stream: bool) -> tuple[float, float]:
    t0 = time.perf_counter()
    ttft = 0.0
    async with session.post(t.base + "/chat/completions", json={**BODY, "stream": stream}) as r:
        if stream:
            async for _ in r.content.iter_any():
                if not ttft:
                    ttft = time.perf_counter() - t0
        else:
            await r.read()
        assert r.status == 200, r.status
    return ttft, time.perf_counter() - t0


async def latency(targets: list[Target], n: int) -> None:
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as s:
        for t in targets:  # warm-up: connections, code paths
            for st in (False, True):
                for _ in range(20):
                    await one(s, t, st)
        for _ in range(n):
            for t in targets:
                _, total = await one(s, t, False)
                t.lat["json"].append(total)
                ttft, total = await one(s, t, True)
                t.lat["ttft"].append(ttft)
                t.lat["stream"].append(total)


async def throughput(t: Target, concurrency: int, seconds: float, stream: bool) -> float:
    done = 0
    end = time.perf_counter() + seconds
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as s:
        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < end:
                await one(s, t, stream)
                done += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return done / (time.perf_counter() - t0)


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] * 1000


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--chunks", type=int, default=20)
    ap.add_argument("--targets", default="relay,translated,gate-regex")
    a = ap.parse_args()
    targets = await start_targets(a.chunks, a.targets.split(","))
    try:
        await latency(targets, a.requests)
        for t in targets:
            t.rps["json"] = await throughput(t, a.concurrency, a.seconds, False)
            t.rps["stream"] = await throughput(t, a.concurrency, a.seconds, True)
    finally:
        for t in targets:
            for p in t.procs:
                p.terminate()
        for t in targets:
            for p in t.procs:
                p.wait(10)
    d = targets[0]
    print(f"\n{a.requests} sequential requests per kind per target, interleaved; stream = {a.chunks} chunks; "
          f"RPS at concurrency {a.concurrency} for {a.seconds:.0f} s; CPUs: {os.cpu_count()}")
    print(f"{'target':<12}{'json p50':>10}{'p99':>8}{'ttft p50':>10}{'p99':>8}{'strm p50':>10}{'p99':>8}"
          f"{'rps json':>10}{'rps strm':>10}")
    for t in targets:
        print(f"{t.name:<12}" + "".join(f"{pct(t.lat[k], 0.5):>10.2f}{pct(t.lat[k], 0.99):>8.2f}"
                                         for k in ("json", "ttft", "stream"))
              + f"{t.rps['json']:>10.0f}{t.rps['stream']:>10.0f}")
    print("\nadded by the gateway (ms, target minus direct) and throughput ratio (target / direct):")
    for t in targets[1:]:
        added = {k: (pct(t.lat[k], 0.5) - pct(d.lat[k], 0.5), pct(t.lat[k], 0.99) - pct(d.lat[k], 0.99))
                 for k in ("json", "ttft", "stream")}
        per_chunk = (statistics.median(t.lat["stream"]) - statistics.median(d.lat["stream"])) * 1000 / (a.chunks + 2)
        print(f"{t.name:<12} json +{added['json'][0]:.2f}/+{added['json'][1]:.2f}  ttft +{added['ttft'][0]:.2f}/"
              f"+{added['ttft'][1]:.2f}  stream +{added['stream'][0]:.2f}/+{added['stream'][1]:.2f} "
              f"({per_chunk:.3f} ms/chunk)  rps json x{t.rps['json'] / d.rps['json']:.2f} "
              f"stream x{t.rps['stream'] / d.rps['stream']:.2f}")
    rel = {t.name: t for t in targets}
    if "relay" in rel:
        for other in ("translated", "gate-regex"):
            if other in rel:
                r, o = rel["relay"], rel[other]
                ratio = statistics.median(o.lat["stream"]) / statistics.median(r.lat["stream"])
                print(f"{other} vs relay: stream p50 x{ratio:.2f}, "
                      f"ttft p50 x{statistics.median(o.lat['ttft']) / statistics.median(r.lat['ttft']):.2f}, "
                      f"stream rps x{o.rps['stream'] / r.rps['stream']:.2f}")


if __name__ == "__main__":
    asyncio.run(main())

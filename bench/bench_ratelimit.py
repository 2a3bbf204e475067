"""What a rate-limit check adds, in memory and with Redis, next to the plain relay. One run.

    python bench/bench_ratelimit.py [--requests 400]

Needs `redis-server` on PATH (the bench starts its own on a free port) and the `redis` extra.

Two measurements:
  end to end  guardgate serve (separate processes) in front of bench/fake_upstream.py, non-stream chat
              JSON, one request at a time, interleaved round-robin across the targets so machine
              noise hits all alike:
                plain    no limits (no limiter work at all)
                memory   requests_per_minute + tokens_per_minute (token metering on the relay), memory store
                redis    the same limits, store: redis (loopback)
              prints p50/p99 per target and the p50 added over plain.
  the check   Limiter.acquire + finish alone, in process, per store: the p50 of the call.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_relay import free_port, spawn, wait_ready

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
LIMITS = "requests_per_minute: 100000000, tokens_per_minute: 100000000"


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def end_to_end(n: int, redis_url: str, tmp: Path) -> dict[str, list[float]]:
    up_port = free_port()
    procs = [spawn([PY, "bench/fake_upstream.py", "--port", str(up_port), "--chunks", "5"])]
    targets: dict[str, str] = {}
    try:
        for name, extra in (("plain", ""), ("memory", LIMITS), ("redis", LIMITS)):
            port = free_port()
            route = f"{{upstream: main, {extra}}}" if extra else "{upstream: main}"
            store = f'limits: {{store: redis, url: "{redis_url}"}}' if name == "redis" else ""
            conf = tmp / f"{name}.yaml"
            conf.write_text(f"listen: {{host: 127.0.0.1, port: {port}}}\n"
                            f"upstreams: {{main: {{base_url: 'http://127.0.0.1:{up_port}/v1'}}}}\n"
                            f"routes: [{route}]\n{store}\n")
            procs.append(spawn([PY, "-m", "gateway.cli", "serve", "--config", str(conf), "--policy", "none",
                                "--log-level", "WARNING"], {"PYTHONPATH": str(ROOT)}))
            if not await wait_ready(f"http://127.0.0.1:{port}/readyz", procs[-1]):
                raise SystemExit(f"{name}: gateway did not start")
            targets[name] = f"http://127.0.0.1:{port}/v1/chat/completions"
        body = {"model": "bench", "messages": [{"role": "user", "content": "hello there"}]}
        lat: dict[str, list[float]] = {k: [] for k in targets}
        async with aiohttp.ClientSession() as s:
            for i in range(n + 50):
                for name, url in targets.items():
                    t0 = time.perf_counter()
                    async with s.post(url, json=body) as r:
                        await r.read()
                        assert r.status == 200, (name, r.status)
                    if i >= 50:  # warm-up
                        lat[name].append((time.perf_counter() - t0) * 1000)
        return lat
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(10)


async def check_alone(n: int, redis_url: str) -> dict[str, list[float]]:
    from gateway.context import RequestContext
    from gateway.limits import Limiter, RateLimits
    from gateway.limits.memory import MemoryStore
    from gateway.limits.redis_store import RedisStore

    limits = RateLimits(requests_per_minute=100_000_000, tokens_per_minute=100_000_000, bucket="bench")
    out: dict[str, list[float]] = {}
    for name, store in (("memory", MemoryStore()), ("redis", RedisStore(redis_url))):
        lim = Limiter(store, timeout_s=1.0)
        xs = []
        for i in range(n + 50):
            ctx = RequestContext(id=str(i), dialect="openai")
            t0 = time.perf_counter()
            ticket = await lim.acquire(ctx, limits)
            await lim.finish(ticket, 12)
            if i >= 50:
                xs.append((time.perf_counter() - t0) * 1000)
        out[name] = xs
        await lim.aclose()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=400)
    args = ap.parse_args()
    redis_bin = shutil.which("redis-server")
    if redis_bin is None:
        raise SystemExit("redis-server is not installed (Debian: apt-get install -y redis-server)")
    with tempfile.TemporaryDirectory() as d:
        port = free_port()
        redis = subprocess.Popen([redis_bin, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                  "--appendonly", "no", "--dir", d], stdout=subprocess.DEVNULL)
        url = f"redis://127.0.0.1:{port}/0"
        try:
            time.sleep(0.3)
            from gateway.cli import serve_loop_policy

            asyncio.set_event_loop_policy(serve_loop_policy())
            alone = asyncio.run(check_alone(args.requests * 5, url))
            lat = asyncio.run(end_to_end(args.requests, url, Path(d)))
        finally:
            redis.terminate()
            redis.wait(10)
    print(f"# bench_ratelimit: {args.requests} non-stream chat requests per target, sequential, loopback; "
          f"{os.cpu_count()} CPUs")
    print(f"{'target':8} {'p50 ms':>8} {'p99 ms':>8} {'added p50 ms':>13}")
    base = statistics.median(lat["plain"])
    for name, xs in lat.items():
        added = "" if name == "plain" else f"{statistics.median(xs) - base:+.3f}"
        print(f"{name:8} {statistics.median(xs):8.3f} {pct(xs, 0.99):8.3f} {added:>13}")
    print("# the check alone (Limiter.acquire + finish, in process):")
    for name, xs in alone.items():
        print(f"{name:8} p50 {statistics.median(xs) * 1000:8.1f} us   p99 {pct(xs, 0.99) * 1000:8.1f} us")


if __name__ == "__main__":
    main()

"""What telemetry costs, measured side by side on loopback in one run.

    python bench/bench_telemetry.py [--requests 300] [--concurrency 32] [--seconds 4] [--chunks 20]

Targets (separate processes; latency requests interleaved round-robin, as in bench_relay.py):
  direct            the scripted upstream itself
  relay             guardgate serve, no OTEL_* set: no tracer (metrics only)
  relay+otlp        the same with OTEL_EXPORTER_OTLP_ENDPOINT pointing at a local OTLP/HTTP sink
  gate-regex        --policy bench/regex-stream.yaml, no tracer
  gate-regex+otlp   the same, traced (request, upstream and guard spans)
Prints p50/p99 per target and each traced target's cost as a ratio to its untraced twin.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_relay as B

SINK = """
import sys
from aiohttp import web
spans = 0
async def traces(request):
    await request.read()
    return web.Response(body=b"", content_type="application/x-protobuf")
app = web.Application(client_max_size=64 << 20)
app.router.add_post("/v1/traces", traces)
app.router.add_get("/", lambda r: web.Response(text="ok"))
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
"""


async def start(chunks: int) -> list[B.Target]:
    up_port, sink_port = B.free_port(), B.free_port()
    up = B.spawn([B.PY, "bench/fake_upstream.py", "--port", str(up_port), "--chunks", str(chunks)])
    sink = B.spawn([B.PY, "-c", SINK, str(sink_port)])
    direct = B.Target("direct", f"http://127.0.0.1:{up_port}/v1", [up, sink])
    base = f"http://127.0.0.1:{up_port}/v1"
    otlp = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink_port}", "OTEL_SERVICE_NAME": "bench"}
    off = {"OTEL_TRACES_EXPORTER": "none"}
    targets = [direct]
    for name, policy, env in (("relay", None, off), ("relay+otlp", None, otlp),
                              ("gate-regex", "bench/regex-stream.yaml", off),
                              ("gate-regex+otlp", "bench/regex-stream.yaml", otlp)):
        port = B.free_port()
        proc = B.spawn(B.gateway_cmd(port, base, "openai", policy), env=env)
        targets.append(B.Target(name, f"http://127.0.0.1:{port}/v1", [proc]))
    assert await B.wait_ready(direct.base + "/models", up)
    assert await B.wait_ready(f"http://127.0.0.1:{sink_port}/", sink)
    for t in targets[1:]:
        if not await B.wait_ready(t.base.rsplit("/v1", 1)[0] + "/healthz", t.procs[0]):
            err = t.procs[0].stderr.read().decode(errors="replace")[-800:] if t.procs[0].stderr else ""
            raise SystemExit(f"[{t.name}] did not start\n{err}")
    return targets


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--chunks", type=int, default=20)
    a = ap.parse_args()
    targets = await start(a.chunks)
    try:
        await B.latency(targets, a.requests)
        for t in targets:
            t.rps["json"] = await B.throughput(t, a.concurrency, a.seconds, False)
            t.rps["stream"] = await B.throughput(t, a.concurrency, a.seconds, True)
    finally:
        for t in targets:
            for p in t.procs:
                p.terminate()
        for t in targets:
            for p in t.procs:
                p.wait(10)
    print(f"\n{a.requests} sequential requests per kind per target, interleaved; stream = {a.chunks} chunks; "
          f"RPS at concurrency {a.concurrency} for {a.seconds:.0f} s; CPUs: {os.cpu_count()}")
    print(f"{'target':<17}{'json p50':>10}{'p99':>8}{'ttft p50':>10}{'p99':>8}{'strm p50':>10}{'p99':>8}"
          f"{'rps json':>10}{'rps strm':>10}")
    for t in targets:
        print(f"{t.name:<17}" + "".join(f"{B.pct(t.lat[k], 0.5):>10.2f}{B.pct(t.lat[k], 0.99):>8.2f}"
                                         for k in ("json", "ttft", "stream"))
              + f"{t.rps['json']:>10.0f}{t.rps['stream']:>10.0f}")
    by = {t.name: t for t in targets}
    d = by["direct"]
    print("\nadded by the gateway, p50 ms (target minus direct):")
    for t in targets[1:]:
        print(f"  {t.name:<17} json +{B.pct(t.lat['json'], .5) - B.pct(d.lat['json'], .5):.2f}  "
              f"stream +{B.pct(t.lat['stream'], .5) - B.pct(d.lat['stream'], .5):.2f}")
    print("\ntracing on vs off (same path): ratio of medians, ratio of throughput")
    for off in ("relay", "gate-regex"):
        o, n = by[off], by[off + "+otlp"]
        print(f"  {off:<12} json x{statistics.median(n.lat['json']) / statistics.median(o.lat['json']):.2f}  "
              f"stream x{statistics.median(n.lat['stream']) / statistics.median(o.lat['stream']):.2f}  "
              f"rps json x{n.rps['json'] / o.rps['json']:.2f}  rps stream x{n.rps['stream'] / o.rps['stream']:.2f}")


if __name__ == "__main__":
    asyncio.run(main())

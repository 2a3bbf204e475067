"""A guarded Responses stream next to a guarded chat stream, one run (issue 17).

    python bench/bench_responses.py [--rounds 300] [--chunks 20]

One `guardgate serve --policy bench/regex-stream.yaml` in front of bench/fake_upstream.py (an OpenAI
chat upstream streaming `--chunks` text chunks). Requests alternate, one at a time, between:
  direct     POST /v1/chat/completions on the upstream itself (the baseline)
  chat       POST /v1/chat/completions through the gateway (decoded, regex stream gate, re-encoded)
  responses  POST /v1/responses through the gateway (decoded, translated to chat, the same gate,
             encoded as Responses events: created, in_progress, item/part added, deltas, done, completed)
Prints, per target, time to the first text delta (TTFT) and to the end of the stream (p50 / p99), the
gateway's added p50 over direct, and the added per-event cost (added stream time / chunks), so the
Responses encoder's cost shows next to the chat encoder's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import sys
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_relay as B

CHAT = {"model": "bench", "stream": True, "messages": [{"role": "user", "content": "Say something."}]}
RESP = {"model": "bench", "stream": True, "input": "Say something."}
# The first text delta: chat's role chunk carries `"content":""`, so a content with a character in it.
FIRST = {"chat": re.compile(rb'"content":"[^"]'), "responses": re.compile(rb"response\.output_text\.delta")}


async def one(s: aiohttp.ClientSession, url: str, body: dict, marker: re.Pattern[bytes]) -> tuple[float, float]:
    """(seconds to the first text delta, seconds to the end)."""
    t0 = time.perf_counter()
    first = None
    buf = b""
    async with s.post(url, json=body) as r:
        assert r.status == 200, await r.text()
        async for chunk in r.content.iter_any():
            if first is None:
                buf += chunk
                if marker.search(buf):
                    first = time.perf_counter() - t0
    return first if first is not None else time.perf_counter() - t0, time.perf_counter() - t0


async def run(rounds: int, chunks: int) -> None:
    up_port, gw_port = B.free_port(), B.free_port()
    procs = [B.spawn([B.PY, "bench/fake_upstream.py", "--port", str(up_port), "--chunks", str(chunks)])]
    procs.append(B.spawn([B.PY, "-m", "gateway.cli", "serve", "--upstream", f"http://127.0.0.1:{up_port}/v1",
                          "--port", str(gw_port), "--log-level", "WARNING", "--policy", "bench/regex-stream.yaml"]))
    try:
        for url, p in ((f"http://127.0.0.1:{up_port}/v1/models", procs[0]),
                       (f"http://127.0.0.1:{gw_port}/healthz", procs[1])):
            if not await B.wait_ready(url, p):
                raise SystemExit(f"not ready: {url}")
        targets = {"direct": (f"http://127.0.0.1:{up_port}/v1/chat/completions", CHAT, FIRST["chat"]),
                   "chat": (f"http://127.0.0.1:{gw_port}/v1/chat/completions", CHAT, FIRST["chat"]),
                   "responses": (f"http://127.0.0.1:{gw_port}/v1/responses", RESP, FIRST["responses"])}
        res: dict[str, list[tuple[float, float]]] = {k: [] for k in targets}
        async with aiohttp.ClientSession() as s:
            for _ in range(20):  # warm-up
                for url, body, marker in targets.values():
                    await one(s, url, body, marker)
            for _ in range(rounds):
                for name, (url, body, marker) in targets.items():
                    res[name].append(await one(s, url, body, marker))
    finally:
        for p in procs:
            p.terminate()
    print(f"{rounds} rounds, {chunks} chunks per stream, guarded by bench/regex-stream.yaml; ms")
    print(f"{'target':10} {'ttft p50':>9} {'p99':>7} {'end p50':>9} {'p99':>7}")
    p50 = {}
    for name, xs in res.items():
        ttft = sorted(x[0] * 1000 for x in xs)
        end = sorted(x[1] * 1000 for x in xs)
        p50[name] = (statistics.median(ttft), statistics.median(end))
        print(f"{name:10} {p50[name][0]:9.2f} {ttft[int(len(ttft) * .99) - 1]:7.2f} {p50[name][1]:9.2f} "
              f"{end[int(len(end) * .99) - 1]:7.2f}")
    d = p50["direct"]
    for name in ("chat", "responses"):
        added_ttft, added_end = p50[name][0] - d[0], p50[name][1] - d[1]
        print(f"added by {name:9}: ttft +{added_ttft:.2f} ms, stream +{added_end:.2f} ms "
              f"({added_end / chunks * 1000:.0f} us per event)")
    print(json.dumps({k: {"ttft_p50_ms": round(v[0], 3), "end_p50_ms": round(v[1], 3)} for k, v in p50.items()}))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--chunks", type=int, default=20)
    a = ap.parse_args()
    asyncio.run(run(a.rounds, a.chunks))

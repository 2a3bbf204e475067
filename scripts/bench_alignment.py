"""What alignment_check adds per tool call: the gateway (uvloop, as `guardgate serve`) in front of a
scripted upstream that answers with one streamed tool call, and a judge (the same scripted server,
model "judge") that answers at once or after a fixed delay. Time to the complete tool call at the
client, with and without the step; the difference is the added latency (gateway overhead + judge).

    PYTHONPATH=. python scripts/bench_alignment.py [--n 40] [--judge-delay-ms 0]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import asyncio

from harness import Loop, ScriptedUpstream
from test_agent_guards import TOOL, Scripted

from gateway.config import parse
from gateway.policy.chain import PolicyStore
from gateway.server import Gateway, create_app


def stack(policy: str | None, scripted: Scripted) -> tuple[Loop, str]:
    loop = Loop()
    up = ScriptedUpstream(handler=scripted)
    port = loop.serve(up.app())
    cfg = {"upstreams": {"main": {"base_url": f"http://127.0.0.1:{port}/v1"}}}
    if policy:
        cfg["policy"] = policy
    gw = Gateway(parse(cfg, "bench"), policies=PolicyStore(required=[policy]) if policy else None)
    return loop, f"http://127.0.0.1:{loop.serve(create_app(gw))}/v1"


def run(url: str, n: int) -> list[float]:
    import openai

    client = openai.OpenAI(base_url=url, api_key="sk-x", max_retries=0)
    out = []
    for i in range(n + 3):
        t0 = time.perf_counter()
        chunks = list(client.chat.completions.create(
            model="m", stream=True, tools=[TOOL], messages=[{"role": "user", "content": "Email Bob."}]))
        assert chunks[-1].choices[0].finish_reason == "tool_calls", chunks[-1]
        if i >= 3:  # warm-up excluded
            out.append((time.perf_counter() - t0) * 1000)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--judge-delay-ms", type=float, default=0.0)
    a = ap.parse_args()

    class Delayed(Scripted):
        async def __call__(self, request, up):  # type: ignore[no-untyped-def]
            if a.judge_delay_ms and request.content_length and b'"judge"' in await request.read():
                await asyncio.sleep(a.judge_delay_ms / 1000)
            return await super().__call__(request, up)

    with tempfile.TemporaryDirectory() as d:
        pol = Path(d) / "a.yaml"
        pol.write_text("name: a\nstream:\n  steps:\n    - {guard: alignment_check, upstream: main, model: judge}\n")
        empty = Path(d) / "e.yaml"
        empty.write_text("name: e\nstream:\n  steps:\n    - {guard: regex, patterns: [zzzz-never]}\n")
        rows = {}
        for label, policy in (("regex only (baseline)", str(empty)), ("alignment_check", str(pol))):
            loop, url = stack(policy, Delayed())
            try:
                rows[label] = run(url, a.n)
            finally:
                loop.close()
    base = statistics.median(rows["regex only (baseline)"])
    print(f"n={a.n} judge delay={a.judge_delay_ms} ms (median / p90, ms to the complete tool call)")
    for label, xs in rows.items():
        xs.sort()
        print(f"  {label:24s} {statistics.median(xs):7.2f} / {xs[int(len(xs) * 0.9) - 1]:7.2f}")
    print(f"  added per tool call (median): {statistics.median(rows['alignment_check']) - base:.2f} ms")


if __name__ == "__main__":
    main()

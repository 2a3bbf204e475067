#!/usr/bin/env python3
"""Adaptive stream window (`check_every_tokens: auto`) against fixed windows, strict mode.

A scripted upstream streams one answer at 20, 50 and 200 tokens/s through the stream gate with one
guard step whose check takes `--base-ms` plus `--per-token-ms` per token of its window (an
incremental guard such as Llama Guard with a KV session: fixed cost + the new tokens). For each
rate and window policy: checks per answer, and the stall each token saw (from the moment the gate
received it to the moment it reached the client) at p50 / p99 / max. Strict mode
(max_unchecked_tokens 0): nothing is released before it was checked, so the stall is the price of
safety, and `auto` aims to keep it under `max_stall_ms` with the fewest checks.

    .venv/bin/python bench/bench_adaptive_window.py [--tokens 200] [--max-stall-ms 500]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.guards.base import Guard, GuardInput, register
from gateway.policy.chain import PolicyRun
from gateway.policy.schema import parse_policy_text
from gateway.policy.tokens import count_tokens, encoding
from gateway.types import (
    Event,
    Exchange,
    Finish,
    Message,
    StreamStart,
    TextDelta,
    Usage,
    UsageEvent,
    Verdict,
)

POLICY = """
name: bench-adaptive
stream:
  check_every_tokens: {every}
  max_stall_ms: {stall}
  max_unchecked_tokens: 0
  steps:
    - guard: bench_paced
      base_ms: {base}
      per_token_ms: {per}
      action: block
"""

CHECKS: list[int] = []


@register("bench_paced")
class PacedGuard(Guard):
    """Never flags; a check sleeps base_ms + per_token_ms x the tokens of its window."""

    name = "bench_paced"

    async def check(self, inp: GuardInput) -> Verdict:
        t0 = time.perf_counter()
        n = count_tokens(inp.text[inp.window_start :])
        await asyncio.sleep((float(self.options["base_ms"]) + float(self.options["per_token_ms"]) * n) / 1000)
        CHECKS.append(n)
        return self.verdict(t0, tokens_evaluated=n)


def answer_tokens(n: int) -> list[str]:
    enc = encoding()
    text = " ".join(f"Sentence {i} explains a harmless step of the recipe in plain words." for i in range(n))
    return [enc.decode([t]) for t in enc.encode_ordinary(text)[:n]]


async def run_one(every: str, rate: float, tokens: list[str], args: argparse.Namespace) -> dict[str, Any]:
    policy = parse_policy_text(
        POLICY.format(every=every, stall=args.max_stall_ms, base=args.base_ms, per=args.per_token_ms)
    )
    arrived: list[tuple[int, float]] = []  # (end offset in the text, time the gate got it)

    async def upstream() -> AsyncIterator[Event]:
        yield StreamStart(id="chatcmpl-bench", model="m")
        t_start = time.perf_counter()
        end = 0
        for i, t in enumerate(tokens):
            # paced against the clock, not by sleep sums: the rate holds even if the loop is late
            delay = t_start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            end += len(t)
            arrived.append((end, time.perf_counter()))
            yield TextDelta(t)
        yield Finish("stop")
        yield UsageEvent(Usage(10, len(tokens), 10 + len(tokens)))

    ex = Exchange(model="m", messages=[Message.of("user", "cook something")], stream=True)
    run = PolicyRun(policy, request_id="bench")
    CHECKS.clear()
    released: list[tuple[int, float]] = []
    out = 0
    try:
        async for ev in run.guard_stream(ex, upstream()):
            if isinstance(ev, TextDelta) and ev.text:
                out += len(ev.text)
                released.append((out, time.perf_counter()))
    finally:
        run.finish()
    stalls = []
    j = 0
    for end, t in arrived:
        while released[j][0] < end:
            j += 1
        stalls.append((released[j][1] - t) * 1000)
    stalls.sort()
    return {
        "checks": len(CHECKS),
        "p50": statistics.median(stalls),
        "p99": stalls[int(0.99 * (len(stalls) - 1))],
        "max": stalls[-1],
    }


async def main(args: argparse.Namespace) -> None:
    tokens = answer_tokens(args.tokens)
    print(
        f"# {len(tokens)}-token answer, strict mode, a check costs {args.base_ms} ms + {args.per_token_ms} ms/token, "
        f"auto targets max_stall_ms {args.max_stall_ms}"
    )
    print("| tokens/s | window | checks per answer | p50 stall ms | p99 stall ms | max stall ms |")
    print("|---:|---|---:|---:|---:|---:|")
    for rate in args.rates:
        for every in ("auto", "16", "64"):
            r = await run_one(every, rate, tokens, args)
            row = f"| {rate:g} | {every} | {r['checks']} | {r['p50']:.0f} | {r['p99']:.0f} | {r['max']:.0f} |"
            print(row, flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--rates", type=float, nargs="+", default=[20, 50, 200])
    ap.add_argument("--max-stall-ms", type=float, default=500)
    ap.add_argument("--base-ms", type=float, default=40)
    ap.add_argument("--per-token-ms", type=float, default=1.0)
    asyncio.run(main(ap.parse_args()))

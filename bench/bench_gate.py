"""What the stream gate costs, in process, on neutral events: the gate with the regex guard vs the
events passed straight through, measured side by side in one run.

    .venv/bin/python bench/bench_gate.py [--tokens 2000] [--repeat 5] [--pace-ms 1.0]

Two upstreams:
  instant  events as fast as the loop can take them: the gate's own per-event overhead and the
           time to first token it adds.
  paced    one token every --pace-ms (a model streaming): time to first token and inter-chunk gaps
           as the client sees them; strict mode (max_unchecked_tokens 0) must wait for the first
           window of check_every_tokens, a looser bound need not.
Medians over --repeat runs. The HTTP-level comparison lives with the server benchmarks.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import AsyncIterator, Callable

from gateway.policy.chain import PolicyRun
from gateway.policy.schema import Policy, parse_policy_text
from gateway.policy.tokens import encoding
from gateway.types import Event, Exchange, Finish, Message, StreamStart, TextDelta, Usage, UsageEvent

POLICY = """
name: bench
stream:
  check_every_tokens: {every}
  max_unchecked_tokens: {unchecked}
  steps:
    - guard: regex
      patterns:
        - {{pattern: "-----BEGIN ((RSA|OPENSSH|EC) )?PRIVATE KEY-----", category: secrets}}
        - {{pattern: "\\\\bAKIA[0-9A-Z]{{16}}\\\\b", category: secrets}}
        - {{pattern: "\\\\bsk-[A-Za-z0-9_-]{{20,}}", category: secrets}}
        - {{pattern: "forbidden phrase", category: bad}}
      action: block
"""


def answer_tokens(n: int) -> list[str]:
    enc = encoding()
    text = " ".join(f"Sentence {i} explains a harmless step of the recipe in plain words." for i in range(n))
    return [enc.decode([t]) for t in enc.encode_ordinary(text)[:n]]


async def upstream(tokens: list[str], pace_s: float) -> AsyncIterator[Event]:
    yield StreamStart(id="chatcmpl-bench", model="m")
    for t in tokens:
        if pace_s:
            await asyncio.sleep(pace_s)
        yield TextDelta(t)
    yield Finish("stop")
    yield UsageEvent(Usage(10, len(tokens), 10 + len(tokens)))


async def passthrough(events: AsyncIterator[Event]) -> AsyncIterator[Event]:
    async for ev in events:
        yield ev


Variant = Callable[[AsyncIterator[Event]], AsyncIterator[Event]]


def gate(policy: Policy) -> Variant:
    ex = Exchange(model="m", messages=[Message.of("user", "cook something")], stream=True)

    def wrap(events: AsyncIterator[Event]) -> AsyncIterator[Event]:
        run = PolicyRun(policy, request_id="bench")
        return _finishing(run, run.guard_stream(ex, events))

    return wrap


async def _finishing(run: PolicyRun, events: AsyncIterator[Event]) -> AsyncIterator[Event]:
    try:
        async for ev in events:
            yield ev
    finally:
        run.finish()


async def measure(variant: Variant, tokens: list[str], pace_s: float) -> dict[str, float]:
    t0 = time.perf_counter()
    first = None
    last = t0
    gaps: list[float] = []
    text = 0
    async for ev in variant(upstream(tokens, pace_s)):
        if isinstance(ev, TextDelta):
            now = time.perf_counter()
            if first is None:
                first = now - t0
            else:
                gaps.append(now - last)
            last = now
            text += len(ev.text)
    total = time.perf_counter() - t0
    assert text == sum(len(t) for t in tokens), "the bench answer must pass unchanged"
    gaps.sort()
    return {"total_s": total, "ttft_ms": (first or 0) * 1000, "us_per_event": total / len(tokens) * 1e6,
            "gap_mean_ms": statistics.fmean(gaps) * 1000 if gaps else 0.0,
            "gap_p99_ms": gaps[int(len(gaps) * 0.99)] * 1000 if gaps else 0.0}


async def main(args: argparse.Namespace) -> None:
    encoding()
    tokens = answer_tokens(args.tokens)
    strict = parse_policy_text(POLICY.format(every=args.every, unchecked=0))
    loose = parse_policy_text(POLICY.format(every=args.every, unchecked=args.every * 2))
    empty = parse_policy_text("name: empty\n")
    variants: list[tuple[str, Variant]] = [
        ("passthrough", passthrough),
        ("gate, no steps", gate(empty)),
        (f"gate+regex strict (every {args.every}, unchecked 0)", gate(strict)),
        (f"gate+regex loose (every {args.every}, unchecked {args.every * 2})", gate(loose)),
    ]
    upstreams = (("instant upstream", 0.0), (f"paced upstream, {args.pace_ms} ms/token", args.pace_ms / 1000))
    for label, pace in upstreams:
        n = len(tokens) if pace == 0 else min(len(tokens), args.paced_tokens)
        print(f"\n{label}: {n} tokens, median of {args.repeat} runs")
        print(f"  {'variant':52} {'us/event':>9} {'TTFT ms':>9} {'gap mean':>9} {'gap p99':>9}")
        base = None
        for name, v in variants:
            runs = [await measure(v, tokens[:n], pace) for _ in range(args.repeat)]
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            base = base or med
            ratio = med["us_per_event"] / base["us_per_event"]
            print(f"  {name:52} {med['us_per_event']:9.1f} {med['ttft_ms']:9.2f} {med['gap_mean_ms']:9.3f} "
                  f"{med['gap_p99_ms']:9.3f}   x{ratio:.2f} per event")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--paced-tokens", type=int, default=300)
    ap.add_argument("--every", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--pace-ms", type=float, default=1.0)
    asyncio.run(main(ap.parse_args()))

"""`check_every_tokens: auto`: the stream window sized from the check latency and the token rate."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import pytest

from gateway.policy.choice import ChoiceText, StepState
from gateway.policy.gate import AUTO_FIRST, StreamGate
from gateway.policy.schema import PolicyError, parse_policy_text

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import bench_adaptive_window as B  # registers the bench_paced guard

POLICY = """
name: p
stream:
  check_every_tokens: {every}
  max_stall_ms: {stall}
  steps:
    - guard: regex
      patterns: [{{pattern: "forbidden", category: bad}}]
"""


def test_auto_and_max_stall_parse_and_bad_values_are_refused() -> None:
    p = parse_policy_text(POLICY.format(every="auto", stall=300))
    assert p.stream.check_every_tokens == 0 and p.stream.max_stall_ms == 300.0
    assert parse_policy_text(POLICY.format(every=24, stall=500)).stream.check_every_tokens == 24
    with pytest.raises(PolicyError, match="check_every_tokens"):
        parse_policy_text(POLICY.format(every="sometimes", stall=500))
    with pytest.raises(PolicyError, match="max_stall_ms"):
        parse_policy_text(POLICY.format(every="auto", stall=0))


def test_window_is_the_largest_that_keeps_the_stall_under_the_target() -> None:
    p = parse_policy_text(POLICY.format(every="auto", stall=500))
    gate = StreamGate(p.stream.steps, {}, messages=[], check_every_tokens=0, max_stall_ms=500)
    c, st = ChoiceText(0), StepState(p.stream.steps[0], None)  # type: ignore[arg-type]
    assert gate._window(c, st) == AUTO_FIRST  # nothing measured yet
    c.first_at = time.monotonic() - 1.0
    c.tok_starts = list(range(101))  # 100 tokens/s
    assert gate._window(c, st) == AUTO_FIRST  # no check latency yet: 16 tokens fill in 0.16 s
    slow = ChoiceText(0, tok_starts=list(range(21)))
    slow.first_at = time.monotonic() - 1.0  # 20 tokens/s: 16 would take 0.8 s to fill
    assert gate._window(slow, st) == pytest.approx(5, rel=0.02)  # half the 500 ms target: 5 tokens
    st.cost_per_token.extend([0.001, 0.002])  # the slowest recent check: 2 ms per window token
    w = gate._window(c, st)
    assert w == pytest.approx(0.5 / (1 / 100 + 0.002), rel=0.02)  # ~42 tokens: 0.42 s to fill + 84 ms
    fixed = StreamGate(p.stream.steps, {}, messages=[], check_every_tokens=24)
    assert fixed._window(c, st) == 24


@pytest.mark.slow
async def test_auto_checks_less_than_a_small_fixed_window_within_the_stall_target() -> None:
    """A paced stream (100 tokens/s) and a guard of 20 ms + 1 ms/token, strict mode, target 400 ms."""

    class Args:
        max_stall_ms, base_ms, per_token_ms = 400, 20, 1.0

    tokens = B.answer_tokens(150)
    auto = await B.run_one("auto", 100, tokens, Args)  # type: ignore[arg-type]
    small = await B.run_one("16", 100, tokens, Args)  # type: ignore[arg-type]
    assert auto["checks"] <= small["checks"] * 0.7  # measured: 6 vs 10
    # the target with room for a loaded 2-core machine; a window that held the whole answer stalls ~1.5 s
    assert auto["p99"] < 400 * 2.5
    await asyncio.sleep(0)

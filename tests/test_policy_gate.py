"""The stream gate, driven by neutral events from a scripted upstream, with regex and test guards."""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from policy_fakes import OPENED, FakeUpstream, args_of, collect, text_of, tokens_of
from waits import until

from gateway.policy.chain import PolicyRun
from gateway.policy.schema import parse_policy_text
from gateway.policy.tokens import count_tokens
from gateway.types import (
    Annotation,
    Exchange,
    Finish,
    Message,
    StreamStart,
    TextDelta,
    ToolCallDelta,
    UsageEvent,
)

PHRASE = "forbidden phrase"
BEFORE = " ".join(f"word{i} is fine and calm." for i in range(40))
AFTER = " ".join(f"after{i} more harmless text." for i in range(40))
LONG = f"{BEFORE} Here comes the {PHRASE} in the middle. {AFTER}"


def policy(stream_steps: str, *, every: int = 8, unchecked: int = 0, mode: str = "enforce", extra: str = ""):
    return parse_policy_text(f"""
name: t
mode: {mode}
{extra}
stream:
  check_every_tokens: {every}
  max_unchecked_tokens: {unchecked}
  steps:
{stream_steps}
""")


REGEX_BLOCK = """
    - guard: regex
      patterns: [{pattern: "forbidden phrase", category: bad}]
      action: block
"""


def exchange() -> Exchange:
    return Exchange(model="m", messages=[Message.of("user", "tell me")], stream=True)


async def guarded(pol, up: FakeUpstream) -> tuple[list, dict, PolicyRun]:
    run = PolicyRun(pol, request_id="r1", route="/v1/chat/completions", dialect="openai", model="m")
    events = await collect(run.guard_stream(exchange(), up.events()))
    return events, run.finish(), run


def tail_kinds(events: list) -> list[str]:
    return [type(e).__name__ for e in events if not isinstance(e, TextDelta | ToolCallDelta)]


# --------------------------------------------------------------------------- block


async def test_strict_block_releases_nothing_of_the_phrase_or_after():
    up = FakeUpstream(tokens_of(LONG))
    events, rec, _ = await guarded(policy(REGEX_BLOCK), up)
    out = text_of(events)
    cut = LONG.index(PHRASE)
    assert LONG.startswith(out) and len(out) <= cut
    assert not any(PHRASE[:k] in out[cut - k:] for k in range(1, len(PHRASE)) if len(out) > cut - k)
    assert out  # text before the phrase did flow
    assert tail_kinds(events) == ["StreamStart", "Annotation", "Finish", "UsageEvent"]
    fin = [e for e in events if isinstance(e, Finish)]
    assert fin == [Finish("content_filter", 0)]
    ann = next(e for e in events if isinstance(e, Annotation)).data
    assert ann["policy"] == "t" and ann["action"] == "block"
    assert ann["steps"][0]["verdict"] == "flagged" and ann["steps"][0]["categories"] == ["bad"]
    assert not up.exhausted and up.closed  # the upstream was cancelled
    assert rec["action"] == "block" and rec["blocked_stage"] == "stream"
    assert rec["leaked_tokens"] == 0
    assert rec["steps"][0]["outcome"] == "block"
    usage = next(e for e in events if isinstance(e, UsageEvent)).usage
    assert usage.completion_tokens > 0  # our count: the upstream's usage never arrived


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cuts=st.lists(st.integers(min_value=1, max_value=len(LONG) - 1), max_size=60, unique=True),
       every=st.integers(min_value=1, max_value=40))
def test_strict_never_leaks_whatever_the_chunking(cuts: list[int], every: int):
    """Any split of the answer into deltas, any window size: no byte of the phrase gets out."""
    bounds = [0, *sorted(cuts), len(LONG)]
    deltas = [LONG[a:b] for a, b in itertools.pairwise(bounds)]
    up = FakeUpstream(deltas)
    events, rec, _ = asyncio.run(guarded(policy(REGEX_BLOCK, every=every), up))
    out = text_of(events)
    assert LONG.startswith(out) and len(out) <= LONG.index(PHRASE)
    assert events[-2] == Finish("content_filter", 0)
    assert rec["leaked_tokens"] == 0


async def test_loose_leak_is_counted_exactly_and_bounded():
    unchecked = 24
    up = FakeUpstream(tokens_of(LONG))
    pol = policy("""
    - guard: t_phrase
      phrase: forbidden phrase
      delay: 0.02
      action: block
""", every=16, unchecked=unchecked)
    events, rec, _ = await guarded(pol, up)
    out = text_of(events)
    assert LONG.startswith(out)
    assert events[-2] == Finish("content_filter", 0)
    start = rec["flagged_at"]
    assert start is not None and start <= LONG.index(PHRASE)
    independent = count_tokens(out[start:]) if len(out) > start else 0
    assert rec["leaked_tokens"] == independent
    assert 0 < rec["leaked_tokens"] <= unchecked + 1  # text ran ahead of the slow guard, within the bound


async def test_block_on_tool_call_arguments():
    deltas = ["Let me run it.", ToolCallDelta(call_index=0, id="call_1", name="shell", arguments="")]
    args = tokens_of('{"cmd": "ls; rm -rf / --no-preserve"}')
    deltas += [ToolCallDelta(call_index=0, arguments=a) for a in args]
    up = FakeUpstream(deltas)
    pol = policy("""
    - guard: regex
      patterns: ["rm\\\\s+-rf\\\\s+/"]
      action: block
""", every=4)
    events, rec, _ = await guarded(pol, up)
    assert "rm -rf" not in args_of(events) and "rm" not in args_of(events)[-3:]
    assert events[-2] == Finish("content_filter", 0)
    assert rec["action"] == "block"


async def test_multiple_choices_all_finish_on_block():
    deltas = []
    for i, tok in enumerate(tokens_of(LONG)):
        deltas.append(TextDelta(tok, index=0))
        deltas.append(TextDelta(tokens_of(BEFORE)[i % 50], index=1))
    up = FakeUpstream(deltas)
    events, _, _ = await guarded(policy(REGEX_BLOCK), up)
    finishes = [e for e in events if isinstance(e, Finish)]
    assert finishes == [Finish("content_filter", 0), Finish("content_filter", 1)]
    assert PHRASE not in text_of(events, 0)


# --------------------------------------------------------------------------- pass, shadow, warn, redact


async def test_clean_stream_passes_unchanged_with_annotation_before_finish():
    text = BEFORE + " " + AFTER
    up = FakeUpstream(tokens_of(text))
    events, rec, _ = await guarded(policy(REGEX_BLOCK), up)
    assert text_of(events) == text
    assert tail_kinds(events) == ["StreamStart", "Annotation", "Finish", "UsageEvent"]
    assert isinstance(events[0], StreamStart)
    assert events[-2] == Finish("stop", 0) and events[-1].usage.completion_tokens == 99  # upstream's usage
    assert rec["action"] == "allow" and rec["steps"][0]["verdict"] == "pass" and rec["leaked_tokens"] == 0
    assert rec["steps"][0]["checks"] > 1


async def test_shadow_changes_nothing_but_records_the_would_be_block():
    up = FakeUpstream(tokens_of(LONG))
    events, rec, _ = await guarded(policy(REGEX_BLOCK, mode="shadow"), up)
    assert text_of(events) == LONG
    assert not any(isinstance(e, Annotation) for e in events)
    assert events[-2] == Finish("stop", 0)
    assert up.exhausted
    assert rec["action"] == "allow" and rec["would_action"] == "block" and rec["mode"] == "shadow"
    assert rec["steps"][0]["verdict"] == "flagged" and rec["steps"][0]["would"] == "block"
    assert rec["steps"][0]["outcome"] is None
    start = rec["flagged_at"]
    assert rec["leaked_tokens"] == count_tokens(LONG[start:]) > 0


async def test_warn_continues_and_annotates():
    up = FakeUpstream(tokens_of(LONG))
    events, rec, _ = await guarded(policy(REGEX_BLOCK.replace("block", "warn")), up)
    assert text_of(events) == LONG and events[-2] == Finish("stop", 0)
    ann = next(e for e in events if isinstance(e, Annotation)).data
    assert ann["action"] == "warn" and ann["steps"][0]["action"] == "warn"
    assert rec["action"] == "warn" and rec["leaked_tokens"] == 0


async def test_log_records_only():
    up = FakeUpstream(tokens_of(LONG))
    events, rec, _ = await guarded(policy(REGEX_BLOCK.replace("block", "log")), up)
    assert text_of(events) == LONG
    assert rec["action"] == "log" and rec["steps"][0]["verdict"] == "flagged"


async def test_redact_replaces_every_match_and_continues():
    secret = "-----BEGIN RSA PRIVATE KEY-----"
    text = f"{BEFORE} key one {secret} and again {secret} done. {AFTER}"
    up = FakeUpstream(tokens_of(text))
    pol = policy("""
    - guard: regex
      patterns: ["-----BEGIN (RSA|OPENSSH) PRIVATE KEY-----"]
      action: redact
      notice: "[gone]"
""", every=8)
    events, rec, _ = await guarded(pol, up)
    assert text_of(events) == text.replace(secret, "[gone]")
    assert events[-2] == Finish("stop", 0)
    assert rec["action"] == "redact" and rec["leaked_tokens"] == 0


async def test_redact_after_release_counts_the_leak():
    """With a loose bound the secret may already be out when the verdict comes: that is leaked."""
    secret = "TOPSECRET"
    text = f"{BEFORE} {secret} {AFTER}"
    up = FakeUpstream(tokens_of(text))
    pol = policy("""
    - guard: t_phrase
      phrase: TOPSECRET
      delay: 0.05
      action: redact
""", every=200, unchecked=1000)
    events, rec, _ = await guarded(pol, up)
    out = text_of(events)
    assert secret in out  # released before the slow guard answered
    assert rec["leaked_tokens"] == count_tokens(secret)


# --------------------------------------------------------------------------- errors and timeouts


@pytest.mark.parametrize("guard", ["t_raise", "t_sleep"])
async def test_on_error_block(guard: str):
    up = FakeUpstream(tokens_of(LONG))
    pol = policy(f"""
    - guard: {guard}
      timeout_ms: 50
""")
    t0 = time.perf_counter()
    events, rec, _ = await guarded(pol, up)
    assert time.perf_counter() - t0 < 5  # the 50 ms timeout, not the 10 s t_sleep sleeps
    assert text_of(events) == ""
    assert events[-2] == Finish("content_filter", 0)
    step = rec["steps"][0]
    assert step["verdict"] == "error" and step["outcome"] == "block"
    assert ("timeout after 50 ms" if guard == "t_sleep" else "guard exploded") in step["error"]
    assert rec["action"] == "block"


@pytest.mark.parametrize("guard", ["t_raise", "t_sleep"])
async def test_on_error_allow(guard: str):
    up = FakeUpstream(tokens_of(BEFORE))
    pol = policy(f"""
    - guard: {guard}
      timeout: 20ms
      on_error: allow
""", every=64)
    events, rec, _ = await guarded(pol, up)
    assert text_of(events) == BEFORE and events[-2] == Finish("stop", 0)
    step = rec["steps"][0]
    assert step["verdict"] == "error" and step["outcome"] is None  # never recorded as a pass
    assert rec["action"] == "allow"


async def test_policy_level_on_error_default_applies_to_steps():
    pol = policy("""
    - guard: t_raise
""", extra="on_error: allow")
    assert pol.stream.steps[0].on_error == "allow"
    events, _, _ = await guarded(pol, FakeUpstream(["hi"]))
    assert text_of(events) == "hi"


async def test_upstream_error_propagates_and_holds_unchecked_text():
    up = FakeUpstream(tokens_of(BEFORE), fail_after=20)
    run = PolicyRun(policy(REGEX_BLOCK, every=64), request_id="r")
    got = []
    with pytest.raises(ConnectionError):
        async for ev in run.guard_stream(exchange(), up.events()):
            got.append(ev)
    assert text_of(got) == ""  # fewer than 64 tokens arrived: none of it was checked
    rec = run.finish(status=200)
    assert "upstream" in rec["error"]


# --------------------------------------------------------------------------- hold, flow, close


async def test_hold_from_keeps_an_open_block_until_it_closes():
    text = "Here is code:\n```python\nprint('hi')\nprint('there')\n```\nDone."
    toks = tokens_of(text)
    close_at = next(i for i in range(len(toks)) if "".join(toks[: i + 1]).count("```") == 2)
    up = FakeUpstream(toks, delay=0.003)
    pol = policy("""
    - guard: t_fence
""", every=1, unchecked=1000)
    run = PolicyRun(pol, request_id="r")
    seen_at: list[tuple[str, int]] = []
    async for ev in run.guard_stream(exchange(), up.events()):
        if isinstance(ev, TextDelta):
            seen_at.append((ev.text, up.produced))
    assert "".join(t for t, _ in seen_at) == text
    released_before_close = "".join(t for t, n in seen_at if n <= close_at)
    assert "print" not in released_before_close
    assert released_before_close.startswith("Here is code")


async def test_text_flows_while_a_slow_check_runs():
    """max_unchecked_tokens > 0: the first text is not held for the slow guard; with 0 it is.
    (Checked by order, not wall-clock: how many checks had answered when the first text came.)"""

    async def answered_at_first_text(unchecked: int) -> int:
        up = FakeUpstream(tokens_of(BEFORE), delay=0.002)
        pol = policy("""
    - guard: t_phrase
      delay: 0.3
""", every=4, unchecked=unchecked)
        guard = pol.stream.steps[0].guard
        run = PolicyRun(pol, request_id="r")
        agen = run.guard_stream(exchange(), up.events())
        try:
            async for ev in agen:
                if isinstance(ev, TextDelta):
                    return guard.answered
        finally:
            await agen.aclose()
        raise AssertionError("no text")

    assert await answered_at_first_text(64) == 0  # text flowed while the first check ran
    assert await answered_at_first_text(0) >= 1  # text waited for a verdict


async def test_stream_checks_closed_on_end_block_and_disconnect():
    OPENED.clear()
    await guarded(policy("    - guard: t_phrase\n      phrase: zzz\n"), FakeUpstream(tokens_of(BEFORE)))
    assert OPENED and all(c.closed for c in OPENED)

    OPENED.clear()
    pol = policy("    - guard: t_phrase\n      phrase: forbidden\n")
    _, rec, _ = await guarded(pol, FakeUpstream(tokens_of(LONG)))
    assert rec["action"] == "block" and OPENED and all(c.closed for c in OPENED)

    OPENED.clear()
    up = FakeUpstream(tokens_of(LONG), delay=0.001)
    pol = policy("    - guard: t_phrase\n      phrase: zzz\n", unchecked=8, every=4)
    run = PolicyRun(pol, request_id="r")
    agen = run.guard_stream(exchange(), up.events())
    async for _ in agen:
        if OPENED:  # a check is open (maybe running): now the client goes away
            break
    await agen.aclose()  # the client went away
    assert OPENED and all(c.closed for c in OPENED)
    assert up.closed and not up.exhausted
    assert run.finish(status=499, error="client_disconnected")["status"] == 499


async def test_disconnect_by_cancellation_closes_everything():
    OPENED.clear()
    up = FakeUpstream(tokens_of(LONG), delay=0.01)
    pol = policy("    - guard: t_phrase\n      phrase: zzz\n      delay: 0.5\n")
    guard = pol.stream.steps[0].guard
    run = PolicyRun(pol, request_id="r")

    async def consume():
        async for _ in run.guard_stream(exchange(), up.events()):
            pass

    task = asyncio.create_task(consume())
    assert await until(lambda: bool(guard.windows))  # a check is running (it answers only after 0.5 s)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert OPENED and all(c.closed for c in OPENED)
    assert up.closed and not up.exhausted
    rec = run.finish(status=499)
    assert rec["steps"][0]["cancelled"] >= 1


async def test_no_stream_steps_passes_through():
    pol = parse_policy_text("name: empty\n")
    assert not pol.needs_inspection and not pol.has_stream
    up = FakeUpstream(tokens_of(BEFORE))
    events, rec, _ = await guarded(pol, up)
    assert text_of(events) == BEFORE and events[-2] == Finish("stop", 0)
    assert rec["steps"] == [] and rec["action"] == "allow"

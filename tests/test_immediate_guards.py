"""Immediate guards (regex, hidden_unicode, pii, tools) run inline: no check task, no reader task,
no trip through the event loop; what arrived together is guarded as one piece and released as one
delta per run. Same verdicts and records as an awaited guard."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, ClassVar

import pytest
from policy_fakes import FakeUpstream, collect, text_of

from gateway.guards.base import Guard, GuardInput, ImmediateGuard, register
from gateway.policy.chain import PolicyRun
from gateway.policy.gate import StreamGate
from gateway.policy.schema import parse_policy_text
from gateway.types import Event, Exchange, Finish, Message, StreamStart, TextDelta, ToolCallDelta, Verdict

CALLS: list[str] = []


@register("t_now_raise")
class NowRaise(ImmediateGuard):
    """An immediate guard that fails: its step's `on_error` decides, as for any guard."""

    name: ClassVar[str] = "t_now_raise"

    def check_now(self, inp: GuardInput) -> Verdict:
        CALLS.append("t_now_raise")
        raise RuntimeError("scanner broke")


@register("t_now_flag")
class NowFlag(ImmediateGuard):
    name: ClassVar[str] = "t_now_flag"

    def check_now(self, inp: GuardInput) -> Verdict:
        CALLS.append("t_now_flag")
        return Verdict(guard=self.name, flagged="bad" in (inp.text or " ".join(m.text for m in inp.messages)))


@register("t_awaited")
class Awaited(Guard):  # a plain Guard: its checks are awaited
    name: ClassVar[str] = "t_awaited"

    async def check(self, inp: GuardInput) -> Verdict:
        CALLS.append("t_awaited")
        await asyncio.sleep(0)
        return Verdict(guard=self.name, flagged=False)


NEVER = "    - guard: regex\n      patterns: [never-matches-this]"
FORBIDDEN = "    - guard: regex\n      patterns: [forbidden]"


def _policy(stream: str = FORBIDDEN, inputs: str = NEVER) -> Any:
    return parse_policy_text(f"""
name: t
input:
  steps:
{inputs}
stream:
  check_every_tokens: 4
  steps:
{stream}
""")


def _ex() -> Exchange:
    return Exchange(model="m", messages=[Message.of("user", "hi")], stream=True)


async def _batches(*lists: list[Event]) -> AsyncIterator[list[Event]]:
    for b in lists:
        await asyncio.sleep(0)
        yield b


async def _run(pol: Any, *lists: list[Event]) -> tuple[list[list[Event]], StreamGate, dict[str, Any]]:
    await pol.start()
    run = PolicyRun(pol, request_id="r1")
    gen = run.guard_batches(_ex(), _batches(*lists))
    out = [b async for b in gen]
    return out, run.gates[-1][1], run.finish()


def test_only_immediate_guards_read_directly_and_a_model_guard_keeps_the_reader() -> None:
    pol = _policy()
    assert all(s.immediate for s in pol.stream.steps)
    gate = StreamGate(pol.stream.steps, {}, messages=[])
    assert gate.direct
    mixed = _policy(stream="    - guard: regex\n      patterns: [x]\n    - guard: t_awaited")
    assert not StreamGate(mixed.stream.steps, {}, messages=[]).direct


async def test_direct_gate_starts_no_task_and_releases_each_read_as_one_delta() -> None:
    words = [TextDelta(f"w{i} ") for i in range(12)]
    loop = asyncio.get_running_loop()
    made: list[Any] = []
    real = loop.create_task

    def spy(coro: Any, **kw: Any) -> Any:
        made.append(coro)
        return real(coro, **kw)

    loop.create_task = spy  # type: ignore[method-assign]
    try:
        out, gate, rec = await _run(_policy(), [StreamStart(id="c", model="m"), *words[:6]], words[6:],
                                    [Finish("stop")])
    finally:
        loop.create_task = real  # type: ignore[method-assign]
    assert made == [] and gate._reader is None
    flat = [e for b in out for e in b]
    assert "".join(e.text for e in flat if isinstance(e, TextDelta)) == "".join(w.text for w in words)
    # each read's six deltas went on as one piece and out as one delta: nothing was held back (every
    # read had more than check_every_tokens tokens, so each was checked at once)
    assert [len([e for e in b if isinstance(e, TextDelta)]) for b in out] == [1, 1, 0]
    assert rec["steps"][-1]["checks"] >= 2 and rec["action"] == "allow"


async def test_direct_gate_blocks_a_phrase_split_across_reads() -> None:
    up = FakeUpstream(["this is forb", "idden text", " and more"])
    pol = _policy()
    await pol.start()
    run = PolicyRun(pol, request_id="r1")
    events = await collect(run.guard_stream(_ex(), up.events()))
    assert "forbidden" not in text_of(events)
    assert [e.reason for e in events if isinstance(e, Finish)] == ["content_filter"]
    assert run.finish()["action"] == "block" and up.closed


async def test_an_immediate_guard_that_raises_is_an_error_verdict_never_a_pass() -> None:
    out, _, rec = await _run(_policy(stream="    - guard: t_now_raise"), [StreamStart(id="c", model="m"),
                                                                        TextDelta("hello there")], [Finish("stop")])
    flat = [e for b in out for e in b]
    assert "".join(e.text for e in flat if isinstance(e, TextDelta)) == ""
    assert [e.reason for e in flat if isinstance(e, Finish)] == ["content_filter"]
    step = rec["steps"][-1]
    assert step["errors"] == 1 and "scanner broke" in step["error"] and rec["action"] == "block"


async def test_tool_call_arguments_arriving_together_leave_as_one_fragment() -> None:
    calls = [ToolCallDelta(0, '{"a"', id="call_1", name="f"), ToolCallDelta(0, ': 1'), ToolCallDelta(0, "}")]
    out, _, _ = await _run(_policy(), [StreamStart(id="c", model="m"), *calls, Finish("tool_calls")])
    frags = [e for b in out for e in b if isinstance(e, ToolCallDelta)]
    assert "".join(f.arguments for f in frags) == '{"a": 1}'
    assert frags[0].id == "call_1" and frags[0].name == "f" and len(frags) <= 2


async def test_input_stage_asks_immediate_steps_first_and_skips_the_rest_once_one_blocks() -> None:
    CALLS.clear()
    pol = _policy(inputs="    - guard: t_awaited\n    - guard: t_now_flag\n    - guard: regex\n"
                         "      patterns: [never]")
    await pol.start()
    run = PolicyRun(pol, request_id="r1")
    decision = await run.check_input(Exchange(model="m", messages=[Message.of("user", "a bad request")]))
    assert decision.blocked and decision.step == "input[1]:t_now_flag"
    assert CALLS == ["t_now_flag"]  # the awaited step was never started
    rec = run.finish(status=400)
    by = {s["guard"]: s for s in rec["steps"] if s["stage"] == "input"}
    assert by["t_awaited"]["cancelled"] == 1 and by["regex"]["cancelled"] == 1
    assert by["t_now_flag"]["checks"] == 1


async def test_input_stage_runs_awaited_steps_when_immediate_ones_pass() -> None:
    CALLS.clear()
    pol = _policy(inputs="    - guard: t_awaited\n    - guard: t_now_flag")
    await pol.start()
    run = PolicyRun(pol, request_id="r1")
    decision = await run.check_input(Exchange(model="m", messages=[Message.of("user", "a fine request")]))
    assert not decision.blocked and CALLS == ["t_now_flag", "t_awaited"]
    run.finish()


@pytest.mark.parametrize("guard", ["regex", "hidden_unicode", "pii", "tools"])
def test_the_shipped_cpu_guards_are_immediate(guard: str) -> None:
    opts = {"regex": "\n      patterns: [x]", "tools": "\n      allow: [get_weather]"}.get(guard, "")
    pol = parse_policy_text(f"name: t\nstream:\n  steps:\n    - guard: {guard}{opts}\n")
    assert pol.stream.steps[0].immediate


# ---------------------------------------------------------------------------- through the server

PHRASE = "purple elephant protocol"
PIECES = [*(f"word{i} " for i in range(30)), "the pur", "ple eleph", "ant proto", "col is ", "done."]


def _regex_policy(tmp_path: Any) -> str:
    p = tmp_path / "p.yaml"
    p.write_text(f"""name: p
input:
  steps:
    - guard: regex
      patterns: ["{PHRASE}"]
stream:
  check_every_tokens: 8
  steps:
    - guard: regex
      patterns: ["{PHRASE}"]
""")
    return str(p)


@pytest.fixture
def direct_stack(make_stack: Any, tmp_path: Any) -> Any:
    """The uvloop server under a regex-only policy (the direct gate) and no audit log: the audit
    record is built after the answer's last byte, the answer itself is still checked first."""
    from harness import oa_completion, openai_text_stream, stream_frames

    async def handler(request: Any, up: Any) -> Any:
        if not up.last.json().get("stream"):
            from aiohttp import web

            return web.json_response(oa_completion("".join(PIECES)))
        return await stream_frames(request, openai_text_stream(PIECES), delay=0.001)

    from gateway.policy.chain import PolicyStore

    path = _regex_policy(tmp_path)
    return make_stack({"upstreams": {"main": {"base_url": "SCRIPTED", "dialect": "openai"}}, "policy": path},
                      handler=handler, policies=PolicyStore(required=[path]))


def test_direct_gate_through_the_server_never_lets_the_phrase_out(direct_stack: Any) -> None:
    import openai

    client = direct_stack.openai()
    msgs = [{"role": "user", "content": "tell me"}]
    done = client.chat.completions.create(model="m", messages=msgs)
    assert done.choices[0].finish_reason == "content_filter" and PHRASE not in (done.choices[0].message.content or "")
    chunks = list(client.chat.completions.create(model="m", messages=msgs, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert PHRASE not in text and text.startswith("word0 ")  # checked text before the phrase was released
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        ["content_filter"]
    seen = len(direct_stack.upstream.requests)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": f"the {PHRASE}"}])
    assert e.value.code == "content_filter" and len(direct_stack.upstream.requests) == seen  # never sent


"""The policy chain for one request: input steps, the stream gate, output steps, the audit record.

    run = PolicyRun(policy, request_id=..., route=..., dialect=..., model=..., key=..., audit=log)
    decision = await run.check_input(exchange)          # InputDecision; blocked → HTTP 400
    async for ev in run.guard_stream(exchange, events):  # the gate (neutral events in and out)
        ...
    completion = await run.check_output(exchange, completion)   # non-stream answers
    record = run.finish(status=200)                      # one audit record (written once)

Verdict merge (`record.merge_verdict`, the one rule the stream gate uses too): input steps run
concurrently; the first that blocks (flagged with action block, or failed with on_error block)
decides and the others are cancelled ("cancelled" in the record, verdict "not run" if they had not
answered). The strongest action over all stages is the request's `action` (block > redact > warn >
log > allow). Shadow mode never changes a request;
its records carry `would` and the request's `would_action`.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import time
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

from gateway.guards.base import GuardInput
from gateway.policy.content import ContentCheck, unchecked_images
from gateway.policy.content import check as content_check
from gateway.policy.gate import GateResult, StreamGate
from gateway.policy.record import StepRecord, merge_verdict, strongest
from gateway.policy.reload import PolicyStore
from gateway.policy.rewrite import Unmasker, apply_edits
from gateway.policy.schema import (
    Policy,
    PolicyError,
    Step,
    load_policy,
    parse_policy_text,
    run_step,
    run_step_now,
)
from gateway.types import (
    TEXT_CHANNELS,
    Annotation,
    Completion,
    Event,
    Exchange,
    Finish,
    Message,
    Part,
    TextDelta,
    TextEdit,
    ToolCall,
    ToolCallDelta,
    UsageEvent,
    Verdict,
    new_id,
)

__all__ = ["InputDecision", "Policy", "PolicyError", "PolicyRun", "PolicyStore", "load_policy",
           "parse_policy_text"]


@dataclass
class InputDecision:
    blocked: bool = False
    message: str = ""
    action: str = "allow"
    step: str | None = None  # label of the deciding step
    categories: list[str] = field(default_factory=list)
    verdicts: list[Verdict] = field(default_factory=list)
    # Set when input steps redacted: the request as it must go upstream (the client's one is unchanged).
    exchange: Exchange | None = None


class PolicyRun:
    """One request going through one policy. Not reusable; call `finish()` exactly once at the end."""

    def __init__(self, policy: Policy, *, request_id: str | None = None, route: str | None = None,
                 dialect: str | None = None, model: str | None = None, key: str | None = None,
                 audit: Any = None) -> None:
        self.policy = policy
        self.request_id = request_id or new_id("req_")
        self.route, self.dialect, self.model, self.key = route, dialect, model, key
        self.audit = audit
        self.started = time.perf_counter()
        self.at = _dt.datetime.now(_dt.UTC)  # written out in the record (`ts`), off the request's path
        self.records: dict[Step, StepRecord] = {
            s: StepRecord(stage=s.stage, index=s.index, guard=s.guard_name, action=s.action,
                          on_error=s.on_error, label=s.label)
            for s in policy.steps
        }
        self.action = "allow"
        self.would = "allow"
        self.blocked_stage: str | None = None
        self.input_decision: InputDecision | None = None
        self.gates: list[tuple[str, StreamGate]] = []
        self.content: dict[str, Any] = {}
        self.media: ContentCheck | None = None  # the `content:` rule's tally of media parts
        self._record: dict[str, Any] | None = None
        self._edits: list[tuple[TextEdit, str]] = []  # input redactions: (edit, replacement)
        self.restore: dict[str, str] = {}  # placeholder -> value, for `unmask` (never recorded)
        policy.acquire()

    # ------------------------------------------------------------------ input

    def check_content(self, exchange: Exchange) -> ContentCheck:
        """The policy's `content:` rule over the request's media parts (images, audio, files): the
        first refused part (the caller answers 400), and the tally the audit record keeps. In shadow
        mode a refusal is only recorded (`would_action: block`)."""
        res = content_check(self.policy.content, self.policy.name, exchange.messages)
        self.media = res
        if res.refused is not None:
            if self.policy.shadow:
                self.would = strongest(self.would, "block")
                res.refused = None
            else:
                self.action = "block"
                self.blocked_stage = "input"
        return res

    async def check_input(self, exchange: Exchange) -> InputDecision:
        """Run every input step concurrently; the first enforced block decides and cancels the rest."""
        self.content.setdefault("messages", _messages_record(exchange.messages))
        steps = self.policy.input.steps
        decision = InputDecision()
        self.input_decision = decision
        if not steps:
            return decision
        # Immediate steps (regex, pii, ...) answer inline, in order; the others run concurrently.
        for s in steps:
            if s.immediate and not decision.blocked:
                self._input_verdict(s, run_step_now(s, partial(s.guard.check_now, self._input(s, exchange))),
                                    decision)
        waiting = [s for s in steps if not s.immediate]
        if decision.blocked:  # what did not answer yet is not asked
            for s in [*waiting, *(s for s in steps if s.immediate and not self.records[s].checks)]:
                self.records[s].cancelled += 1
            waiting = []
        tasks = {asyncio.create_task(self._input_step(s, exchange)): s for s in waiting}
        pending = set(tasks)
        try:
            while pending and not decision.blocked:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for t in sorted(done, key=lambda t: tasks[t].index):
                    step, v = tasks[t], t.result()
                    self._input_verdict(step, v, decision)
        finally:
            for t in pending:
                t.cancel()
                self.records[tasks[t]].cancelled += 1
            if pending:
                await asyncio.wait(pending)
        if not decision.blocked and self.media is not None and self.media.images_guarded \
                and unchecked_images(decision.verdicts):
            self._images_unchecked(decision)
        if self._edits and not decision.blocked:
            decision.exchange = apply_edits(exchange, self._edits)
            # what the audit may keep of the conversation is what went upstream, never the masked values
            self.content["messages"] = _messages_record(decision.exchange.messages)
        return decision

    def upstream_exchange(self, exchange: Exchange) -> Exchange:
        """The request to send upstream: rewritten by the input stage's redactions, or `exchange`."""
        d = self.input_decision
        return d.exchange if d is not None and d.exchange is not None else exchange

    def unmask_completion(self, completion: Completion) -> Completion:
        """The answer with this request's placeholders restored (pii `unmask`), for the client."""
        return Unmasker(self.restore).completion(completion) if self.restore else completion

    def unmask_stream(self, events: AsyncIterator[Event]) -> AsyncIterator[Event]:
        """The released events with this request's placeholders restored, even when split across deltas."""
        return Unmasker(self.restore).stream(events) if self.restore else events

    def _images_unchecked(self, decision: InputDecision) -> None:
        """`images: guard`, and no step said it checked the images (a text-only backend answered)."""
        if self.policy.shadow:
            self.would = strongest(self.would, "block")
            return
        decision.blocked, decision.action = True, "block"
        self.action, self.blocked_stage = "block", "input"
        decision.message = (f"Request blocked by policy '{self.policy.name}': content.images is guard, but no "
                            "input step checked the images (is the llama_guard step's remote backend serving "
                            "a model that takes images?)")

    async def _input_step(self, step: Step, exchange: Exchange) -> Verdict:
        inp = self._input(step, exchange)
        return await run_step(step, lambda: step.guard.check(inp))

    def _input(self, step: Step, exchange: Exchange) -> GuardInput:
        context = {"model": exchange.model, "route": self.route, "key": self.key}
        if self.policy.content.images == "guard":
            context["images"] = "guard"  # llama_guard's remote backend then sends the images along
        return GuardInput(stage="input", messages=exchange.messages, request_id=self.request_id,
                          context=context, fields=request_fields(exchange))

    def _input_verdict(self, step: Step, v: Verdict, decision: InputDecision) -> None:
        decision.verdicts.append(v)
        # an input redact rewrites located spans; with nothing located the text must not go upstream as it is
        eff = merge_verdict(self.records[step], step, v, self, self.policy.shadow, redactable=bool(v.edits))
        if eff is None or self.policy.shadow:
            return
        decision.action = strongest(decision.action, eff)
        if eff == "redact":
            self._edits += [(e, step.notice if e.replacement is None else e.replacement) for e in v.edits]
            self.restore.update(v.restore)
        if eff == "block" and not decision.blocked:
            decision.blocked = True
            decision.step = step.label
            decision.categories = list(v.categories)
            self.blocked_stage = "input"
            if v.error is not None:
                decision.message = (f"Request blocked by policy '{self.policy.name}': guard "
                                    f"{step.guard_name} failed ({v.error}) and the policy blocks on "
                                    "guard errors")
            else:
                cats = f" ({', '.join(v.categories)})" if v.categories else ""
                decision.message = (f"Request blocked by policy '{self.policy.name}': "
                                    f"{step.guard_name} flagged the input{cats}")

    # ------------------------------------------------------------------ stream / output

    def guard_stream(self, exchange: Exchange, events: AsyncIterable[Event]) -> AsyncIterator[Event]:
        """The upstream's neutral events, guarded by the policy's stream steps (an async generator)."""
        return self._stream_gate(exchange).run(events)

    def guard_batches(self, exchange: Exchange,
                      batches: AsyncIterable[list[Event]]) -> AsyncGenerator[list[Event], None]:
        """As `guard_stream`, in lists: events in as they arrived together, each release out as one."""
        return self._stream_gate(exchange).batches(batches)

    def _stream_gate(self, exchange: Exchange) -> StreamGate:
        self.content.setdefault("messages", _messages_record(exchange.messages))
        sc = self.policy.stream
        gate = StreamGate(sc.steps, self.records, messages=exchange.messages, request_id=self.request_id,
                          check_every_tokens=sc.check_every_tokens,
                          max_unchecked_tokens=sc.max_unchecked_tokens, max_stall_ms=sc.max_stall_ms,
                          shadow=self.policy.shadow, annotate=self._annotate_stream)
        self.gates.append(("stream", gate))
        return gate

    async def check_output(self, exchange: Exchange, completion: Completion) -> Completion:
        """A non-stream answer through the output steps and, one-shot, the stream steps."""
        self.content.setdefault("messages", _messages_record(exchange.messages))
        steps = [*self.policy.output.steps, *self.policy.stream.steps]
        gate = StreamGate(steps, self.records, messages=exchange.messages, request_id=self.request_id,
                          shadow=self.policy.shadow, one_shot=True, annotate=self._annotate_stream)
        self.gates.append(("output", gate))
        out: list[Event] = [ev async for batch in gate.batches(_completion_events(completion)) for ev in batch]
        return _rebuild(completion, out)

    def _annotate_stream(self, res: GateResult) -> dict[str, Any] | None:
        if res.blocked and self.blocked_stage is None:
            self.blocked_stage = "stream" if self.gates and self.gates[-1][0] == "stream" else "output"
        return None if self.policy.shadow else self.annotation()

    def stream_block_message(self) -> str | None:
        """The policy's message for a stream its gate cut, when the policy ends such a stream with an
        error event (`on_stream_block: error`) rather than a `content_filter` finish; else None."""
        if self.policy.on_stream_block != "error" or self.policy.shadow:
            return None
        for stage, g in self.gates:
            r = g.summary
            if stage == "stream" and r.blocked:
                return (f"Response blocked by policy '{self.policy.name}': step {r.block_step} flagged the "
                        "answer and the stream was cut")
        return None

    # ------------------------------------------------------------------ decisions

    def final_action(self) -> tuple[str, str]:
        """(action taken, action the policy would take in enforce mode)."""
        action, would = self.action, self.would
        for _, g in self.gates:
            r = g.summary
            action = strongest(action, r.action)
            would = strongest(would, r.would)
        return action, strongest(action, would)

    def annotation(self) -> dict[str, Any]:
        """The in-band decision: rendered by the client's dialect on the final chunk / response."""
        action, _ = self.final_action()
        return {"policy": self.policy.name, "action": action,
                "steps": [r.summary() for r in self.records.values()]}

    def record(self, status: int = 200, error: str | None = None) -> dict[str, Any]:
        action, would = self.final_action()
        rec: dict[str, Any] = {
            "ts": self.at.isoformat(timespec="milliseconds").replace("+00:00", "Z"), "id": self.request_id,
            "route": self.route, "dialect": self.dialect,
            "model": self.model, "key": self.key, "policy": self.policy.name, "mode": self.policy.mode,
            "status": status, "error": error, "action": action, "blocked_stage": self.blocked_stage,
        }
        if self.policy.shadow:
            rec["would_action"] = would
        rec["steps"] = [r.to_record() for r in self.records.values()]
        leaked = released = 0
        flagged_at = None
        for stage, g in self.gates:
            r = g.result()
            leaked += r.leaked_tokens
            released += r.released_tokens
            if flagged_at is None and r.flagged_at is not None:
                flagged_at = r.flagged_at
            if r.error and not rec["error"]:
                rec["error"] = r.error
            if r.released_text:
                self.content.setdefault("released", {})[stage] = r.released_text.get(0, "")
            if r.after_finish:  # text the upstream sent after a choice's finish: never released
                af = rec.setdefault("after_finish", {})
                for i, n in r.after_finish.items():
                    af[str(i)] = af.get(str(i), 0) + n
        rec["leaked_tokens"] = leaked
        rec["released_tokens"] = released
        rec["flagged_at"] = flagged_at
        if self.gates:
            sc = self.policy.stream
            rec["stream"] = {"check_every_tokens": sc.check_every_tokens,
                             "max_unchecked_tokens": sc.max_unchecked_tokens,
                             "checks": sum(g.summary.checks for _, g in self.gates)}
        if self.media is not None and self.media.tally:
            rec["media"] = self.media.tally  # per kind: rule, count, bytes, by_reference, inspected
        rec["latency_ms"] = round((time.perf_counter() - self.started) * 1000, 3)
        if self.content:
            rec["content"] = self.content
        return rec

    def finish(self, status: int = 200, error: str | None = None) -> dict[str, Any]:
        """Build the audit record, write it once (when an audit log is set), release the policy."""
        if self._record is not None:
            return self._record
        self._record = self.record(status, error)
        self.policy.release()
        if self.audit is not None:
            self.audit.write(self._record)
        return self._record


# --------------------------------------------------------------------------- helpers


def _messages_record(messages: list[Message]) -> list[dict[str, Any]]:
    return [{"role": m.role, "content": m.text} for m in messages]


async def _completion_events(c: Completion) -> AsyncIterator[list[Event]]:
    """A non-stream answer as the gate reads it, in one list: per choice, each text channel's parts,
    the tool calls, then each `Attached` text (channel "@<n>", a segment guards see and no client does)."""
    out: list[Event] = []
    for ch in c.choices:
        i = ch.index
        for p in ch.message.parts:
            if p.type in TEXT_CHANNELS and p.text:
                out.append(TextDelta(p.text, i, p.type))
        for k, tc in enumerate(ch.message.tool_calls):
            out.append(ToolCallDelta(call_index=k, id=tc.id, name=tc.name, arguments=tc.arguments, index=i))
        for k, a in enumerate(ch.attached):
            if a.text:
                out.append(TextDelta(a.text, i, f"@{k}"))
        out.append(Finish(ch.finish_reason, i))
    if c.usage is not None:
        out.append(UsageEvent(c.usage))
    yield out


def _channel_texts(parts: list[Part]) -> dict[str, str]:
    out: dict[str, str] = {}
    for p in parts:
        if p.type in TEXT_CHANNELS:
            out[p.type] = out.get(p.type, "") + p.text
    return out


def _rebuild(c: Completion, events: list[Event]) -> Completion:
    """The completion as the gate released it, choice by choice (redacted, or emptied and finished
    `content_filter` when blocked). Text channels keep their order; an `Attached` value survives only
    when its own text and every channel it derives from came out verbatim (see `types.Attached`)."""
    released: dict[int, dict[str, list[str]]] = {}
    calls: dict[int, dict[int, ToolCall]] = {}
    finishes: dict[int, str] = {}
    ann = None
    for ev in events:
        if isinstance(ev, TextDelta):
            released.setdefault(ev.index, {}).setdefault(ev.channel, []).append(ev.text)
        elif isinstance(ev, ToolCallDelta):
            tc = calls.setdefault(ev.index, {}).setdefault(ev.call_index, ToolCall(id=ev.id or "", name=ev.name or ""))
            tc.arguments += ev.arguments
        elif isinstance(ev, Finish):
            finishes[ev.index] = ev.reason
        elif isinstance(ev, Annotation):
            ann = ev.data
    choices = []
    for ch in c.choices:
        out = {k: "".join(v) for k, v in released.get(ch.index, {}).items()}
        before = _channel_texts(ch.message.parts)
        finish = finishes.get(ch.index, ch.finish_reason)
        blocked = finish == "content_filter" and ch.finish_reason != "content_filter"
        msg = ch.message
        got = calls.get(ch.index, {})
        tools_same = len(got) == len(msg.tool_calls) and all(
            got[k].arguments == tc.arguments for k, tc in enumerate(msg.tool_calls) if k in got)
        if any(out.get(k, "") != v for k, v in before.items()) or not tools_same:
            parts: list[Part] = []
            seen: set[str] = set()
            for p in msg.parts:
                if p.type not in TEXT_CHANNELS:
                    parts.append(p)
                elif p.type not in seen:
                    seen.add(p.type)
                    if out.get(p.type):
                        parts.append(Part(p.type, out[p.type]))  # type: ignore[arg-type]
            msg = replace(msg, parts=parts, tool_calls=msg.tool_calls if tools_same else [got[k] for k in sorted(got)])
        attached = [a for k, a in enumerate(ch.attached)
                    if not blocked and out.get(f"@{k}", "") == a.text
                    and all(out.get(x, "") == before.get(x, "") for x in a.channels)]
        choices.append(replace(ch, message=msg, finish_reason=finish, attached=attached))
    extra = dict(c.extra)
    if ann is not None:
        extra["guardgate"] = ann
    return replace(c, choices=choices, extra=extra)


# Exchange.params keys whose values carry text the model is shown (tool_choice, n, stop, ... do not).
_RENDERED_PARAMS = ("tools", "response_format")


def request_fields(exchange: Exchange) -> list[tuple[str, str]]:
    """(path, text) of every string the upstream may render to the model besides the messages: tool
    definitions (names, descriptions, parameter schemas), the response_format schema, and every
    string in fields the gateway has no neutral slot for (`documents`, `chat_template_kwargs`, ...).
    Input guards see these (GuardInput.fields), so an instruction hidden in a tool description is not
    invisible to them."""
    out: list[tuple[str, str]] = []

    def walk(path: str, value: Any) -> None:
        if isinstance(value, str):
            if value.strip():
                out.append((path, value))
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{path}.{k}", v)
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(f"{path}[{i}]", v)

    for key in _RENDERED_PARAMS:
        if key in exchange.params:
            walk(key, exchange.params[key])
    for key, value in exchange.extra.items():
        walk(key, value)
    return out

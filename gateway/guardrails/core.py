"""One check: a conversation (input stage) or an answer (output stage) through a policy's chain.

This is what every face of the check API calls. It runs the same `PolicyRun` as the proxy
(`gateway.policy.chain`): the input steps concurrently, first block wins; the answer through the
output steps and, one-shot, the stream steps; one audit record per check, written once, and the
same metrics (`Telemetry.record_audit`). A face owns no guard logic: it decodes its caller's shape
into `Message`s, calls `check_input` / `check_output`, and encodes the `Outcome` back.
"""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from gateway.policy.chain import PolicyRun
from gateway.types import Choice, Completion, Exchange, Message, ToolCall, new_id

T = TypeVar("T")


@dataclass(slots=True)
class Outcome:
    """What a policy decided about one check."""

    stage: str  # "input" | "output"
    action: str  # block | redact | warn | log | allow (what the policy did; shadow mode: allow)
    would_action: str  # what it would do in enforce mode (= action outside shadow mode)
    blocked: bool
    message: str  # why it was blocked ("" otherwise): the text a caller shows its client
    categories: list[str]
    flagged: list[dict[str, Any]]  # the steps that flagged or failed: step, guard, verdict, score, categories
    steps: list[dict[str, Any]]  # every step of the stage, as the audit record has it
    record: dict[str, Any]  # the audit record
    # Input stage: the conversation as it may go upstream (redacted), None when unchanged.
    messages: list[Message] | None = None
    # Output stage: each answer as the policy released it (redacted, or emptied when blocked).
    answers: list[Message] = field(default_factory=list)
    changed: bool = False  # some text was rewritten

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.record.get("id"),
            "policy": self.record.get("policy"),
            "stage": self.stage,
            "action": self.action,
            "blocked": self.blocked,
        }
        if self.would_action != self.action:
            out["would_action"] = self.would_action
        if self.message:
            out["message"] = self.message
        out["categories"] = self.categories
        out["flagged"] = self.flagged
        out["steps"] = self.steps
        return out


class Audit:
    """The audit log as a face sees it: each record carries which face asked and the caller's ids."""

    __slots__ = ("extra", "log")

    def __init__(self, log: Any, extra: dict[str, Any]) -> None:
        self.log, self.extra = log, extra

    def write(self, record: dict[str, Any]) -> None:
        record.update(self.extra)
        if self.log is not None:
            self.log.write(record)


def _flagged(steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    keep = ("step", "guard", "verdict", "outcome", "would", "score", "categories", "reason", "error")
    return [
        {k: s[k] for k in keep if s.get(k) not in (None, [], "")}
        for s in steps
        if s.get("verdict") in ("flagged", "error")
    ]


def _stage_steps(record: dict[str, Any], stages: tuple[str, ...]) -> list[dict[str, Any]]:
    return [s for s in record.get("steps", []) if s.get("stage") in stages]


def _categories(steps: list[dict[str, Any]]) -> list[str]:
    out: list[str] = []
    for s in steps:
        for c in s.get("categories", []):
            if c not in out:
                out.append(c)
    return out


def _run(
    policy: Any, request_id: str | None, route: str, face: str, model: str | None, key: str | None, audit: Audit
) -> PolicyRun:
    return PolicyRun(
        policy, request_id=request_id or new_id("chk_"), route=route, dialect=face, model=model, key=key, audit=audit
    )


async def _finished(run: Any, check: Awaitable[T], telemetry: Any) -> tuple[T, dict[str, Any]]:
    """Await one stage's check, then finish the run: its audit record (status 500 and the error's type
    when the check raised, which then propagates) and its metrics."""
    try:
        result = await check
    except BaseException as e:
        _finish(run, 500, type(e).__name__, telemetry)
        raise
    return result, _finish(run, 200, None, telemetry)


def _finish(run: Any, status: int, error: str | None, telemetry: Any) -> dict[str, Any]:
    record = run.finish(status=status, error=error)
    if telemetry is not None:
        telemetry.record_audit(record)
    return record


async def check_input(
    policy: Any,
    messages: list[Message],
    *,
    fields: dict[str, Any] | None = None,
    model: str | None = None,
    request_id: str | None = None,
    route: str = "",
    face: str = "",
    key: str | None = None,
    audit: Audit,
    telemetry: Any = None,
) -> Outcome:
    """The input stage on a conversation. `fields`: request fields besides the messages that the
    model is shown (tool definitions...), which input guards read too (`chain.request_fields`)."""
    run = _run(policy, request_id, route, face, model, key, audit)
    ex = Exchange(model=model or "", messages=messages, extra=dict(fields or {}))
    decision, record = await _finished(run, run.check_input(ex), telemetry)
    redacted = decision.exchange.messages if decision.exchange is not None and not decision.blocked else None
    steps = _stage_steps(record, ("input",))
    action = record["action"]
    return Outcome(
        stage="input",
        action=action,
        would_action=record.get("would_action", action),
        blocked=decision.blocked,
        message=decision.message,
        categories=_categories(steps),
        flagged=_flagged(steps),
        steps=steps,
        record=record,
        messages=redacted,
        changed=redacted is not None,
    )


async def check_output(
    policy: Any,
    answers: list[Message],
    *,
    context: list[Message] | None = None,
    model: str | None = None,
    request_id: str | None = None,
    route: str = "",
    face: str = "",
    key: str | None = None,
    audit: Audit,
    telemetry: Any = None,
) -> Outcome:
    """The output stage (output steps, then the stream steps one-shot) on one or more answers (choices),
    with the conversation that led to them as context when the caller has it."""
    run = _run(policy, request_id, route, face, model, key, audit)
    ex = Exchange(model=model or "", messages=list(context or []))
    answer = Completion(
        id=run.request_id,
        model=model or "",
        choices=[
            Choice(m, "tool_calls" if m.tool_calls and not m.text else "stop", i)
            for i, m in enumerate(answers or [Message("assistant")])
        ],
    )
    released, record = await _finished(run, run.check_output(ex, answer), telemetry)
    steps = _stage_steps(record, ("output", "stream"))
    blocked = any(c.finish_reason == "content_filter" for c in released.choices)
    out = [c.message for c in released.choices]
    changed = any(_text(a) != _text(b) or _calls(a) != _calls(b) for a, b in zip(out, answers, strict=False))
    message = ""
    if blocked:
        deciding = next((s for s in steps if s.get("outcome") == "block"), None)
        cats = deciding.get("categories") if deciding else None
        who = f"{deciding['guard']} flagged the answer" if deciding else "the answer was blocked"
        message = f"Response blocked by policy '{policy.name}': {who}" + (f" ({', '.join(cats)})" if cats else "")
    action = record["action"]
    return Outcome(
        stage="output",
        action=action,
        would_action=record.get("would_action", action),
        blocked=blocked,
        message=message,
        categories=_categories(steps),
        flagged=_flagged(steps),
        steps=steps,
        record=record,
        answers=out,
        changed=changed,
    )


def refuse(
    policy: Any,
    stage: str,
    reason: str,
    *,
    request_id: str | None = None,
    route: str = "",
    face: str = "",
    key: str | None = None,
    audit: Audit,
    telemetry: Any = None,
) -> Outcome:
    """A check the face could not run because it cannot read what it was given (deny by default):
    audited as a block of that stage with error `unreadable`, no step run."""
    run = _run(policy, request_id, route, face, None, key, audit)
    run.action = "block"
    run.blocked_stage = stage
    record = run.finish(status=200, error="unreadable")
    if telemetry is not None:
        telemetry.record_audit(record)
    steps = _stage_steps(record, ("input",) if stage == "input" else ("output", "stream"))
    return Outcome(
        stage=stage,
        action="block",
        would_action="block",
        blocked=True,
        message=reason,
        categories=[],
        flagged=[],
        steps=steps,
        record=record,
    )


def _text(m: Message) -> str:
    return "\x00".join(p.text for p in m.parts if p.type == "text")


def _calls(m: Message) -> list[tuple[str, str]]:
    return [(c.name, c.arguments) for c in m.tool_calls]


def answer_message(text: str | None, calls: list[ToolCall] | None = None) -> Message:
    """An assistant answer from its text and tool calls."""
    from gateway.types import Part

    return Message("assistant", [Part("text", text)] if text else [], tool_calls=list(calls or []))

"""What a policy run remembers about each step: the raw material of the audit record and the annotation.

A `StepRecord` aggregates every verdict one step produced during one request (a stream step may
check many windows). A step that produced no verdict is recorded as "not run", never as a pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from gateway.types import ACTION_RANK, Verdict, strongest

# Called with (stage, step label, verdict) for every verdict as it arrives. The policy code reports
# through it and never imports telemetry; the server sets it to `telemetry.observe_verdict`.
VerdictListener = Callable[[str, str, Verdict], None]
_listeners: list[VerdictListener] = []


def on_verdict(listener: VerdictListener) -> None:
    """Report every verdict to `listener` from now on (idempotent)."""
    if listener not in _listeners:
        _listeners.append(listener)

Action = Literal["block", "redact", "warn", "log"]
ACTIONS: tuple[str, ...] = ("block", "redact", "warn", "log")


def flagged_action(step_action: str, verdict: Any) -> str | None:
    """What a flagged verdict does: the step's action, unless the guard maps this finding itself
    (e.g. CodeShield's `severity_actions`: details["action"] = block | redact | warn | log | ignore)."""
    if not verdict.flagged:
        return None
    own = verdict.details.get("action") if isinstance(verdict.details, dict) else None
    if own in ACTIONS:
        return own
    if own in ("ignore", "allow"):
        return None
    return step_action


class Tally(Protocol):
    """Where a run keeps the strongest action so far: taken (enforce) and would-have-taken (shadow)."""

    action: str
    would: str


def merge_verdict(rec: StepRecord, step: Any, v: Verdict, into: Tally, shadow: bool, *,
                  redactable: bool = True) -> str | None:
    """The one rule from a step's verdict to an action, for every stage (the input stage, the stream
    gate, a non-stream answer). The verdict is recorded; an error blocks under `on_error: block` (under
    `allow` it is counted and changes nothing); a flag takes the guard's own action or the step's
    (`flagged_action`), and a `redact` that is not `redactable` (nothing located to rewrite) blocks.
    The action is noted on the record and folded into `into` (`action`, or `would` in shadow mode).
    Returns it (None: the verdict changes nothing)."""
    rec.add(v)
    if v.error is not None:
        if step.on_error != "block":
            rec.allowed_errors += 1
            return None
        eff: str | None = "block"
    else:
        eff = flagged_action(step.action, v)
        if eff is None:
            return None
        if eff == "redact" and not redactable:
            eff = "block"
    rec.note(eff, shadow)
    if shadow:
        into.would = strongest(into.would, eff)
    else:
        into.action = strongest(into.action, eff)
    return eff


@dataclass(slots=True)
class StepRecord:
    """Everything one step said during one request."""

    stage: str
    index: int
    guard: str
    action: str  # the configured action
    on_error: str
    label: str = ""
    checks: int = 0
    flagged_checks: int = 0
    errors: list[str] = field(default_factory=list)
    cancelled: int = 0
    score: float | None = None  # max over checks
    categories: list[str] = field(default_factory=list)
    latency_ms: float = 0.0
    max_latency_ms: float = 0.0
    tokens_evaluated: int = 0
    reason: str = ""
    outcome: str | None = None  # what the step made happen: block | redact | warn | log (None: nothing)
    would: str | None = None  # shadow mode: what it would have made happen
    allowed_errors: int = 0  # errors let through by on_error: allow
    first_flag: dict[str, Any] | None = None  # details of the first flagged verdict
    details: dict[str, Any] | None = None  # the guard's own details: first flagged verdict, else the latest
    # per-piece reports (details["blocks"]: CodeShield's code blocks, with each block's findings and
    # tier-2 state) of every check, in order: a stream step checks many windows, each reports its own
    blocks: list[Any] = field(default_factory=list)

    def add(self, v: Verdict) -> None:
        label = self.label or f"{self.stage}[{self.index}]"
        for listener in _listeners:
            listener(self.stage, label, v)
        self.checks += 1
        self.latency_ms += v.latency_ms
        self.max_latency_ms = max(self.max_latency_ms, v.latency_ms)
        self.tokens_evaluated += v.tokens_evaluated
        if v.details and isinstance(v.details.get("blocks"), list):
            self.blocks.extend(v.details["blocks"])
        if v.error is not None:
            self.errors.append(v.error)
            if v.details and not self.flagged_checks:
                self.details = v.details  # why it failed, where the guard says (e.g. per block)
            return
        if v.score is not None:
            self.score = v.score if self.score is None else max(self.score, v.score)
        if v.details and not self.flagged_checks:
            self.details = v.details
        if v.flagged:
            self.flagged_checks += 1
            for c in v.categories:
                if c not in self.categories:
                    self.categories.append(c)
            if self.first_flag is None:
                self.reason = v.reason
                self.first_flag = {k: val for k, val in (("span", v.span), ("reason", v.reason)) if val}

    def note(self, outcome: str, shadow: bool) -> None:
        """Remember the strongest action this step caused (or would have caused, in shadow mode)."""
        if shadow:
            self.would = strongest(self.would, outcome) if outcome in ACTION_RANK else self.would
        else:
            self.outcome = strongest(self.outcome, outcome)

    @property
    def verdict(self) -> str:
        if self.checks == 0:
            return "not run"
        if self.flagged_checks:
            return "flagged"
        if self.errors:
            return "error"
        return "pass"

    def to_record(self) -> dict[str, Any]:
        rec: dict[str, Any] = {
            "stage": self.stage,
            "step": self.label or f"{self.stage}[{self.index}]",
            "guard": self.guard,
            "verdict": self.verdict,
            "action": self.action,
            "outcome": self.outcome,
            "score": self.score,
            "categories": list(self.categories),
            "latency_ms": round(self.latency_ms, 3),
            "checks": self.checks,
            "tokens_evaluated": self.tokens_evaluated,
        }
        if self.would is not None:
            rec["would"] = self.would
        if self.checks > 1:
            rec["max_latency_ms"] = round(self.max_latency_ms, 3)
        if self.errors:
            rec["error"] = self.errors[0]
            rec["errors"] = len(self.errors)
            rec["on_error"] = self.on_error
        if self.cancelled:
            rec["cancelled"] = self.cancelled
        if self.reason:
            rec["reason"] = self.reason
        if self.first_flag and self.first_flag.get("span"):
            rec["span"] = list(self.first_flag["span"])
        if self.details:
            rec["details"] = self.details
        if self.blocks:
            rec["blocks"] = self.blocks
        return rec

    def summary(self) -> dict[str, Any]:
        """The short form that travels in-band to the client."""
        s: dict[str, Any] = {"stage": self.stage, "guard": self.guard, "verdict": self.verdict}
        if self.outcome:
            s["action"] = self.outcome
        if self.categories:
            s["categories"] = list(self.categories)
        if self.score is not None:
            s["score"] = round(self.score, 4)
        return s

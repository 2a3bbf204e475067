"""Each labelled record through the real policy chain (`PolicyRun`), as `guardgate check` runs it.

The policy runs in shadow mode whatever its file says: an enforced input block would cancel the
other input steps and skip the answer, so their figures would depend on step order. In shadow
mode every step judges every record it applies to, and the policy's decision is its would-be
action (`would_action`), which is what enforce mode would have done.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gateway.check import _token_stream
from gateway.evaluation.dataset import Record
from gateway.policy.chain import PolicyRun
from gateway.policy.schema import Policy
from gateway.types import Completion, Exchange, Message

DEFAULT_POSITIVE_ACTIONS = ("block", "redact")


def progress(total: int, desc: str) -> Any:
    """A records bar on stderr when it is a terminal (public sets run minutes with real models)."""
    import sys

    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="rec", file=sys.stderr, disable=not sys.stderr.isatty(),
                dynamic_ncols=True, mininterval=0.5)


@dataclass(slots=True)
class StepResult:
    """What one step said about one record (from the audit record's step entry)."""

    label: str
    stage: str
    guard: str
    verdict: str  # pass | flagged | error | not run
    score: float | None
    categories: list[str]
    latency_ms: float  # the step's total over its checks of this record
    checks: int
    would: str | None  # the action the step would have taken

    @property
    def judged(self) -> bool:
        """A verdict that counts: the step ran and did not fail."""
        return self.verdict in ("pass", "flagged")


@dataclass(slots=True)
class Result:
    """One record's outcome: the label, the policy's would-be action, every step's verdict."""

    record: Record
    action: str  # the action enforce mode would have taken (block > redact > warn > log > allow)
    positive: bool  # the policy caught it: action in the positive actions
    latency_ms: float
    steps: dict[str, StepResult] = field(default_factory=dict)
    error: str | None = None  # `--via`: the request failed (no verdict: counted in errors, in no cell)
    policy: str = ""  # the policy (column) it ran under, when several are compared

    def to_json(self) -> dict[str, Any]:
        r = self.record
        extra = {"policy": self.policy} if self.policy else {}
        extra |= {"dataset": r.dataset} if r.dataset else {}
        extra |= {"error": self.error} if self.error else {}
        extra |= {"meta": r.meta} if r.meta else {}
        return {**extra, "line": r.line, "id": r.id, "label": "unsafe" if r.unsafe else "safe", "category": r.category,
                "expected_step": r.step, "action": self.action, "caught": self.positive,
                "latency_ms": round(self.latency_ms, 3),
                "steps": [{"step": s.label, "stage": s.stage, "guard": s.guard, "verdict": s.verdict,
                           "score": s.score, "categories": s.categories, "would": s.would,
                           "latency_ms": s.latency_ms, "checks": s.checks} for s in self.steps.values()]}


async def run_record(policy: Policy, rec: Record, stream: bool, positive_actions: tuple[str, ...]) -> Result:
    """One record: messages through the input stage, the response through the output/stream gate."""
    run = PolicyRun(policy, request_id=rec.id, route="eval", model=rec.model)
    ex = Exchange(model=rec.model, messages=rec.messages, stream=stream)
    if rec.messages:
        await run.check_input(ex)
    if rec.response is not None:
        if stream:
            async for _ in run.guard_stream(ex, _token_stream(rec.response, rec.model)):
                pass
        else:
            answer = Completion(id=rec.id, model=rec.model, message=Message.of("assistant", rec.response))
            await run.check_output(ex, answer)
    audit = run.finish(status=200)
    action = str(audit.get("would_action") or audit.get("action") or "allow")
    steps: dict[str, StepResult] = {}
    for s in audit["steps"]:
        steps[s["step"]] = StepResult(label=s["step"], stage=s["stage"], guard=s["guard"], verdict=s["verdict"],
                                      score=s.get("score"), categories=list(s.get("categories") or []),
                                      latency_ms=float(s.get("latency_ms") or 0.0), checks=int(s.get("checks") or 0),
                                      would=s.get("would"))
    return Result(record=rec, action=action, positive=action in positive_actions,
                  latency_ms=float(audit.get("latency_ms") or 0.0), steps=steps)


async def run_all(policy: Policy, records: list[Record], stream: bool = False,
                  positive_actions: tuple[str, ...] = DEFAULT_POSITIVE_ACTIONS) -> list[Result]:
    """Every record in order, one at a time (so each latency is the step's own, not a queue's).
    One throw-away record first: the first run pays one-off costs (the tokenizer, lazy imports,
    model warm-up) that would otherwise land on the dataset's first record and its p99. Its text
    is in no dataset, so no guard cache serves a real record from it."""
    policy.mode = "shadow"
    await policy.start()
    try:
        warm = Record(line=0, id="warm-up", unsafe=False, category="-", step=None,
                      messages=[Message.of("user", "guardgate eval warm-up")], response="warm-up answer")
        await run_record(policy, warm, stream, positive_actions)
        with progress(len(records), policy.name) as bar:
            out = []
            for r in records:
                out.append(await run_record(policy, r, stream, positive_actions))
                bar.update(1)
            return out
    finally:
        await policy.aclose()

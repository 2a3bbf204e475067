"""Results → `summary.json`: the policy as a whole, each step, each category, each scored step's
threshold sweep; and the `--fail-if` gates CI reads it with.

Who is charged with what:
  policy    every record; caught when its would-be action is a positive action (block, redact).
  step      the records the step judged (ran without error): safe ones, and unsafe ones that name
            no expected `step` or name this one (by label or guard name). An unsafe record meant for
            another step is not this step's miss. Guard errors are counted apart (`errors`).
  category  the policy's figures over the records of that category; per step the same split.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from typing import Any

from gateway.evaluation.metrics import Confusion, sweep, threshold_for
from gateway.evaluation.runner import Result
from gateway.policy.schema import Policy, Step

METRICS = ("recall", "fpr", "precision", "f1", "accuracy", "p50_ms", "p99_ms", "tp", "fp", "tn", "fn", "errors", "n")
OPS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge, "==": operator.eq,
       "!=": operator.ne}
GATE_RX = re.compile(r"^\s*(?P<metric>[a-z0-9_]+)\s*(?:\[(?P<scope>[^\]]*)\])?"
                     r"\s*(?P<op><=|>=|==|!=|<|>)\s*(?P<value>[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?)\s*$")
SCOPE_KEYS = ("step", "category", "dataset", "policy")


def step_threshold(step: Step) -> float | None:
    """The configured score threshold of a scored guard (Prompt Guard, Llama Guard), if any."""
    t = step.options.get("threshold", getattr(step.guard, "threshold", None))
    try:
        return None if t is None or isinstance(t, bool) else float(t)
    except (TypeError, ValueError):
        return None


def applies(step: Step, expected: str | None) -> bool:
    return expected is None or expected in (step.label, step.guard_name)


def summarise(policy: Policy, results: list[Result], *, dataset: str, stream: bool,
              positive_actions: tuple[str, ...], target_fpr: float) -> dict[str, Any]:
    overall = Confusion()
    by_cat: dict[str, Confusion] = {}
    for r in results:
        cat = by_cat.setdefault(r.record.category, Confusion())
        if r.error is not None:  # `--via`: the request failed, so the client saw no verdict
            overall.errors += 1
            cat.errors += 1
            continue
        overall.add(r.record.unsafe, r.positive, r.latency_ms)
        cat.add(r.record.unsafe, r.positive, r.latency_ms)
    steps: list[dict[str, Any]] = []
    sweeps: list[dict[str, Any]] = []
    for step in policy.steps:
        conf = Confusion()
        cats: dict[str, Confusion] = {}
        points: list[tuple[float | None, bool]] = []
        not_run = 0
        for r in results:
            sr = r.steps.get(step.label)
            if sr is None or not applies(step, r.record.step if r.record.unsafe else None):
                continue
            if sr.verdict == "error":
                conf.errors += 1
                cats.setdefault(r.record.category, Confusion()).errors += 1
                continue
            if not sr.judged:
                not_run += 1
                continue
            flagged = sr.verdict == "flagged"
            conf.add(r.record.unsafe, flagged, sr.latency_ms)
            cats.setdefault(r.record.category, Confusion()).add(r.record.unsafe, flagged, sr.latency_ms)
            points.append((sr.score, r.record.unsafe))
        threshold = step_threshold(step)
        scored = threshold is not None or any(s is not None and 0.0 < s < 1.0 for s, _ in points)
        steps.append({"step": step.label, "stage": step.stage, "guard": step.guard_name, "action": step.action,
                      "scored": scored, "threshold": threshold, "not_run": not_run, **conf.to_dict(),
                      "categories": {c: v.to_dict() for c, v in sorted(cats.items())}})
        if scored:
            pts = sweep(points)
            sweeps.append({"step": step.label, "guard": step.guard_name, "threshold": threshold,
                           "target_fpr": target_fpr, "at_target": threshold_for(pts, target_fpr), "points": pts})
    known = {s.label for s in policy.steps} | {s.guard_name for s in policy.steps}
    unmatched = sorted({r.record.step for r in results if r.record.step and r.record.step not in known})
    return {
        "policy": policy.name, "dataset": dataset, "stream": stream, "records": len(results),
        "unsafe": sum(1 for r in results if r.record.unsafe), "safe": sum(1 for r in results if not r.record.unsafe),
        "positive_actions": list(positive_actions), "target_fpr": target_fpr,
        "overall": overall.to_dict(),
        "categories": {c: v.to_dict() for c, v in sorted(by_cat.items())},
        "steps": steps, "sweeps": sweeps, "unmatched_expected_steps": unmatched,
        "latencies_ms": {"policy": [round(r.latency_ms, 3) for r in results if r.error is None],
                         **{s["step"]: [round(r.steps[s["step"]].latency_ms, 3) for r in results
                                        if s["step"] in r.steps and r.steps[s["step"]].judged]
                            for s in steps}},
    }


# --------------------------------------------------------------------------- gates


@dataclass(frozen=True, slots=True)
class Gate:
    """`--fail-if "recall<0.9"`: the run fails when the condition holds (or cannot be measured).
    Scope `[step=S]` or `[category=C]`, and `[dataset=D]`, `[policy=P]` when several ran
    (comma-separated: `fpr[dataset=xstest,category=homonyms]>0.05`)."""

    text: str
    metric: str
    kind: str | None  # None (the policy), "step" or "category"
    name: str | None
    op: str
    value: float
    dataset: str | None = None
    policy: str | None = None


def parse_gate(text: str) -> Gate:
    m = GATE_RX.match(text)
    if not m:
        raise ValueError(f"--fail-if {text!r}: expected METRIC[step=NAME|category=NAME]OP NUMBER, "
                         "e.g. 'recall<0.9' or 'fpr[category=benign]>0.02' or 'fpr[dataset=xstest]>0.05'")
    if m["metric"] not in METRICS:
        raise ValueError(f"--fail-if {text!r}: unknown metric {m['metric']!r} (known: {', '.join(METRICS)})")
    scope: dict[str, str] = {}
    for item in (m["scope"] or "").split(","):
        if not item.strip():
            continue
        key, sep, val = item.partition("=")
        key, val = key.strip(), val.strip()
        if not sep or key not in SCOPE_KEYS or not val or key in scope:
            raise ValueError(f"--fail-if {text!r}: scope {item.strip()!r} must be one of "
                             f"{', '.join(k + '=NAME' for k in SCOPE_KEYS)}, each at most once")
        scope[key] = val
    if "step" in scope and "category" in scope:
        raise ValueError(f"--fail-if {text!r}: a gate scopes a step or a category, not both")
    kind = "step" if "step" in scope else "category" if "category" in scope else None
    return Gate(text=text.strip(), metric=m["metric"], kind=kind, name=scope.get(kind) if kind else None,
                op=m["op"], value=float(m["value"]), dataset=scope.get("dataset"), policy=scope.get("policy"))


def gate_value(summary: dict[str, Any], g: Gate) -> tuple[Any, str | None]:
    """(the measured figure or None, why it is None) for one run's summary."""
    scope: dict[str, Any] | None
    if g.kind is None:
        scope = summary["overall"]
    elif g.kind == "category":
        scope = summary["categories"].get(g.name)
    else:
        scope = next((s for s in summary["steps"] if g.name in (s["step"], s["guard"])), None)
    value = None if scope is None else scope.get(g.metric)
    why = ("no such " + str(g.kind) if scope is None else "not measurable") if value is None else None
    return value, why


def evaluate_gates(summary: dict[str, Any], gates: list[Gate]) -> list[dict[str, Any]]:
    """Each gate with the measured value and whether it failed. A figure that cannot be measured
    (recall with no unsafe records, an unknown step or category) fails: a CI gate that cannot see
    what it guards must not pass."""
    return evaluate_runs([summary], gates)


def evaluate_runs(runs: list[dict[str, Any]], gates: list[Gate]) -> list[dict[str, Any]]:
    """Gates over several runs (policy x dataset): each gate applies to every run its scope selects
    and fails where any of them fails; a scope that selects no run fails (`no such dataset`)."""
    out: list[dict[str, Any]] = []
    several = len(runs) > 1
    for g in gates:
        chosen = [s for s in runs if g.dataset in (None, s["dataset"]) and g.policy in (None, s["policy"])]
        if not chosen:
            why = "no such dataset" if g.dataset is not None and all(s["dataset"] != g.dataset for s in runs) \
                else "no such policy"
            out.append({"gate": g.text, "value": None, "failed": True, "reason": why})
            continue
        for s in chosen:
            value, why = gate_value(s, g)
            failed = value is None or OPS[g.op](value, g.value)
            row = {"gate": g.text, "value": value, "failed": failed, **({"reason": why} if why else {})}
            if several:
                row |= {"policy": s["policy"], "dataset": s["dataset"]}
            out.append(row)
    return out

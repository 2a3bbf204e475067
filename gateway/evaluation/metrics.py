"""Confusion counts, the rates a team decides on, latency percentiles, and the threshold sweep.

Rates whose denominator is zero are None (no unsafe records: recall is unknown, not 0 or 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of `values`; None when empty."""
    if not values:
        return None
    s = sorted(values)
    k = max(1, math.ceil(q / 100.0 * len(s)))
    return s[min(k, len(s)) - 1]


def ratio(num: int, den: int) -> float | None:
    return num / den if den else None


@dataclass
class Confusion:
    """TP/FP/TN/FN of one judge (the policy, or one step) over some records, plus their latencies."""

    tp: int = 0
    fp: int = 0
    tn: int = 0
    fn: int = 0
    errors: int = 0  # records the judge failed on (a guard error): in no cell, reported apart
    latencies_ms: list[float] = field(default_factory=list)

    def add(self, unsafe: bool, flagged: bool, latency_ms: float | None = None) -> None:
        if unsafe:
            self.tp += flagged
            self.fn += not flagged
        else:
            self.fp += flagged
            self.tn += not flagged
        if latency_ms is not None:
            self.latencies_ms.append(latency_ms)

    @property
    def n(self) -> int:
        return self.tp + self.fp + self.tn + self.fn

    @property
    def recall(self) -> float | None:
        return ratio(self.tp, self.tp + self.fn)

    @property
    def fpr(self) -> float | None:
        return ratio(self.fp, self.fp + self.tn)

    @property
    def precision(self) -> float | None:
        return ratio(self.tp, self.tp + self.fp)

    @property
    def f1(self) -> float | None:
        p, r = self.precision, self.recall
        return None if p is None or r is None or p + r == 0 else 2 * p * r / (p + r)

    @property
    def accuracy(self) -> float | None:
        return ratio(self.tp + self.tn, self.n)

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "tp": self.tp, "fp": self.fp, "tn": self.tn, "fn": self.fn, "errors": self.errors,
                "recall": self.recall, "fpr": self.fpr, "precision": self.precision, "f1": self.f1,
                "accuracy": self.accuracy, "p50_ms": percentile(self.latencies_ms, 50),
                "p99_ms": percentile(self.latencies_ms, 99)}


def sweep(points: list[tuple[float | None, bool]]) -> list[dict[str, Any]]:
    """Recall and FPR at each threshold: flagged when score >= threshold (how Prompt Guard and Llama
    Guard apply `threshold`). `points` is (score, unsafe) per judged record; a record with no score is
    never flagged. Thresholds are the distinct scores ascending, then one point (threshold None) above
    every score, where nothing is flagged. Raising the threshold only removes flags, so TP and FP, and
    with them recall and FPR, never increase along the list."""
    pos = sum(1 for _, u in points if u)
    neg = len(points) - pos
    scores = sorted({s for s, _ in points if s is not None})
    out: list[dict[str, Any]] = []
    for t in [*scores, None]:
        tp = fp = 0
        if t is not None:
            for s, u in points:
                if s is not None and s >= t:
                    tp += u
                    fp += not u
        out.append({"threshold": t, "tp": tp, "fp": fp, "fn": pos - tp, "tn": neg - fp,
                    "recall": ratio(tp, pos), "fpr": ratio(fp, neg), "precision": ratio(tp, tp + fp)})
    return out


def threshold_for(points: list[dict[str, Any]], target_fpr: float) -> dict[str, Any] | None:
    """The lowest threshold whose FPR is at most `target_fpr` (the most recall that FPR allows);
    None when the sweep has no negatives to measure an FPR on."""
    ok = [p for p in points if p["fpr"] is not None and p["fpr"] <= target_fpr]
    return ok[0] if ok else None

"""`guardgate audit LOG.jsonl --report DIR`: what a policy did, or in shadow mode would have done, on
real traffic, in the evaluation report's format (DIR/report.html + DIR/summary.json).

An audit log has no labels, so there is no recall here: the report counts the decisions. A record's
decision is the action enforce mode takes (`would_action` in shadow mode, else `action`); a step's
is its `would` (shadow) or `outcome`. Broken down by step, by flagged category, by route, by key and
over time, with latency histograms and, for scored steps, the distribution of scores (where a
threshold would cut).
"""

from __future__ import annotations

import datetime as dt
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.evaluation import svg
from gateway.evaluation.metrics import percentile
from gateway.evaluation.report import Page, table

ACTION_COLUMNS = ("block", "redact", "warn", "log", "allow")
ACTED = ("block", "redact")  # what "would have blocked" counts: the request or its answer changed
BUCKETS_S = (1, 10, 60, 300, 900, 3600, 6 * 3600, 86400, 7 * 86400)
MAX_BUCKETS = 48


def decision(rec: dict[str, Any]) -> str:
    return str(rec.get("would_action") or rec.get("action") or "allow")


@dataclass
class StepAgg:
    stage: str
    step: str
    guard: str
    verdicts: Counter[str] = field(default_factory=Counter)
    decisions: Counter[str] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "step": self.step, "guard": self.guard,
                "judged": self.verdicts["pass"] + self.verdicts["flagged"], "flagged": self.verdicts["flagged"],
                "errors": self.verdicts["error"], "not_run": self.verdicts["not run"],
                "would": {a: self.decisions[a] for a in ACTION_COLUMNS[:-1]},
                "p50_ms": percentile(self.latencies_ms, 50), "p99_ms": percentile(self.latencies_ms, 99),
                "scored": any(0.0 < s < 1.0 for s in self.scores)}


def _ts(v: Any) -> dt.datetime | None:
    if not isinstance(v, str):
        return None
    try:
        return dt.datetime.fromisoformat(v.replace("Z", "+00:00"))
    except ValueError:
        return None


def timeline(records: list[dict[str, Any]]) -> tuple[int, list[dict[str, Any]]]:
    """(bucket seconds, buckets): the smallest bucket from BUCKETS_S giving at most MAX_BUCKETS."""
    stamped = [(t, r) for r in records if (t := _ts(r.get("ts"))) is not None]
    if not stamped:
        return 0, []
    lo = min(t for t, _ in stamped)
    hi = max(t for t, _ in stamped)
    span = (hi - lo).total_seconds()
    width = next((b for b in BUCKETS_S if span / b < MAX_BUCKETS), BUCKETS_S[-1])
    start = lo.timestamp() // width * width
    n = int((hi.timestamp() - start) // width) + 1
    buckets = [{"start": dt.datetime.fromtimestamp(start + i * width, dt.UTC).isoformat().replace("+00:00", "Z"),
                "requests": 0, "acted": 0} for i in range(n)]
    for t, r in stamped:
        b = buckets[int((t.timestamp() - start) // width)]
        b["requests"] += 1
        b["acted"] += decision(r) in ACTED
    return width, buckets


def summarise(records: list[dict[str, Any]], files: list[str]) -> dict[str, Any]:
    steps: dict[tuple[str, str], StepAgg] = {}
    cats: Counter[tuple[str, str]] = Counter()
    routes: dict[str, Counter[str]] = {}
    keys: dict[str, Counter[str]] = {}
    decisions: Counter[str] = Counter()
    modes: Counter[str] = Counter()
    latencies: list[float] = []
    for rec in records:
        d = decision(rec)
        decisions[d] += 1
        modes[str(rec.get("mode") or "enforce")] += 1
        routes.setdefault(str(rec.get("route") or "-"), Counter())[d] += 1
        keys.setdefault(str(rec.get("key") or "-"), Counter())[d] += 1
        if isinstance(rec.get("latency_ms"), int | float):
            latencies.append(float(rec["latency_ms"]))
        for s in rec.get("steps") or ():
            if not isinstance(s, dict):
                continue
            label = str(s.get("step") or s.get("guard") or "?")
            agg = steps.setdefault((str(s.get("stage") or "?"), label),
                                   StepAgg(str(s.get("stage") or "?"), label, str(s.get("guard") or "?")))
            verdict = str(s.get("verdict") or "not run") if s.get("checks") else "not run"
            agg.verdicts[verdict] += 1
            act = s.get("would") or s.get("outcome")
            if act:
                agg.decisions[str(act)] += 1
            if verdict in ("pass", "flagged"):
                agg.latencies_ms.append(float(s.get("latency_ms") or 0.0))
                if isinstance(s.get("score"), int | float):
                    agg.scores.append(float(s["score"]))
            if verdict == "flagged":
                for c in s.get("categories") or ():
                    cats[(label, str(c))] += 1
    width, buckets = timeline(records)
    ts = sorted(t for r in records if isinstance(t := r.get("ts"), str))

    def table_of(m: dict[str, Counter[str]]) -> dict[str, dict[str, int]]:
        return {k: {"requests": sum(c.values()), **{a: c[a] for a in ACTION_COLUMNS}} for k, c in sorted(m.items())}

    return {
        "kind": "audit", "files": files, "records": len(records), "first_ts": ts[0] if ts else None,
        "last_ts": ts[-1] if ts else None, "modes": dict(modes),
        "policies": dict(Counter(str(r.get("policy") or "-") for r in records)),
        "decisions": {a: decisions[a] for a in ACTION_COLUMNS},
        "would_block": decisions["block"], "would_redact": decisions["redact"],
        "steps": [a.to_dict() for a in steps.values()],
        "categories": [{"step": s, "category": c, "count": n} for (s, c), n in cats.most_common()],
        "routes": table_of(routes), "keys": table_of(keys),
        "timeline": {"bucket_s": width, "buckets": buckets},
        "latency_ms": {"p50": percentile(latencies, 50), "p99": percentile(latencies, 99)},
        "_plots": {"latency": latencies, "steps": {a.step: a.latencies_ms for a in steps.values()},
                   "scores": {a.step: a.scores for a in steps.values() if a.to_dict()["scored"]}},
    }


def audit_page(s: dict[str, Any]) -> str:
    p = Page("Guardgate audit report" + (" (shadow mode)" if s["modes"].get("shadow") else ""))
    p.meta += [f"{s['records']} records from {', '.join(s['files'])}",
               f"{s['first_ts'] or '–'} .. {s['last_ts'] or '–'}; policies "
               + ", ".join(f"{k} ({v})" for k, v in s["policies"].items()),
               "decision = what enforce mode does (shadow records: would_action)"]
    p.section("Decisions", f"{s['would_block']} request(s) would have been blocked and {s['would_redact']} "
                           "redacted.")
    p.add(table("decisions", ["", "requests", *ACTION_COLUMNS],
                [["all", s["records"], *(s["decisions"][a] for a in ACTION_COLUMNS)]]))
    p.section("Steps", "Per step: records judged, flagged, errors; what the step would have done; latency per "
                       "record (all its checks).")
    p.add(table("steps", ["step", "stage", "guard", "judged", "flagged", "errors", "not run", "block", "redact",
                          "warn", "log", "p50 ms", "p99 ms"],
                [[st["step"], st["stage"], st["guard"], st["judged"], st["flagged"], st["errors"], st["not_run"],
                  *(st["would"][a] for a in ACTION_COLUMNS[:-1]), st["p50_ms"], st["p99_ms"]] for st in s["steps"]],
                left=3))
    p.plots([svg.bars([(st["step"], st["flagged"]) for st in s["steps"]], "flagged per step")])
    p.section("Categories", "Categories of flagged verdicts, per step.")
    p.add(table("categories", ["step", "category", "flagged"],
                [[c["step"], c["category"], c["count"]] for c in s["categories"]], left=2))
    p.plots([svg.bars([(f"{c['category']} ({c['step']})", c["count"]) for c in s["categories"][:20]],
                      "flagged per category")])
    for name, heading in (("routes", "Routes"), ("keys", "Keys")):
        p.section(heading)
        p.add(table(name, [heading[:-1].lower(), "requests", *ACTION_COLUMNS],
                    [[k, v["requests"], *(v[a] for a in ACTION_COLUMNS)] for k, v in s[name].items()]))
        p.plots([svg.bars([(k, v["block"] + v["redact"]) for k, v in s[name].items()],
                          f"would block or redact, per {heading[:-1].lower()}")])
    tl = s["timeline"]
    p.section("Over time", f"Buckets of {tl['bucket_s']} s.")
    p.plots([svg.timeline([(b["start"][5:19].replace("T", " "), b["requests"], b["acted"]) for b in tl["buckets"]],
                          "requests and would-block/redact over time")])
    p.add(table("timeline", ["bucket start", "requests", "would block/redact"],
                [[b["start"], b["requests"], b["acted"]] for b in tl["buckets"]]))
    plots = s["_plots"]
    p.section("Latency")
    p.plots([svg.histogram(plots["latency"], "request (policy run)", "ms")]
            + [svg.histogram(v, f"step {k}", "ms") for k, v in plots["steps"].items() if v])
    if plots["scores"]:
        p.section("Scores", "Scored steps: the distribution of scores (where a threshold would cut).")
        p.plots([svg.histogram(v, f"scores: {k}", "score") for k, v in plots["scores"].items()])
    return p.html()


def write_report(records: list[dict[str, Any]], files: list[str], out: Path) -> dict[str, Any]:
    """Write out/report.html and out/summary.json; return the summary."""
    s = summarise(records, files)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.html").write_text(audit_page(s), encoding="utf-8")
    public = {k: v for k, v in s.items() if not k.startswith("_")}
    (out / "summary.json").write_text(json.dumps(public, indent=2) + "\n", encoding="utf-8")
    return public

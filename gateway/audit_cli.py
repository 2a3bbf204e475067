"""`guardgate audit LOG.jsonl`: summarise an audit log.

Actions, statuses and policies; per guard step: verdict counts (a step that never ran is "not
run", never a pass), p50/p99 check latency, checks and tokens evaluated; the top flagged
categories; guard errors; and the stream leak (tokens released past the start of a flagged
window). `--json` prints the same summary as one JSON object. `--report DIR` also writes DIR/report.html
and DIR/summary.json: what the policy would have blocked (shadow mode) by step, category, route, key
and over time, in `guardgate eval`'s report format (gateway/evaluation/audit_report.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from gateway.evaluation.metrics import percentile

VERDICTS = ("pass", "flagged", "error", "not run")


def add_audit_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("audit", help="summarise an audit log (JSONL)",
                       description="Summarise Guardgate audit logs: verdicts, categories, guard latency, "
                                   "leak.")
    p.add_argument("paths", nargs="+", metavar="LOG.jsonl", help="audit log file(s)")
    p.add_argument("--rotated", action="store_true",
                   help="also read rotated files next to each log (LOG.jsonl.1, .2, ...), oldest first")
    p.add_argument("--policy", help="only records of this policy")
    p.add_argument("--top", type=int, default=10, help="how many categories and errors to list (default 10)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--report", metavar="DIR",
                   help="also write DIR/report.html (self-contained) and DIR/summary.json: decisions by step, "
                        "category, route, key and over time")


@dataclass
class GuardStats:
    stage: str
    guard: str
    verdicts: Counter[str] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)  # per check (a request's mean if several)
    checks: int = 0
    tokens: int = 0

    def summary(self) -> dict[str, Any]:
        p50, p99 = percentile(self.latencies_ms, 50), percentile(self.latencies_ms, 99)
        return {"stage": self.stage, "guard": self.guard, "steps": sum(self.verdicts.values()),
                **{v.replace(" ", "_"): self.verdicts.get(v, 0) for v in VERDICTS},
                "p50_ms": None if p50 is None else round(p50, 3),
                "p99_ms": None if p99 is None else round(p99, 3),
                "checks": self.checks, "tokens_evaluated": self.tokens}


@dataclass
class Summary:
    files: list[str] = field(default_factory=list)
    records: int = 0
    malformed: int = 0
    first_ts: str | None = None
    last_ts: str | None = None
    actions: Counter[str] = field(default_factory=Counter)
    would: Counter[str] = field(default_factory=Counter)
    blocked_stage: Counter[str] = field(default_factory=Counter)
    status: Counter[str] = field(default_factory=Counter)
    policies: Counter[str] = field(default_factory=Counter)
    guards: dict[tuple[str, str], GuardStats] = field(default_factory=dict)
    categories: Counter[tuple[str, str]] = field(default_factory=Counter)
    errors: Counter[tuple[str, str]] = field(default_factory=Counter)
    leaks: list[int] = field(default_factory=list)  # per request with a flagged window
    released: int = 0

    def add(self, rec: dict[str, Any]) -> None:
        self.records += 1
        ts = rec.get("ts")
        if isinstance(ts, str):
            self.first_ts = ts if self.first_ts is None or ts < self.first_ts else self.first_ts
            self.last_ts = ts if self.last_ts is None or ts > self.last_ts else self.last_ts
        self.actions[str(rec.get("action") or "allow")] += 1
        if rec.get("would_action"):
            self.would[str(rec["would_action"])] += 1
        if rec.get("blocked_stage"):
            self.blocked_stage[str(rec["blocked_stage"])] += 1
        self.status[str(rec.get("status", "?"))] += 1
        self.policies[str(rec.get("policy") or "-")] += 1
        for step in rec.get("steps") or ():
            if isinstance(step, dict):
                self._step(step)
        if rec.get("flagged_at") is not None:
            self.leaks.append(int(rec.get("leaked_tokens") or 0))
        self.released += int(rec.get("released_tokens") or 0)

    def _step(self, step: dict[str, Any]) -> None:
        stage, guard = str(step.get("stage") or "?"), str(step.get("guard") or "?")
        g = self.guards.get((stage, guard))
        if g is None:
            g = self.guards[(stage, guard)] = GuardStats(stage, guard)
        checks = int(step.get("checks") or 0)
        verdict = str(step.get("verdict") or "not run")
        if checks == 0:
            verdict = "not run"  # whatever a writer claimed, a step with no check did not pass
        g.verdicts[verdict] += 1
        g.checks += checks
        g.tokens += int(step.get("tokens_evaluated") or 0)
        if checks:
            g.latencies_ms.append(float(step.get("latency_ms") or 0.0) / checks)
        if verdict == "flagged":
            for c in step.get("categories") or ():
                self.categories[(str(c), guard)] += 1
        if step.get("error"):
            self.errors[(guard, str(step["error"]))] += int(step.get("errors") or 1)

    def leak_summary(self) -> dict[str, Any]:
        n = len(self.leaks)
        return {"flagged_requests": n, "leaked_requests": sum(1 for x in self.leaks if x > 0),
                "leaked_tokens": sum(self.leaks), "mean": round(sum(self.leaks) / n, 3) if n else None,
                "p50": percentile([float(x) for x in self.leaks], 50),
                "p99": percentile([float(x) for x in self.leaks], 99), "max": max(self.leaks) if n else None}

    def to_dict(self, top: int = 10) -> dict[str, Any]:
        return {
            "files": self.files, "records": self.records, "malformed_lines": self.malformed,
            "first_ts": self.first_ts, "last_ts": self.last_ts,
            "actions": dict(self.actions.most_common()), "would_actions": dict(self.would.most_common()),
            "blocked_stage": dict(self.blocked_stage.most_common()),
            "status": dict(sorted(self.status.items())),
            "policies": dict(self.policies.most_common()),
            "guards": [self.guards[k].summary() for k in sorted(self.guards, key=_stage_order)],
            "top_categories": [{"category": c, "guard": g, "count": n}
                               for (c, g), n in self.categories.most_common(top)],
            "errors": [{"guard": g, "error": e, "count": n} for (g, e), n in self.errors.most_common(top)],
            "leak": self.leak_summary(),
        }


def _stage_order(key: tuple[str, str]) -> tuple[int, str]:
    order = {"input": 0, "stream": 1, "output": 2}
    return order.get(key[0], 3), key[1]


def log_files(paths: Iterable[str], rotated: bool) -> list[Path]:
    """The files to read: with `rotated`, LOG.jsonl.N ... LOG.jsonl.1 before LOG.jsonl (oldest first)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if rotated:
            n = 1
            older: list[Path] = []
            while (cand := p.with_name(f"{p.name}.{n}")).exists():
                older.append(cand)
                n += 1
            out.extend(reversed(older))
        out.append(p)
    return out


def read_records(files: Iterable[Path], summary: Summary) -> Iterator[dict[str, Any]]:
    for f in files:
        with open(f, encoding="utf-8", errors="replace") as fh:
            summary.files.append(str(f))
            for line in fh:
                line = line.strip()
                if not line:
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    summary.malformed += 1
                    continue
                if isinstance(rec, dict):
                    if rec.get("type") == "usage":  # token usage of a relayed request (gateway.limits), no decision
                        continue
                    yield rec
                else:
                    summary.malformed += 1


def summarise(files: Iterable[Path], policy: str | None = None) -> Summary:
    s = Summary()
    for rec in read_records(files, s):
        if policy is None or rec.get("policy") == policy:
            s.add(rec)
    return s


def _counts(c: dict[str, int]) -> str:
    return "  ".join(f"{k} {v}" for k, v in c.items()) or "-"


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def render(d: dict[str, Any], out: TextIO) -> None:
    w = out.write
    span = f", {d['first_ts']} .. {d['last_ts']}" if d["first_ts"] else ""
    skipped = f" ({d['malformed_lines']} malformed lines skipped)" if d["malformed_lines"] else ""
    w(f"{d['records']} records in {len(d['files'])} file(s){skipped}{span}\n\n")
    w(f"actions      {_counts(d['actions'])}\n")
    if d["blocked_stage"]:
        w(f"blocked at   {_counts(d['blocked_stage'])}\n")
    if d["would_actions"]:
        w(f"shadow would {_counts(d['would_actions'])}\n")
    w(f"status       {_counts(d['status'])}\n")
    w(f"policies     {_counts(d['policies'])}\n\n")
    if d["guards"]:
        head = ("stage", "guard", "pass", "flagged", "error", "not run", "p50 ms", "p99 ms", "checks",
                "tokens")
        rows = [head] + [(g["stage"], g["guard"], str(g["pass"]), str(g["flagged"]), str(g["error"]),
                          str(g["not_run"]), _ms(g["p50_ms"]), _ms(g["p99_ms"]), str(g["checks"]),
                          str(g["tokens_evaluated"])) for g in d["guards"]]
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        for r in rows:
            cells = (c.ljust(widths[i]) if i < 2 else c.rjust(widths[i]) for i, c in enumerate(r))
            w("  ".join(cells).rstrip())
            w("\n")
        w("(latency per check; a request with several checks of one step counts at its mean)\n\n")
    if d["top_categories"]:
        w("top categories\n")
        for c in d["top_categories"]:
            w(f"  {c['count']:>6}  {c['category']} ({c['guard']})\n")
        w("\n")
    if d["errors"]:
        w("guard errors\n")
        for e in d["errors"]:
            w(f"  {e['count']:>6}  {e['guard']}: {e['error']}\n")
        w("\n")
    lk = d["leak"]
    if lk["flagged_requests"]:
        w(f"leak         {lk['flagged_requests']} requests with a flagged window; "
          f"{lk['leaked_requests']} leaked tokens past it: total {lk['leaked_tokens']}, "
          f"mean {lk['mean']}, p50 {lk['p50']:.0f}, p99 {lk['p99']:.0f}, max {lk['max']}\n")
    else:
        w("leak         no flagged stream windows\n")


def main_audit(args: argparse.Namespace) -> int:
    files = log_files(args.paths, args.rotated)
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        print(f"guardgate audit: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    summary = summarise(files, policy=args.policy)
    if getattr(args, "report", None):
        from gateway.evaluation.audit_report import write_report

        kept = [r for r in read_records(files, Summary()) if args.policy is None or r.get("policy") == args.policy]
        write_report(kept, [str(f) for f in files], Path(args.report))
        print(f"wrote {Path(args.report) / 'report.html'}, {Path(args.report) / 'summary.json'}", file=sys.stderr)
    d = summary.to_dict(top=args.top)
    if args.json:
        json.dump(d, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        render(d, sys.stdout)
    return 0

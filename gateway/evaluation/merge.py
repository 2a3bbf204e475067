"""`guardgate eval merge DIR_A DIR_B ... --out DIR`: earlier runs side by side in one report.

Each DIR is the `--out` of a `guardgate eval` run (single or several policies/datasets): its
summary.json gives the per-run figures and results.jsonl the per-record decisions, so the merged
report has the same side-by-side tables and the records the runs decide differently (matched by
dataset and record id) as `--policy A --policy B` in one run. A policy name met twice (the same
policy measured before and after a change) becomes `name#2`. `--fail-if` gates apply as in a run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from gateway.check import InputError
from gateway.evaluation import compare, summary
from gateway.evaluation.dataset import Record
from gateway.evaluation.runner import Result


def add_parser(sub: Any) -> None:
    p = sub.add_parser("merge", help="earlier `guardgate eval` outputs side by side in one report")
    p.add_argument("dirs", nargs="+", metavar="DIR", help="the --out directories of earlier runs")
    p.add_argument("--out", required=True, help="directory for the merged report.html and summary.json")
    p.add_argument("--fail-if", action="append", default=[], metavar="GATE", help="as for a run (repeatable)")


def _result(row: dict[str, Any]) -> Result:
    rec = Record(
        line=int(row.get("line", 0)),
        id=str(row["id"]),
        unsafe=row["label"] == "unsafe",
        category=str(row.get("category", "-")),
        step=row.get("expected_step"),
        messages=[],
        response=None,
        dataset=str(row.get("dataset", "")),
    )
    return Result(
        record=rec,
        action=str(row["action"]),
        positive=bool(row["caught"]),
        latency_ms=float(row["latency_ms"]),
        error=row.get("error"),
    )


def load_dir(d: Path, taken: list[str]) -> tuple[list[dict[str, Any]], dict[tuple[str, str], list[Result]]]:
    """A run directory's summaries and results, its policy names made unique against `taken`."""
    try:
        s = json.loads((d / "summary.json").read_text(encoding="utf-8"))
        rows = [json.loads(line) for line in (d / "results.jsonl").read_text(encoding="utf-8").splitlines() if line]
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{d}: not a `guardgate eval` output ({e})") from None
    runs = s.get("runs", [s])
    rename: dict[str, str] = {}
    for name in dict.fromkeys(r["policy"] for r in runs):
        label, k = name, 2
        while label in taken:
            label, k = f"{name}#{k}", k + 1
        rename[name] = label
        taken.append(label)
    out_runs: list[dict[str, Any]] = []
    by_run: dict[tuple[str, str], list[Result]] = {}
    single = len({r["policy"] for r in runs}) == 1
    for run in runs:
        label = rename[run["policy"]]
        mine = [
            _result(row)
            for row in rows
            if row.get("dataset", run["dataset"]) == run["dataset"] and (single or row.get("policy") == run["policy"])
        ]
        out_runs.append({**run, "policy": label})
        by_run[(label, run["dataset"])] = mine
    return out_runs, by_run


def main(args: argparse.Namespace) -> int:
    try:
        gates = [summary.parse_gate(g) for g in args.fail_if]
        taken: list[str] = []
        runs: list[dict[str, Any]] = []
        by_run: dict[tuple[str, str], list[Result]] = {}
        for d in args.dirs:
            r, b = load_dir(Path(d), taken)
            runs += r
            by_run |= b
    except (ValueError, InputError) as e:
        print(f"guardgate eval merge: {e}", file=sys.stderr)
        return 2
    m = compare.combine(runs, by_run)
    m["merged_from"] = list(args.dirs)
    m["gates"] = summary.evaluate_runs(runs, gates)
    m["failed"] = any(g["failed"] for g in m["gates"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(m, indent=2) + "\n", encoding="utf-8")
    (out / "report.html").write_text(compare.comparison_report(m, m["gates"]), encoding="utf-8")
    compare.print_comparison(m, sys.stdout)
    print(f"\nwrote {out / 'report.html'}, {out / 'summary.json'}")
    return 1 if m["failed"] else 0

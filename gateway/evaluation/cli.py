"""`guardgate eval --policy P --dataset FILE.jsonl [--stream] --out DIR [--fail-if "recall<0.9"]`

Runs a policy over labelled records and reports what it catches and what it wrongly flags: per
step and per category, TP/FP/TN/FN, recall, false-positive rate, precision, latency p50/p99; for
scored steps (Prompt Guard, Llama Guard) the threshold sweep and the threshold that meets
--target-fpr. Writes DIR/report.html (one self-contained file), DIR/summary.json (for CI) and
DIR/results.jsonl (one line per record). Exit status: 0, 1 when a --fail-if gate holds (or its
figure cannot be measured), 2 on bad input.

Each record: {"messages": [...] | "prompt": "...", "response": "...", "label": "safe|unsafe",
"category": "...", "step": "..."}; see docs/evaluation.md. `sample:NAME` names a shipped set
(sample:regex, sample:hidden_unicode, sample:code_shield, sample:pii) and `--policy sample:policy`
the policy they are written for.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any, TextIO

from gateway.check import InputError, _load
from gateway.evaluation import dataset, report, summary
from gateway.evaluation.runner import DEFAULT_POSITIVE_ACTIONS, run_all
from gateway.policy.record import ACTIONS
from gateway.policy.schema import PolicyError
from gateway.yamlio import ConfigError


def add_eval_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("eval", help="measure a policy on labelled data: recall, false positives, latency, report",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy", required=True,
                   help="policy name (looked up in --policy-dir), a YAML file, or sample:policy")
    p.add_argument("--dataset", required=True, help="labelled JSONL file, or sample:NAME")
    p.add_argument("--out", required=True, help="directory for report.html, summary.json, results.jsonl")
    p.add_argument("--stream", action="store_true",
                   help="replay responses through the stream gate token by token (default: one-shot)")
    p.add_argument("--policy-dir", action="append", default=None, help="policy directory (default: policies)")
    p.add_argument("--fail-if", action="append", default=[], metavar="GATE",
                   help="exit 1 when this holds, e.g. 'recall<0.9', 'fpr>0.01', 'recall[step=secrets]<1', "
                        "'fpr[category=benign]>0', 'p99_ms[step=input[0]:regex]>50' (repeatable)")
    p.add_argument("--target-fpr", type=float, default=0.01,
                   help="false-positive rate the threshold sweep picks a threshold for (default 0.01)")
    p.add_argument("--positive", default=",".join(DEFAULT_POSITIVE_ACTIONS),
                   help="the policy actions that count as catching a record (default block,redact)")
    return p


def _policy(name: str, dirs: list[str]) -> Any:
    return _load(str(dataset.resolve(name, ".yaml")) if name.startswith("sample:") else name, dirs)


def main_eval(args: argparse.Namespace) -> int:
    def fail(msg: str) -> int:
        print(f"guardgate eval: {msg}", file=sys.stderr)
        return 2

    positive = tuple(a.strip() for a in args.positive.split(",") if a.strip())
    if not positive or any(a not in ACTIONS for a in positive):
        return fail(f"--positive: actions must be among {', '.join(ACTIONS)}, got {args.positive!r}")
    if not 0.0 <= args.target_fpr <= 1.0:
        return fail("--target-fpr must be in [0, 1]")
    try:
        gates = [summary.parse_gate(g) for g in args.fail_if]
    except ValueError as e:
        return fail(str(e))
    try:
        policy = _policy(args.policy, args.policy_dir or ["policies"])
        records = dataset.load(args.dataset)
    except (PolicyError, ConfigError, KeyError, InputError, OSError) as e:
        return fail(str(e))
    results = asyncio.run(run_all(policy, records, stream=args.stream, positive_actions=positive))
    s = summary.summarise(policy, results, dataset=args.dataset, stream=args.stream, positive_actions=positive,
                          target_fpr=args.target_fpr)
    gate_results = summary.evaluate_gates(s, gates)
    s["gates"] = gate_results
    s["failed"] = any(g["failed"] for g in gate_results)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(s, indent=2) + "\n", encoding="utf-8")
    (out / "report.html").write_text(report.eval_report(s, gate_results), encoding="utf-8")
    with open(out / "results.jsonl", "w", encoding="utf-8") as fh:
        for r in results:
            fh.write(json.dumps(r.to_json(), ensure_ascii=False) + "\n")
    print_summary(s, sys.stdout)
    print(f"\nwrote {out / 'report.html'}, {out / 'summary.json'}, {out / 'results.jsonl'}")
    for name in s["unmatched_expected_steps"]:
        print(f"guardgate eval: warning: records expect step {name!r}, which policy {s['policy']!r} does not have",
              file=sys.stderr)
    return 1 if s["failed"] else 0


# --------------------------------------------------------------------------- text output


def _rows(fh: TextIO, header: list[str], rows: list[list[Any]], left: int) -> None:
    cells = [header] + [[report.fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for r in cells:
        fh.write("  ".join(c.ljust(widths[i]) if i < left else c.rjust(widths[i]) for i, c in enumerate(r)).rstrip())
        fh.write("\n")


def print_summary(s: dict[str, Any], fh: TextIO) -> None:
    """The report's tables as text (stdout): policy, steps, categories, sweeps, gates."""
    fh.write(f"policy {s['policy']} on {s['dataset']}: {s['records']} records "
             f"({s['unsafe']} unsafe, {s['safe']} safe)\n\n")
    _rows(fh, ["", *report.METRIC_HEADERS], [["policy", *report.metric_cells(s["overall"])]]
          + [[f"step {st['step']}", *report.metric_cells(st)] for st in s["steps"]], left=1)
    fh.write("\n")
    _rows(fh, ["category", *report.METRIC_HEADERS],
          [[c, *report.metric_cells(d)] for c, d in s["categories"].items()], left=1)
    for sw in s["sweeps"]:
        at = sw["at_target"]
        fh.write(f"\nsweep {sw['step']}: {len(sw['points'])} thresholds; ")
        if at is None:
            fh.write("no safe records to measure an FPR\n")
        else:
            fh.write(f"at FPR <= {sw['target_fpr']}: threshold {report.fmt(at['threshold'])}, "
                     f"recall {report.fmt(at['recall'])}, FPR {report.fmt(at['fpr'])}\n")
    if s.get("gates"):
        fh.write("\n")
        for g in s["gates"]:
            why = f" ({g['reason']})" if g.get("reason") else ""
            fh.write(f"gate {g['gate']}: {report.fmt(g['value'])} -> {'FAIL' if g['failed'] else 'ok'}{why}\n")

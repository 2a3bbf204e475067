"""Several runs in one report: policies side by side (`--policy A --policy B`), several datasets, or both.

summary.json then holds
  policies, datasets        the column and row labels, in command-line order
  runs[]                    one per (policy, dataset): the single-run summary (see summary.py)
  comparison[]              per dataset and category ("all" first), per policy: n, tp, fp, tn, fn,
                            errors, recall, fpr, p50_ms, p99_ms; `false_refusal_rate` is the FPR (the
                            name the false-refusal sets use)
  differences[]             records the policies decide differently (caught by one, not the other):
                            dataset, id, label, category, and per policy its action and caught
  gates[], failed           the --fail-if gates over every run their scope selects
"""

from __future__ import annotations

from html import escape
from typing import Any

from gateway.evaluation import report, svg
from gateway.evaluation.report import Page, fmt, table
from gateway.evaluation.runner import Result

COLUMNS = ("n", "tp", "fp", "tn", "fn", "errors", "recall", "fpr", "p50_ms", "p99_ms")
MAX_DIFF_ROWS = 200  # in the HTML; summary.json has them all


def _cell(d: dict[str, Any]) -> dict[str, Any]:
    return {**{k: d[k] for k in COLUMNS}, "false_refusal_rate": d["fpr"]}


def combine(runs: list[dict[str, Any]], results: dict[tuple[str, str], list[Result]]) -> dict[str, Any]:
    """The multi-run summary from each run's summary and its results (keyed by (policy, dataset))."""
    policies = list(dict.fromkeys(s["policy"] for s in runs))
    datasets = list(dict.fromkeys(s["dataset"] for s in runs))
    by_key = {(s["policy"], s["dataset"]): s for s in runs}
    comparison: list[dict[str, Any]] = []
    differences: list[dict[str, Any]] = []
    for d in datasets:
        present = [p for p in policies if (p, d) in by_key]
        cats = list(dict.fromkeys(c for p in present for c in by_key[(p, d)]["categories"]))
        comparison.append(
            {"dataset": d, "category": "all", "policies": {p: _cell(by_key[(p, d)]["overall"]) for p in present}}
        )
        for c in cats:
            comparison.append(
                {
                    "dataset": d,
                    "category": c,
                    "policies": {
                        p: _cell(by_key[(p, d)]["categories"][c]) for p in present if c in by_key[(p, d)]["categories"]
                    },
                }
            )
        if len(present) > 1:
            # aligned by record id (runs merged from two directories need not share an order)
            by_id = [{r.record.id: r for r in results[(p, d)]} for p in present]
            for rid in by_id[0]:
                if any(rid not in m for m in by_id):
                    continue
                rows = [m[rid] for m in by_id]
                if len({(r.positive, r.error is None) for r in rows}) > 1:
                    rec = rows[0].record
                    differences.append(
                        {
                            "dataset": d,
                            "id": rec.id,
                            "label": "unsafe" if rec.unsafe else "safe",
                            "category": rec.category,
                            "action": {p: r.action for p, r in zip(present, rows, strict=True)},
                            "caught": {p: r.positive for p, r in zip(present, rows, strict=True)},
                        }
                    )
    return {
        "policies": policies,
        "datasets": datasets,
        "stream": runs[0]["stream"],
        "positive_actions": runs[0]["positive_actions"],
        "target_fpr": runs[0]["target_fpr"],
        "runs": runs,
        "comparison": comparison,
        "differences": differences,
    }


def comparison_report(m: dict[str, Any], gates: list[dict[str, Any]]) -> str:
    """One page: gates, the side-by-side table per dataset, the differing records, then each run."""
    p = Page("Guardgate evaluation: " + " vs ".join(m["policies"]))
    p.meta += [
        f"policies {', '.join(m['policies'])} on {', '.join(m['datasets'])}",
        f"a record counts as caught when the policy would {' or '.join(m['positive_actions'])} it",
    ]
    if gates:
        p.section("Gates")
        p.add(
            table(
                "gates",
                ["gate", "policy", "dataset", "value", "result"],
                [
                    [
                        g["gate"],
                        g.get("policy", "–"),
                        g.get("dataset", "–"),
                        g["value"],
                        "FAIL" if g["failed"] else "ok",
                    ]
                    for g in gates
                ],
                left=3,
            )
        )
    p.section(
        "Side by side",
        "Per dataset and category: each policy's recall (unsafe records caught), FPR "
        "(safe records flagged: on a false-refusal set, the false refusal rate) and latency.",
    )
    for d in m["datasets"]:
        rows = [r for r in m["comparison"] if r["dataset"] == d]
        pols = [pol for pol in m["policies"] if pol in rows[0]["policies"]]
        headers = ["category"] + [f"{pol} {h}" for pol in pols for h in ("n", "recall", "FPR", "p50 ms", "p99 ms")]
        body = [[r["category"]] + [v for pol in pols for v in _row(r["policies"].get(pol))] for r in rows]
        p.sub(d)
        p.add(table(f"compare-{d}", headers, body, total_rows=frozenset({0})))
        p.plots(
            [svg.confusion(c["tp"], c["fp"], c["tn"], c["fn"], f"{pol}: {d}") for pol, c in rows[0]["policies"].items()]
        )
    diffs = m["differences"]
    p.section(
        "Where they differ",
        f"{len(diffs)} records caught by one policy and not the other"
        + (f" (the first {MAX_DIFF_ROWS} here; all in summary.json)" if len(diffs) > MAX_DIFF_ROWS else "")
        + ".",
    )
    p.add(
        table(
            "differences",
            ["dataset", "id", "label", "category", *m["policies"]],
            [
                [
                    x["dataset"],
                    x["id"],
                    x["label"],
                    x["category"],
                    *[x["action"].get(pol, "–") for pol in m["policies"]],
                ]
                for x in diffs[:MAX_DIFF_ROWS]
            ],
            left=4,
        )
    )
    for i, s in enumerate(m["runs"], 1):
        heading = f"Run {i}: policy {s['policy']} on {s['dataset']}"
        p.add(f'<h2 style="margin-top:40px">{escape(heading)}</h2>')
        p.add(f'<p class="note">{escape("; ".join(report.run_meta(s)))}</p>')
        report.eval_sections(p, s, prefix=f"run{i}-", title=f"{s['policy']} / {s['dataset']}")
    return p.html()


def _row(c: dict[str, Any] | None) -> list[Any]:
    if c is None:
        return ["–"] * 5
    return [c["n"], c["recall"], c["fpr"], c["p50_ms"], c["p99_ms"]]


def print_comparison(m: dict[str, Any], fh: Any) -> None:
    """The side-by-side table as text (stdout)."""
    for d in m["datasets"]:
        rows = [r for r in m["comparison"] if r["dataset"] == d]
        fh.write(f"\n{d}\n")
        pols = list(rows[0]["policies"])
        head = ["category"] + [f"{pol}:{h}" for pol in pols for h in ("n", "recall", "fpr", "p50ms")]
        cells = [head] + [
            [r["category"]] + [fmt(v) for pol in pols for v in _row(r["policies"].get(pol))[:4]] for r in rows
        ]
        widths = [max(len(str(r[i])) for r in cells) for i in range(len(head))]
        for r in cells:
            fh.write(
                "  ".join(
                    str(c).ljust(widths[i]) if i == 0 else str(c).rjust(widths[i]) for i, c in enumerate(r)
                ).rstrip()
                + "\n"
            )
    fh.write(f"\n{len(m['differences'])} records decided differently\n")

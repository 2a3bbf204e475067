"""The user's own labelled file, JSONL or CSV, with a column mapping.

    guardgate eval --dataset tickets.csv --columns prompt=question,label=is_attack,category=team \
        --unsafe-label yes --unsafe-label attack ...

`--columns FIELD=COLUMN,...` renames the file's columns to the record fields `guardgate eval` reads
(`prompt`, `text`, `messages`, `response`, `label`, `category`, `step`, `id`, `model`; see
dataset.py); unmapped columns keep their names. `--unsafe-label VALUE` (repeatable) says which label
values mean unsafe; every other value is then safe. Without it the usual spellings apply
(safe/unsafe, 0/1, benign/malicious, ...).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from gateway.check import InputError, json_objects
from gateway.evaluation import dataset
from gateway.evaluation.dataset import Record

FIELDS = ("prompt", "text", "messages", "response", "label", "category", "step", "id", "model")


def parse_columns(spec: str | None) -> dict[str, str]:
    """`prompt=question,label=flag` → {"question": "prompt", "flag": "label"} (file column → field)."""
    out: dict[str, str] = {}
    for item in (spec or "").split(","):
        if not item.strip():
            continue
        field, sep, column = item.partition("=")
        field, column = field.strip(), column.strip()
        if not sep or not column or field not in FIELDS:
            raise InputError(f"--columns {item!r}: expected FIELD=COLUMN with FIELD one of {', '.join(FIELDS)}")
        out[column] = field
    return out


def _rows(path: Path) -> list[tuple[int, dict[str, Any]]]:
    if path.suffix.lower() == ".csv":
        with open(path, encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh)
            return [(reader.line_num, dict(row)) for row in reader]
    return json_objects(str(path))


def load(path: Path, name: str, columns: dict[str, str], unsafe_labels: list[str] | None = None) -> list[Record]:
    """Every row renamed by `columns`, its label read with `unsafe_labels` when given."""
    unsafe_set = {v.strip().lower() for v in unsafe_labels or []}
    out: list[Record] = []
    seen: set[str] = set()
    for n, row in _rows(path):
        obj = {columns.get(k, k): v for k, v in row.items() if k and v not in (None, "")}
        if unsafe_set and "label" in obj:
            obj["label"] = "unsafe" if str(obj["label"]).strip().lower() in unsafe_set else "safe"
        try:
            rec = dataset._record(n, obj)
        except InputError as e:
            raise InputError(f"{path}:{n}: {e}") from None
        if rec.id in seen:
            raise InputError(f"{path}:{n}: duplicate id {rec.id!r}")
        seen.add(rec.id)
        rec.dataset = name
        out.append(rec)
    if not out:
        raise InputError(f"{path}: no records")
    return out

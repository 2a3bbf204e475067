"""Labelled evaluation records, one JSON object per line.

    {"id": "aws-key-1", "messages": [{"role": "user", "content": "..."}], "label": "unsafe",
     "category": "secrets", "step": "secrets"}
    {"id": "ok-1", "prompt": "What is a hash map?", "label": "safe", "category": "benign"}
    {"response": "Run `rm -rf /` to clean up", "label": "unsafe", "category": "destructive-command"}

`messages` (OpenAI style) or `prompt` (one user message) is judged by the input stage; `response`
(the assistant's answer) by the output and stream stages, one-shot or with `--stream` replayed
through the stream gate. `label` is `safe` or `unsafe` (also accepted: 0/1, true/false, benign /
malicious, as public sets write it). `category` groups records in the report; `step` names the
policy step (its `name`/label, or the guard name) expected to catch an unsafe record, so another
step that does not flag it is not charged a miss.

A `.csv` file is read as a table with `text` (or `prompt`) and `label` columns, optionally
`response`, `category`, `step` and `id`: the shape public prompt-injection sets ship in (e.g. the
s-labs set, `text,label` with 1 = injection).

`sample:NAME` names a set shipped in gateway/evaluation/samples/ (NAME.jsonl).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.check import InputError, _messages
from gateway.evaluation import SAMPLES_DIR
from gateway.types import Message

SAFE_LABELS = {"safe", "benign", "0", "false", "negative", "ok"}
UNSAFE_LABELS = {"unsafe", "malicious", "1", "true", "positive", "injection", "jailbreak"}
UNCATEGORIZED = "-"


@dataclass(slots=True)
class Record:
    """One labelled example."""

    line: int
    id: str
    unsafe: bool
    category: str
    step: str | None  # the step expected to catch it (label or guard name), if the dataset says
    messages: list[Message]
    response: str | None
    model: str = "eval"
    dataset: str = ""  # the `--dataset` it came from (several may run in one `guardgate eval`)
    meta: dict[str, Any] = field(default_factory=dict)  # the upstream row's other fields, for results.jsonl


def resolve(path: str, suffix: str) -> Path:
    """`sample:NAME` → the shipped sample file; anything else is a path."""
    if path.startswith("sample:"):
        p = SAMPLES_DIR / f"{path.removeprefix('sample:')}{suffix}"
        if not p.is_file():
            known = sorted(f.stem for f in SAMPLES_DIR.glob(f"*{suffix}"))
            raise InputError(f"no sample {path!r} (known: {', '.join('sample:' + k for k in known)})")
        return p
    return Path(path)


def parse_label(value: Any) -> bool:
    """True for an unsafe label. Booleans and 0/1 are accepted: public sets write labels that way."""
    key = str(value).strip().lower() if not isinstance(value, bool) else str(value).lower()
    if key in UNSAFE_LABELS:
        return True
    if key in SAFE_LABELS:
        return False
    raise InputError(f"label must be safe or unsafe, got {value!r}")


def load(path: str) -> list[Record]:
    """Read and validate every line (errors name file:line), so a bad line fails before any run."""
    p = resolve(path, ".jsonl")
    out: list[Record] = []
    seen: set[str] = set()
    with open(p, encoding="utf-8", newline="" if p.suffix == ".csv" else None) as fh:
        for n, obj in _rows(fh, csv_file=p.suffix.lower() == ".csv"):
            try:
                out.append(_record(n, json.loads(obj) if isinstance(obj, str) else obj))
            except json.JSONDecodeError as e:
                raise InputError(f"{p}:{n}: not JSON: {e.msg}") from None
            except InputError as e:
                raise InputError(f"{p}:{n}: {e}") from None
            if out[-1].id in seen:
                raise InputError(f"{p}:{n}: duplicate id {out[-1].id!r}")
            seen.add(out[-1].id)
    if not out:
        raise InputError(f"{p}: no records")
    return out


def _rows(fh: Any, csv_file: bool) -> Any:
    """(line number, JSON text or CSV row dict) per non-empty record."""
    if csv_file:
        reader = csv.DictReader(fh)
        for row in reader:
            yield reader.line_num, {k: v for k, v in row.items() if k and v not in (None, "")}
        return
    for n, line in enumerate(fh, 1):
        if line.strip():
            yield n, line


def _record(n: int, obj: Any) -> Record:
    if not isinstance(obj, dict):
        raise InputError("expected a JSON object")
    if not ({"messages", "prompt", "response", "text"} & set(obj)):
        raise InputError("expected messages, prompt, text and/or response")
    if "label" not in obj:
        raise InputError("missing label (safe or unsafe)")
    if "text" in obj and "prompt" not in obj:  # `text,label` sets (e.g. prompt-injection corpora)
        obj = {**obj, "prompt": obj["text"]}
    response = obj.get("response")
    if response is not None and not isinstance(response, str):
        raise InputError("response must be a string")
    step = obj.get("step")
    if step is not None and not isinstance(step, str):
        raise InputError("step must be a string (a step name or a guard name)")
    category = obj.get("category")
    return Record(line=n, id=str(obj.get("id", f"line{n}")), unsafe=parse_label(obj["label"]),
                  category=str(category) if category not in (None, "") else UNCATEGORIZED,
                  step=step, messages=_messages(obj), response=response, model=str(obj.get("model", "eval")))

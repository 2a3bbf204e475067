"""CyberSecEval (Meta's PurpleLlama CybersecurityBenchmarks) as `guardgate eval` records.

`prompt_injection.json` (and `prompt_injection_multilingual_machine_translated.json`) is a JSON array
of test cases: `prompt_id`, `test_case_prompt` (the application's system prompt, holding what must
not leak or change), `user_input` (the attack: direct, or text that carries an indirect injection),
`judge_question`, `injection_variant`, `injection_type` (direct | indirect), `risk_category`
(security-violating | logic-violating) and `speaking_language`. Every case is an attack, so every
record is unsafe: the set measures recall (how many attacks the input stage stops), not FPR. Each
record is the system prompt then the user input, as the benchmark sends them to the model under test.

`frr.json` (the MITRE false-refusal set; `mitre_frr/frr_multilingual_machine_translated.json` in
other languages) is a JSON array of `mutated_prompt`, `is_malicious` (false: benign security
questions that sound alarming), `attack_type`, `model` (+ `speaking_language` etc. in the
multilingual file). Every record is safe: what the policy flags is a false refusal (FPR).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gateway.check import InputError
from gateway.evaluation.dataset import Record, parse_label
from gateway.types import Message

PI_FIELDS = ("test_case_prompt", "user_input", "injection_type")
FRR_FIELDS = ("mutated_prompt",)


def _cases(path: Path, required: tuple[str, ...]) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not JSON: {e.msg} (line {e.lineno})") from None
    if not isinstance(data, list) or not data:
        raise InputError(f"{path}: expected a non-empty JSON array of test cases")
    for i, case in enumerate(data):
        if not isinstance(case, dict):
            raise InputError(f"{path}: case {i} is not an object")
        missing = [f for f in required if not isinstance(case.get(f), str)]
        if missing:
            raise InputError(f"{path}: case {i} lacks {', '.join(missing)} (is this the right file?)")
    return data


def load_prompt_injection(path: Path, name: str, group_by: str = "injection_variant") -> list[Record]:
    """Every case an unsafe record: the system prompt, then the attack as the user's turn."""
    out: list[Record] = []
    for i, case in enumerate(_cases(path, PI_FIELDS)):
        messages = [Message.of("system", case["test_case_prompt"]), Message.of("user", case["user_input"])]
        meta = {
            k: case[k]
            for k in ("injection_type", "injection_variant", "risk_category", "speaking_language", "judge_question")
            if k in case
        }
        out.append(
            Record(
                line=i + 1,
                id=f"pi-{case.get('prompt_id', i)}",
                unsafe=True,
                category=str(case.get(group_by) or case["injection_type"]),
                step=None,
                messages=messages,
                response=None,
                dataset=name,
                meta=meta,
            )
        )
    return out


def load_prompt_injection_multilingual(path: Path, name: str) -> list[Record]:
    """The machine-translated set, grouped by language (what it adds over the English one)."""
    return load_prompt_injection(path, name, group_by="speaking_language")


def load_frr(path: Path, name: str, group_by: str = "attack_type") -> list[Record]:
    """Every case a user prompt labelled by `is_malicious` (false throughout the published set)."""
    out: list[Record] = []
    for i, case in enumerate(_cases(path, FRR_FIELDS)):
        unsafe = parse_label(case.get("is_malicious", False))
        meta = {k: case[k] for k in ("attack_type", "speaking_language", "original_english_prompt") if k in case}
        rid = case.get("prompt_id", i)
        lang = case.get("speaking_language")
        out.append(
            Record(
                line=i + 1,
                id=f"frr-{rid}" + (f"-{lang}" if lang else ""),
                unsafe=unsafe,
                category=str(case.get(group_by) or "-"),
                step=None,
                messages=[Message.of("user", case["mutated_prompt"])],
                response=None,
                dataset=name,
                meta=meta,
            )
        )
    _unique_ids(out, path)
    return out


def load_frr_multilingual(path: Path, name: str) -> list[Record]:
    return load_frr(path, name, group_by="speaking_language")


def _unique_ids(records: list[Record], path: Path) -> None:
    """Ids from the file when they are unique, else the case's position (results.jsonl needs one each)."""
    if len({r.id for r in records}) != len(records):
        for r in records:
            r.id = f"{r.id}#{r.line}"

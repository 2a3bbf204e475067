"""The stream gate's summary of one stream (`GateResult`): what it did, filled as it runs, and the
leak and release counts computed at the end from what each choice emitted (`fill_result`); the
usage estimate when the upstream sent none (`estimate_usage`)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from gateway.policy.choice import ChoiceText
from gateway.policy.tokens import count_tokens
from gateway.types import Message, Usage


@dataclass
class GateResult:
    """What the gate did to one stream (filled as it runs; `leaked_tokens` etc. by `StreamGate.result()`)."""

    blocked: bool = False
    block_step: str | None = None
    action: str = "allow"  # strongest action taken (enforce)
    would: str = "allow"  # strongest action the policy would have taken (shadow)
    checks: int = 0
    flagged_at: int | None = None
    leaked_tokens: int = 0
    released_tokens: int = 0
    redactions: int = 0
    error: str | None = None
    released_text: dict[int, str] = field(default_factory=dict)
    # Text (and tool-call) characters the upstream sent for a choice after its finish: never
    # released, counted here per choice index (the audit record's `after_finish`).
    after_finish: dict[int, int] = field(default_factory=dict)


def fill_result(r: GateResult, choices: Iterable[ChoiceText]) -> GateResult:
    """`r` with the leak and release counts computed from what the choices emitted."""
    choices = list(choices)
    leaked = released = 0
    r.flagged_at = None
    r.released_text = {}
    for c in choices:
        r.released_text[c.index] = "".join(t for _, _, t, _ in c.emitted)
        released += c.tokens_between(0, c.released)  # per-delta token boundaries: no re-encoding
        f = c.flag_start
        if f is not None:
            if r.flagged_at is None:
                r.flagged_at = f
            after = [t if s >= f else t[f - s:] if verbatim else t
                     for s, e, t, verbatim in c.emitted if e > f]
            leaked += count_tokens("".join(after))
        full = c.text() if c.late_spans else ""
        for a, b in c.late_spans:
            if f is not None:
                b = min(b, f)
            if b > a:
                leaked += count_tokens(full[a:b])
    r.leaked_tokens = leaked
    r.released_tokens = released
    return r


def estimate_usage(messages: Sequence[Message], choices: Iterable[ChoiceText]) -> Usage:
    """Our own count: the prompt's messages and the tokens each choice received."""
    prompt = sum(count_tokens(m.text) for m in messages)
    completion = sum(len(c.tokenize()) for c in choices)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

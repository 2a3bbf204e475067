"""The request's conversation as the model reads it, for input guards that scan text.

A text guard scans each text on its own (a message part, a tool call's arguments). The model reads
more than that: consecutive turns of one role run together, and a message's `name` is rendered with
it. A phrase split across two user messages, or written into `name`, would pass a per-text scan.
So guards also scan *runs*: each maximal sequence of consecutive messages of one role, `name`
fields included, joined with each of `SEPARATORS` (an attacker chooses where to split: inside a
word or between words). Offsets in a run map back to the texts they came from (`Run.edits`), so
`redact` rewrites the right spans; a match that touches a `name` cannot be rewritten (`None`: the
policy then blocks, as for any flagged text it cannot locate).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from gateway.types import Message, TextEdit

# "" catches a word split in two; " " a phrase split between words (each side trimmed of its space).
SEPARATORS = ("", " ")


def texts(messages: Sequence[Message], roles: Sequence[str] | frozenset[str],
          tool_arguments: bool = True) -> list[tuple[int, int, str]]:
    """(message index, part index or -(k+1) for tool call k's arguments, text) of every non-empty
    text a guard scans on its own: the addresses `TextEdit` uses."""
    out: list[tuple[int, int, str]] = []
    for mi, m in enumerate(messages):
        if m.role not in roles:
            continue
        out += [(mi, pi, p.text) for pi, p in enumerate(m.parts) if p.text]
        if tool_arguments:
            out += [(mi, -(k + 1), tc.arguments) for k, tc in enumerate(m.tool_calls) if tc.arguments]
    return out


@dataclass(frozen=True, slots=True)
class Piece:
    """Where one text sits in a run: [start, end) of the run's text; `part` None is a `name` field."""

    start: int
    end: int
    message: int
    part: int | None


@dataclass(slots=True)
class Run:
    """Consecutive messages of one role, joined as the model reads them."""

    role: str
    text: str = ""
    pieces: list[Piece] = field(default_factory=list)

    def _touched(self, start: int, end: int) -> list[Piece]:
        return [p for p in self.pieces if p.start < end and start < p.end]

    def crosses(self, start: int, end: int) -> bool:
        """True when [start, end) is not inside one rewritable text: a match a per-text scan misses."""
        touched = self._touched(start, end)
        return len(touched) != 1 or touched[0].part is None or not (touched[0].start <= start and end <= touched[0].end)

    def edits(self, start: int, end: int, replacement: str | None = None) -> list[TextEdit] | None:
        """The edits that rewrite [start, end): `replacement` (None: the step's notice) where it starts,
        the rest of the span removed; None when part of it lies in a `name` (not rewritable)."""
        touched = self._touched(start, end)
        if any(p.part is None for p in touched):
            return None
        out = []
        for i, p in enumerate(touched):
            assert p.part is not None
            a, b = max(start, p.start) - p.start, min(end, p.end) - p.start
            out.append(TextEdit(p.message, p.part, a, b, replacement if i == 0 else ""))
        return out


def runs(messages: Sequence[Message], roles: Sequence[str] | frozenset[str],
         tool_arguments: bool = True) -> Iterator[Run]:
    """Every run (per separator) whose text holds more than one text or a `name`: the only runs in
    which a match can cross what the per-text scans saw."""
    for sep in SEPARATORS:
        run: Run | None = None
        for mi, m in enumerate(messages):
            if m.role not in roles:
                if run is not None:
                    yield from _worth(run)
                run = None
                continue
            if run is None or run.role != m.role:
                if run is not None:
                    yield from _worth(run)
                run = Run(m.role)
            pieces: list[tuple[int | None, str]] = [(None, m.name)] if m.name else []
            pieces += [(pi, p.text) for pi, p in enumerate(m.parts) if p.text]
            if tool_arguments:
                pieces += [(-(k + 1), tc.arguments) for k, tc in enumerate(m.tool_calls) if tc.arguments]
            for part, text in pieces:
                if run.pieces:
                    run.text += sep
                run.pieces.append(Piece(len(run.text), len(run.text) + len(text), mi, part))
                run.text += text
        if run is not None:
            yield from _worth(run)


def _worth(run: Run) -> Iterator[Run]:
    if len(run.pieces) > 1 or any(p.part is None for p in run.pieces):
        yield run

"""The stream gate's bookkeeping for one choice: its guarded text as it grows (text, channel
separators, tool-call headers and arguments), token offsets, what waits for release, the redactions,
the tool calls, and each step's progress over it. `gateway.policy.gate` decides; this holds."""

from __future__ import annotations

import asyncio
import bisect
import time
from collections import deque
from dataclasses import dataclass, field

from gateway.guards.base import StreamCheck
from gateway.policy.record import StepRecord
from gateway.policy.schema import Step
from gateway.policy.tokens import token_starts
from gateway.types import Finish, ToolCall, Verdict


@dataclass(slots=True)
class Piece:
    """A run of guarded text waiting for release, and how to hand it to the client."""

    start: int
    end: int
    text: str
    kind: str  # "text" | "args" | "header" (tool-call start: emits id/name, never split) | "sep"
    call_index: int = 0
    id: str | None = None
    name: str | None = None
    channel: str = "text"  # a "text" piece's channel (TextDelta.channel)


@dataclass(slots=True)
class Redaction:
    start: int
    end: int
    notice: str
    emitted: bool = False


@dataclass(slots=True, eq=False)
class StepState:
    step: Step
    rec: StepRecord
    checker: StreamCheck | None = None
    checked_to: int = 0
    hold_from: int | None = None
    task: asyncio.Task[Verdict] | None = None
    args: tuple[int, int, bool] = (0, 0, False)
    final_done: bool = False
    ran: int = 0
    calls_seen: int = 0  # complete tool calls this step has judged (its last verdict covered them)
    calls_pending: int = 0  # complete tool calls handed to the check in flight
    started: float = 0.0  # monotonic time the check in flight started
    # seconds per window token of the step's last checks (auto window: fixed cost included, so it
    # overstates the cost per token of a larger window; the sizing converges from below)
    cost_per_token: deque[float] = field(default_factory=lambda: deque(maxlen=8))


@dataclass(slots=True, eq=False)
class ChoiceText:
    index: int
    chunks: list[str] = field(default_factory=list)
    length: int = 0
    joined_len: int = 0
    tok_starts: list[int] = field(default_factory=list)  # token starts of text[:tok_upto] (see tokenize)
    tok_upto: int = 0
    ascii: bool = True  # all text so far is ASCII: a token is at least one character
    pieces: deque[Piece] = field(default_factory=deque)
    released: int = 0
    finish: Finish | None = None
    ended: bool = False
    steps: list[StepState] = field(default_factory=list)
    redactions: list[Redaction] = field(default_factory=list)
    # what went out: (start, end, client text, verbatim = no redaction inside)
    emitted: list[tuple[int, int, str, bool]] = field(default_factory=list)
    open_call: int | None = None
    # The tool calls of this choice in the guarded text, (header start, end; None while it streams).
    # A call is released whole or not at all: only once it is complete (the next call, text, or the
    # finish) and checked to its end, so a blocked call never leaves a fragment of arguments
    # (`{"city": `, not JSON) on the client.
    calls: list[list[int | None]] = field(default_factory=list)
    # Per call, in the same order: (id, name, offset where its arguments start in the guarded text),
    # so guards that judge calls as calls (tools, alignment_check) get them whole (`StreamCheck.calls`).
    call_meta: list[tuple[str | None, str | None, int]] = field(default_factory=list)
    channel: str | None = "text"  # channel of the text segment being appended (None after a tool call)
    blocked: bool = False  # one-shot: this choice was blocked (the others go on)
    flag_start: int | None = None  # start of the first window a step blocked (or would have)
    late_spans: list[tuple[int, int]] = field(default_factory=list)  # redact targets already released
    first_at: float | None = None  # monotonic time the first guarded text arrived

    def token_rate(self, now: float) -> float | None:
        """Tokens per second since the first text (None until there is enough to tell)."""
        if self.first_at is None or now - self.first_at < 0.02 or len(self.tokenize()) < 2:
            return None
        return (len(self.tok_starts) - 1) / (now - self.first_at)

    def close_call(self) -> None:
        """The call being streamed (if any) ends here."""
        if self.calls and self.calls[-1][1] is None:
            self.calls[-1][1] = self.length

    def complete_calls(self) -> list[ToolCall]:
        """The tool calls of this choice that are complete so far, arguments whole."""
        text = self.text() if self.calls else ""
        out: list[ToolCall] = []
        for (_, end), (cid, name, args_start) in zip(self.calls, self.call_meta, strict=True):
            if end is None:
                break
            out.append(ToolCall(id=cid or "", name=name or "", arguments=text[args_start:end]))
        return out

    def text(self) -> str:
        if self.joined_len != self.length or len(self.chunks) != 1:
            self.chunks = ["".join(self.chunks)]
            self.joined_len = self.length
        return self.chunks[0] if self.chunks else ""

    def append(
        self,
        text: str,
        kind: str,
        call_index: int = 0,
        id: str | None = None,
        name: str | None = None,
        channel: str = "text",
    ) -> None:
        start = self.length
        if self.first_at is None:
            self.first_at = time.monotonic()
        self.chunks.append(text)
        self.length += len(text)
        if self.ascii and not text.isascii():
            self.ascii = False
        self.pieces.append(Piece(start, self.length, text, kind, call_index, id, name, channel))

    def tokenize(self) -> list[int]:
        """Token starts of the whole text: the text not tokenized yet is, in one call (the tokens of
        what is new, never the whole answer again)."""
        upto = self.tok_upto
        if upto < self.length:
            self.tok_starts.extend(upto + o for o in token_starts(self.text()[upto:]))
            self.tok_upto = self.length
        return self.tok_starts

    def tokens_between(self, a: int, b: int) -> int:
        starts = self.tokenize() if b > self.tok_upto else self.tok_starts
        return bisect.bisect_left(starts, b) - bisect.bisect_left(starts, a)

    def has_tokens(self, a: int, n: float) -> bool:
        """At least `n` tokens in text[a:]? Tokenizes only once a cheap bound says it may be so (a
        token is at least one byte: one character of ASCII, at most four bytes a character)."""
        upto = max(a, self.tok_upto)
        known = self.tokens_between(a, upto) if upto > a else 0
        if known + (self.length - upto) * (1 if self.ascii else 4) < n:
            return False
        return self.tokens_between(a, self.length) >= n

    def redact(self, a: int, b: int, notice: str, shadow: bool) -> bool:
        """Replace [a, b) with `notice` where it is not released yet (touching or overlapping spans:
        one notice for the union); what already left is kept in `late_spans` (the leak count). In
        shadow mode nothing is replaced. False for an empty span."""
        if b <= a:
            return False
        if shadow:  # nothing is replaced: the whole span reached the client
            self.late_spans.append((a, b))
            return True
        if a < self.released:
            self.late_spans.append((a, min(b, self.released)))
            a = self.released
        if a >= b:
            return True
        new = Redaction(a, b, notice)
        keep: list[Redaction] = []
        for r in self.redactions:
            if r.end < new.start or r.start > new.end:
                keep.append(r)
            else:  # overlapping or touching: one notice for the union
                new = Redaction(min(r.start, new.start), max(r.end, new.end), r.notice, r.emitted)
        keep.append(new)
        keep.sort(key=lambda r: r.start)
        self.redactions = keep
        return True

    def client_text(self, p: Piece, a: int, b: int) -> tuple[str, bool]:
        """Guarded text [a, b) of piece `p` as the client sees it (redactions applied), and whether
        it is verbatim (no redaction inside)."""
        if not self.redactions:
            return p.text[a - p.start:b - p.start], True
        out: list[str] = []
        pos = a
        for r in self.redactions:
            if r.end <= pos or r.start >= b:
                continue
            if r.start > pos:
                out.append(p.text[pos - p.start:r.start - p.start])
            if not r.emitted:
                out.append(r.notice)
                r.emitted = True
            pos = min(r.end, b)
        verbatim = pos == a
        if pos < b:
            out.append(p.text[pos - p.start:b - p.start])
        return "".join(out), verbatim

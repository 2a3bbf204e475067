"""`regex`: flag text that matches any of a list of patterns (deterministic, no model).

Options:
    patterns      list of "pattern" or {pattern, category}; at least one
    ignore_case   fold case for every pattern (default false; `(?i)` works per pattern)
    category      category of plain-string patterns (default "regex")
    messages      input stage: roles whose messages are scanned (default: every role; a data-leak
                  rule must see a system prompt or an assistant turn the client sends as well)
    fields        input stage: also scan the request's other rendered fields (tool definitions,
                  response_format, documents, ...; GuardInput.fields) (default true)
    scan_timeout_ms  cap on one scan, against pathological patterns (default 1000)

Stream stage: text arrives in windows. A match may straddle a window boundary, so the scanner
uses the `regex` module's partial matching: a match still incomplete at the end of the text is
not a pass but a request to hold (`Verdict.hold_from`) from where it starts, and the next scan
resumes there. A complete match ending exactly at the end of a non-final window is treated the
same way, since more text could extend or (for `\\b`, lookaheads) cancel it. Scans use `pos`,
not slicing, so lookbehinds and `\\b` see the text before the window.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, ClassVar

import regex

from gateway.guards import conversation
from gateway.guards.base import (
    GuardConfigError,
    GuardInput,
    ImmediateGuard,
    ResumingStream,
    StreamCheck,
    register,
)
from gateway.types import Message, TextEdit, Verdict

ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_SPANS = 64


def _config_error(msg: str, option: str, item: int | None = None) -> GuardConfigError:
    e = GuardConfigError(msg)
    e.option = option  # type: ignore[attr-defined]  # lets the policy loader point at the right line
    e.item = item  # type: ignore[attr-defined]
    return e


@dataclass(frozen=True, slots=True)
class _Pattern:
    index: int
    source: str
    category: str
    rx: Any  # regex.Pattern


@dataclass(slots=True)
class _Scan:
    matches: list[tuple[int, int, _Pattern]]  # complete matches, in text order
    pending: int | None  # earliest start of a match that may still complete


@register("regex")
class RegexGuard(ImmediateGuard):
    name: ClassVar[str] = "regex"
    stages: ClassVar[frozenset[str]] = frozenset({"input", "stream", "output"})

    def __init__(
        self,
        patterns: list[Any] | None = None,
        ignore_case: bool = False,
        category: str = "regex",
        messages: list[str] | None = None,
        scan_timeout_ms: float = 1000,
        fields: bool = True,
        **options: Any,
    ) -> None:
        if options:
            raise _config_error(
                f"unknown option(s) {', '.join(sorted(options))} (known: patterns, ignore_case, "
                "category, messages, fields, scan_timeout_ms)",
                next(iter(sorted(options))),
            )
        super().__init__(patterns=patterns, ignore_case=ignore_case, category=category, messages=messages,
                         fields=fields)
        if not isinstance(ignore_case, bool):
            raise _config_error("ignore_case must be true or false", "ignore_case")
        if not isinstance(fields, bool):
            raise _config_error("fields must be true or false", "fields")
        self.scan_fields = fields
        if not isinstance(patterns, list) or not patterns:
            raise _config_error("patterns must be a non-empty list", "patterns")
        flags = regex.IGNORECASE | regex.FULLCASE if ignore_case else 0
        self.patterns: list[_Pattern] = []
        for i, p in enumerate(patterns):
            if isinstance(p, str):
                src, cat = p, category
            elif (
                isinstance(p, dict)
                and isinstance(p.get("pattern"), str)
                and set(p) <= {"pattern", "category"}
            ):
                src, cat = p["pattern"], str(p.get("category", category))
            else:
                raise _config_error(f"patterns[{i}] must be a string or {{pattern, category}}", "patterns", i)
            try:
                rx = regex.compile(src, flags)
            except regex.error as e:
                raise _config_error(f"patterns[{i}] is not a valid regex: {e}", "patterns", i) from None
            if rx.fullmatch(""):
                raise _config_error(f"patterns[{i}] matches the empty string", "patterns", i)
            self.patterns.append(_Pattern(i, src, cat, rx))
        roles = messages if messages is not None else list(ROLES)
        if not isinstance(roles, list) or any(r not in ROLES for r in roles):
            raise _config_error(f"messages must be a list of roles ({', '.join(ROLES)})", "messages")
        self.roles = frozenset(roles)
        if not isinstance(scan_timeout_ms, int | float) or scan_timeout_ms <= 0:
            raise _config_error("scan_timeout_ms must be a positive number", "scan_timeout_ms")
        self.scan_timeout_s = float(scan_timeout_ms) / 1000.0

    # ------------------------------------------------------------------ scanning

    def scan(self, text: str, pos: int = 0, partial: bool = False) -> _Scan:
        """Complete matches starting at or after `pos`; with `partial`, also where one may still complete."""
        found: list[tuple[int, int, _Pattern]] = []
        pending: int | None = None
        end = len(text)
        for p in self.patterns:
            for m in p.rx.finditer(text, pos, timeout=self.scan_timeout_s):
                if m.end() == m.start():
                    continue
                if partial and m.end() == end:  # more text could extend or cancel it
                    pending = m.start() if pending is None else min(pending, m.start())
                    break
                found.append((m.start(), m.end(), p))
                if len(found) >= MAX_SPANS:
                    break
            if partial:
                # the last item of a partial scan is the match that may still complete, if any
                for m in p.rx.finditer(text, pos, partial=True, timeout=self.scan_timeout_s):
                    if m.partial:
                        if m.start() < end:
                            pending = m.start() if pending is None else min(pending, m.start())
                        break
        found.sort(key=lambda t: (t[0], t[1]))
        return _Scan(found, pending)

    def _verdict(self, t0: float, s: _Scan, hold: bool) -> Verdict:
        hold_from = s.pending if hold else None
        if not s.matches:
            return self.verdict(t0, flagged=False, score=0.0, hold_from=hold_from)
        cats: list[str] = []
        for _, _, p in s.matches:
            if p.category not in cats:
                cats.append(p.category)
        first = s.matches[0]
        return self.verdict(
            t0,
            flagged=True,
            score=1.0,
            categories=cats,
            span=(first[0], first[1]),
            hold_from=hold_from,
            reason=f"matched pattern #{first[2].index}",
            details={
                "spans": [[a, b] for a, b, _ in s.matches],
                "patterns": sorted({p.index for *_, p in s.matches}),
            },
        )

    def check_now(self, inp: GuardInput) -> Verdict:
        t0 = time.perf_counter()
        if inp.stage == "input":
            matches: list[tuple[int, int, _Pattern]] = []
            for msg in inp.messages:
                if msg.role in self.roles:
                    matches += self.scan(_message_text(msg)).matches
            if self.scan_fields:
                for _, text in inp.fields:
                    matches += self.scan(text).matches
            # What the model reads across texts: runs of one role's turns, `name` fields included.
            crossing: list[list[TextEdit] | None] = []
            for run in conversation.runs(inp.messages, self.roles):
                for a, b, p in self.scan(run.text).matches:
                    if run.crosses(a, b):
                        matches.append((a, b, p))
                        crossing.append(run.edits(a, b))
            v = self._verdict(t0, _Scan(matches, None), hold=False)
            v.span = None  # spans are per message; meaningless on the conversation
            if v.flagged:  # where to rewrite the request if the step's action is redact (per text part)
                for mi, pi, text in conversation.texts(inp.messages, self.roles, tool_arguments=False):
                    v.edits += [TextEdit(mi, pi, a, b) for a, b, _ in self.scan(text).matches]
                if any(e is None for e in crossing):
                    v.edits = []  # a match in a `name` cannot be rewritten: nothing to redact, so it blocks
                else:
                    v.edits += [e for es in crossing if es for e in es]
            return v
        if inp.stage == "stream":
            # stateless: scan everything, keep matches that reach into the new window
            s = self.scan(inp.text, 0, partial=not inp.final)
            s.matches = [m for m in s.matches if m[1] > inp.window_start]
            return self._verdict(t0, s, hold=not inp.final)
        return self._verdict(t0, self.scan(inp.text), hold=False)

    def scan_from(self, t0: float, text: str, pos: int, final: bool) -> tuple[Verdict, int | None]:
        """A stream check from `pos` (`ResumingStream`): the verdict and where a match may still start."""
        s = self.scan(text, pos, partial=not final)
        return self._verdict(t0, s, hold=not final), s.pending

    def open_stream(self, messages: list[Message], request_id: str) -> StreamCheck:
        return ResumingStream(self, messages, request_id)


def _message_text(msg: Message) -> str:
    text = msg.text
    if msg.tool_calls:
        text += "".join(f"\n{tc.name} {tc.arguments}" for tc in msg.tool_calls)
    return text

"""Input-stage `redact`: rewrite the request before it goes upstream, and put masked values back into
the answer for the client (pii `unmask`).

`apply_edits` builds a new `Exchange` (the client's one is kept as it is: the output guards, the
Responses store and the audit's view of the conversation use it) whose messages carry the
replacements of every `TextEdit`. `Unmasker` turns placeholders in the answer back into the values
they stand for: in a non-stream `Completion`, and in a stream of events, where a placeholder may be
split across deltas (`<EMA` + `IL_1>`): the tail of a delta that could still become a placeholder
is held until the next delta of the same text decides it (or the choice ends).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from gateway.types import (
    TEXT_CHANNELS,
    Completion,
    Event,
    Exchange,
    Finish,
    Part,
    TextDelta,
    TextEdit,
    ToolCall,
    ToolCallDelta,
)


def apply_edits(exchange: Exchange, edits: list[tuple[TextEdit, str]]) -> Exchange:
    """A copy of `exchange` with each (edit, replacement) applied. Overlapping edits of one text keep
    the one that starts first (the longer one on a tie): one replacement per span of original text."""
    by_text: dict[tuple[int, int], list[tuple[TextEdit, str]]] = {}
    for e, rep in edits:
        by_text.setdefault((e.message, e.part), []).append((e, rep))
    messages = list(exchange.messages)
    for (mi, pi), items in sorted(by_text.items()):
        if not 0 <= mi < len(messages):
            continue
        msg = messages[mi]
        items.sort(key=lambda t: (t[0].start, -(t[0].end)))
        kept: list[tuple[TextEdit, str]] = []
        for e, rep in items:
            if e.end > e.start and (not kept or e.start >= kept[-1][0].end):
                kept.append((e, rep))
        if pi >= 0:
            if pi >= len(msg.parts):
                continue
            parts = list(msg.parts)
            parts[pi] = replace(parts[pi], text=_splice(parts[pi].text, kept))
            messages[mi] = replace(msg, parts=parts)
        else:
            k = -pi - 1
            if k >= len(msg.tool_calls):
                continue
            calls = list(msg.tool_calls)
            calls[k] = replace(calls[k], arguments=_splice(calls[k].arguments, kept))
            messages[mi] = replace(msg, tool_calls=calls)
    return replace(exchange, messages=messages)


def _splice(text: str, edits: list[tuple[TextEdit, str]]) -> str:
    out: list[str] = []
    pos = 0
    for e, rep in edits:
        start, end = max(pos, min(e.start, len(text))), min(e.end, len(text))
        out.append(text[pos:start])
        out.append(rep)
        pos = max(pos, end)
    out.append(text[pos:])
    return "".join(out)


# --------------------------------------------------------------------------- unmask

_PLACEHOLDER = re.compile(r"<[A-Z][A-Z0-9_]*_\d+>")


class Unmasker:
    """Puts masked values back: `<EMAIL_1>` → the address the client sent. Only placeholders this
    request made are replaced; any other `<...>` text passes as it is."""

    def __init__(self, restore: dict[str, str]) -> None:
        self.restore = dict(restore)
        self.longest = max((len(k) for k in self.restore), default=0)
        self.replaced = 0

    def text(self, s: str) -> str:
        if "<" not in s:
            return s

        def sub(m: re.Match[str]) -> str:
            value = self.restore.get(m.group(0))
            if value is None:
                return m.group(0)
            self.replaced += 1
            return value

        return _PLACEHOLDER.sub(sub, s)

    def split(self, s: str) -> tuple[str, str]:
        """(text ready to go out, tail held back because it may be the start of a placeholder)."""
        i = s.rfind("<")
        if i < 0 or ">" in s[i:] or len(s) - i >= self.longest:
            return self.text(s), ""
        tail = s[i:]
        if not any(k.startswith(tail) for k in self.restore):
            return self.text(s), ""
        return self.text(s[:i]), tail

    def completion(self, c: Completion) -> Completion:
        """A non-stream answer with placeholders restored in every text channel and tool call."""
        choices = []
        for ch in c.choices:
            m = ch.message
            parts = [Part(p.type, self.text(p.text), p.image_url) if p.type in TEXT_CHANNELS else p
                     for p in m.parts]
            calls = [ToolCall(tc.id, tc.name, self.text(tc.arguments)) for tc in m.tool_calls]
            choices.append(replace(ch, message=replace(m, parts=parts, tool_calls=calls)))
        return replace(c, choices=choices)

    async def stream(self, events: AsyncIterator[Event]) -> AsyncIterator[Event]:
        """The events with placeholders restored; a tail that may be a split placeholder is held per
        (choice, channel or tool call) until the next piece of the same text, or flushed (as it is,
        restored when complete) before anything else of that choice goes out."""
        held: dict[int, tuple[tuple[str, Any], str]] = {}  # choice -> ((kind, key), held text)

        def flush(index: int) -> list[Event]:
            if index not in held:
                return []
            (kind, key), tail = held.pop(index)
            text = self.text(tail)
            if kind == "text":
                return [TextDelta(text, index, key)]
            return [ToolCallDelta(call_index=key, arguments=text, index=index)]

        async with contextlib.aclosing(events):  # type: ignore[type-var]
            async for ev in events:
                if isinstance(ev, TextDelta):
                    slot: tuple[str, Any] = ("text", ev.channel)
                    new, identity = ev.text, False
                elif isinstance(ev, ToolCallDelta):
                    slot = ("call", ev.call_index)
                    new, identity = ev.arguments, ev.id is not None or ev.name is not None
                else:
                    for i in ([ev.index] if isinstance(ev, Finish) else list(held)):
                        for out in flush(i):
                            yield out
                    yield ev
                    continue
                prev = held.get(ev.index)
                if prev is not None and (prev[0] != slot or identity):
                    for out in flush(ev.index):  # another text of this choice starts: the tail goes first
                        yield out
                    prev = None
                held.pop(ev.index, None)
                ready, tail = self.split((prev[1] if prev else "") + new)
                if tail:
                    held[ev.index] = (slot, tail)
                if isinstance(ev, TextDelta):
                    if ready:
                        yield TextDelta(ready, ev.index, ev.channel)
                elif ready or identity:  # a call's first fragment carries its identity: always out
                    yield replace(ev, arguments=ready)
            for i in list(held):
                for out in flush(i):
                    yield out

"""The stream encoder every client dialect builds on: neutral events → SSE frames.

The base owns what the dialects share: the stream's identity (its `StreamStart`, or one made up
when text comes first), holding the last frame so a guard `Annotation` can ride on it, the end
(terminator, idempotent) and the mid-stream error (which ends the stream). A dialect supplies the
shapes, as dicts, through its hooks (`start`, `text`, `tool`, `finish`, `usage`, `close`,
`error_frame`); `frame` is the one serializer that writes them.

`encode_all(events)` renders every event the gate released together into one bytes value, so
they leave in one write. The encoder also keeps what telemetry reports once the stream ends
(`StreamStats`): when the first model-written event went out, the finish reasons, usage and the
response's identity.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from gateway.dialects._common import dumps, to_bytes
from gateway.types import Annotation, Event, Exchange, Finish, StreamStart, TextDelta, ToolCallDelta, Usage, UsageEvent


def frame(obj: dict[str, Any], event: str | None = None) -> str:
    """One SSE frame of compact JSON (`event:` line only when the dialect names its events)."""
    if event is None:
        return "data: " + dumps(obj) + "\n\n"
    return "event: " + event + "\ndata: " + dumps(obj) + "\n\n"


# Stand-ins for the values a `Template` leaves open (no model-written text reaches a template).
HOLES = ("\x00gg-hole-0\x00", "\x00gg-hole-1\x00")


class Template:
    """A frame shape with open values (`HOLES[i]` in the dict), serialized once per stream by
    `frame`: each frame of it is then the fixed text around the JSON of its values, so the hot
    path (a text delta) costs one string escape, not a whole serialization."""

    __slots__ = ("parts",)

    def __init__(self, obj: dict[str, Any], event: str | None = None, holes: int = 1) -> None:
        text = frame(obj, event)
        parts: list[str] = []
        for hole in HOLES[:holes]:
            head, sep, text = text.partition(dumps(hole))
            if not sep or dumps(hole) in text:
                raise ValueError("a template needs each hole exactly once")
            parts.append(head)
        parts.append(text)
        self.parts = parts

    def fill(self, *values: str) -> str:
        """The frame with these JSON texts in the holes (`qstr(text)` for a string)."""
        p = self.parts
        if len(values) == 1:
            return p[0] + values[0] + p[1]
        return "".join(x for pair in zip(p, (*values, ""), strict=True) for x in pair)


@dataclass(slots=True)
class StreamStats:
    """One stream, as telemetry reports it at its end (filled where the events pass anyway)."""

    first_in: float | None = None  # perf_counter: first text or tool call from the upstream
    first_out: float | None = None  # perf_counter: first text or tool call written to the client
    finish_reasons: list[str] = field(default_factory=list)
    usage: Usage | None = None
    response_model: str | None = None
    response_id: str | None = None
    events_in: int = 0
    events_out: int = 0


class StreamEncoder:
    """Neutral events → whole SSE frames in one client dialect (subclass per dialect).

    Hooks (each appends frames through `emit` / `hold`, after `begin()`): `start(ev)` (the
    identity: `ev` is None when the stream starts without a StreamStart), `text(ev)` (non-empty
    text), `tool(ev)`, `finish(ev)`, `usage(ev)`, `close()` (before the terminator) and
    `error_frame(...)`.
    """

    END = ""  # the dialect's terminator frame

    def __init__(self, ex: Exchange) -> None:
        self.ex = ex
        self.started = False
        self.ended = False
        self.stats = StreamStats()
        self._out: list[str] = []
        self._held: tuple[dict[str, Any], dict[str, Any], str | None] | None = None
        self._annotation: dict[str, Any] | None = None
        self._on: dict[type, Callable[[Any], None]] = {TextDelta: self._text, ToolCallDelta: self._tool,
                                                       Finish: self._finish, UsageEvent: self._usage,
                                                       StreamStart: self._start, Annotation: self._annotate}

    # ---------------------------------------------------------------- the dialect's hooks

    def start(self, ev: StreamStart | None) -> None:
        raise NotImplementedError

    def text(self, ev: TextDelta) -> None:
        raise NotImplementedError

    def tool(self, ev: ToolCallDelta) -> None:
        pass

    def finish(self, ev: Finish) -> None:
        raise NotImplementedError

    def usage(self, ev: UsageEvent) -> None:
        pass

    def close(self) -> None:
        """Frames the dialect writes before its terminator (held frames are flushed after this)."""

    def error_frame(self, message: str, code: str, type: str) -> str:
        raise NotImplementedError

    # ---------------------------------------------------------------- what hooks call

    def emit(self, obj: dict[str, Any], event: str | None = None) -> None:
        """Write a frame now (after the held one, if any)."""
        self.emit_text(frame(obj, event))

    def emit_text(self, text: str) -> None:
        """Write a frame already rendered (a `Template.fill`)."""
        if self._held is not None:
            self.flush()
        self._out.append(text)

    def hold(self, obj: dict[str, Any], into: dict[str, Any] | None = None, event: str | None = None) -> None:
        """Keep a frame until the next one or the end, so an Annotation can ride on it (as the key
        `guardgate` of `into`, a dict inside `obj`; `obj` itself by default)."""
        if self._held is not None:
            self.flush()
        self._held = (obj, obj if into is None else into, event)

    @property
    def holding(self) -> bool:
        return self._held is not None

    def flush(self) -> None:
        held = self._held
        if held is None:
            return
        self._held = None
        obj, into, event = held
        if self._annotation is not None:
            into["guardgate"] = self._annotation
            self._annotation = None
        self._out.append(frame(obj, event))

    # ---------------------------------------------------------------- public

    def encode(self, ev: Event) -> bytes:
        return self.encode_all((ev,))

    def encode_all(self, events: Iterable[Event]) -> bytes:
        """Every frame `events` make, as one bytes value (b"" when none, and after the end)."""
        if self.ended:
            return b""
        on = self._on
        for ev in events:
            handler = on.get(type(ev))
            if handler is not None:
                handler(ev)
        return self._take()

    def end(self) -> bytes:
        """Close what is open, then the terminator. Idempotent."""
        if self.ended:
            return b""
        self.ended = True
        self.close()
        self.flush()
        self._out.append(self.END)
        return self._take()

    def error(self, message: str, code: str, *, type: str = "server_error") -> bytes:
        """A mid-stream error frame the client's SDK raises; ends the stream (a later `end()` is b"")."""
        if self.ended:
            return b""
        self.ended = True
        self.flush()
        self._out.append(self.error_frame(message, code, type))
        return self._take()

    # ---------------------------------------------------------------- dispatch

    def _take(self) -> bytes:
        out = self._out
        if not out:
            return b""
        s = "".join(out)
        out.clear()
        return to_bytes(s)

    def begin(self) -> None:
        """The opening frames, once (hooks call it before their first frame)."""
        if not self.started:
            self.started = True
            self.start(None)

    def _first_out(self) -> None:
        st = self.stats
        st.events_out += 1
        if st.first_out is None:
            st.first_out = time.perf_counter()

    def _start(self, ev: StreamStart) -> None:
        self.stats.response_model, self.stats.response_id = ev.model or None, ev.id or None
        if self.started:  # a second start: keep the first identity
            self.flush()
            return
        self.started = True
        self.start(ev)

    def _text(self, ev: TextDelta) -> None:
        if ev.text:
            self._first_out()
            self.text(ev)

    def _tool(self, ev: ToolCallDelta) -> None:
        self._first_out()
        self.tool(ev)

    def _finish(self, ev: Finish) -> None:
        self.stats.finish_reasons.append(ev.reason)
        self.finish(ev)

    def _usage(self, ev: UsageEvent) -> None:
        self.stats.usage = ev.usage
        self.usage(ev)

    def _annotate(self, ev: Annotation) -> None:
        if self._annotation is None:
            self._annotation = dict(ev.data)
        else:
            self._annotation.update(ev.data)

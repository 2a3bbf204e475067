"""Incremental Server-Sent Events parser for upstream bodies (both dialects).

Behaves like the line/event decoder both SDKs use (wire_formats.md §1.5, §3.5), so the gateway
sees exactly the events its clients would:

- lines end in `\\r\\n`, `\\r` or `\\n`; a lone `\\r` at the end of a chunk is kept until the next
  byte tells whether it is a CRLF; input may be split at any byte (also inside a UTF-8 sequence,
  because lines are split before decoding);
- a blank line dispatches the event; `:` lines are comments; several `data:` lines are joined
  with `\\n`; one space after the colon is stripped; `id:` / `retry:` are ignored (never re-emitted);
- an event with no blank line before EOF is dropped, as the SDKs do (see `pending`);
- a line that is not a known field but parses as JSON as a whole (a bare `{"error":...}` line,
  as llama-api-client ≥ 0.3 handles them) becomes an event named `error` at once.

Each event keeps its `raw` bytes (from its first line through its blank line) so a relay can
forward frames it did not change byte for byte. Invalid UTF-8 in a field is replaced (U+FFFD),
never raised: the parser itself fails only on an event larger than `max_event_bytes`.
"""

from __future__ import annotations

import json
from typing import NamedTuple

from gateway.dialects.base import UpstreamStreamError

MAX_EVENT_BYTES = 16 << 20


class SSEEvent(NamedTuple):
    event: str | None  # the `event:` field, None when absent
    data: str  # the `data:` lines joined with "\n"
    raw: bytes  # the frame as received, terminating blank line included
    comment: bool = False  # a comment-only frame (only produced with keep_comments=True)


class SSEParser:
    """`feed(bytes) -> list[SSEEvent]`, incremental and split-safe."""

    __slots__ = ("_bare_json", "_buf", "_buf_len", "_comment", "_data", "_event", "_keep_comments", "_max", "_raw",
                 "_raw_len")

    def __init__(self, *, keep_comments: bool = False, bare_json_errors: bool = True,
                 max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self._keep_comments = keep_comments
        self._bare_json = bare_json_errors
        self._max = max_event_bytes
        self._buf: list[bytes] = []  # pieces of an incomplete line (possibly ending in a lone \r)
        self._buf_len = 0
        self._raw: list[bytes] = []  # complete lines of the frame in progress, from earlier feeds
        self._raw_len = 0
        self._event: str | None = None
        self._data: list[str] = []
        self._comment = False

    @property
    def pending(self) -> bytes:
        """Bytes of an event not yet terminated by a blank line (b"" at a clean frame boundary).
        Non-empty at EOF means the upstream stopped mid-event: that event is dropped."""
        return b"".join(self._raw) + b"".join(self._buf)

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        if not chunk:
            return []
        if self._buf:
            tail = self._buf
            if tail[-1][-1] != 13 and b"\n" not in chunk and b"\r" not in chunk:
                # still inside one long line: don't re-join (and re-scan) it on every chunk
                tail.append(chunk)
                self._buf_len += len(chunk)
                self._check_size()
                return []
            tail.append(chunk)
            buf = b"".join(tail)
            tail.clear()
            self._buf_len = 0
        else:
            buf = chunk
        return self._parse(buf, False)

    def close(self) -> list[SSEEvent]:
        """At EOF: a held lone `\r` ends its line after all (as in the SDKs), which can still
        complete an event. Whatever is left after that is dropped (see `pending`)."""
        if not self._buf or self._buf[-1][-1] != 13:
            return []
        buf = b"".join(self._buf)
        self._buf.clear()
        self._buf_len = 0
        return self._parse(buf, True)

    def _parse(self, buf: bytes, final: bool) -> list[SSEEvent]:
        out: list[SSEEvent] = []
        n = len(buf)
        pos = 0  # start of the current line
        find = buf.find
        if not (self._raw or self._data or self._event or self._comment) and find(b"\r") < 0:
            # Fast path, most streams: at a frame boundary, frames of one `data:` line ended by LF.
            while buf.startswith(b"data:", pos):
                end = find(b"\n\n", pos)
                if end < 0 or find(b"\n", pos, end) >= 0:
                    break
                v = pos + 6 if buf[pos + 5:pos + 6] == b" " else pos + 5
                out.append(SSEEvent(None, buf[v:end].decode("utf-8", "replace"), buf[pos:end + 2]))
                pos = end + 2
        start = pos  # start in `buf` of the frame in progress (its earlier lines are in self._raw)
        while pos < n:
            nl = find(b"\n", pos)
            cr = find(b"\r", pos, nl if nl >= 0 else n)
            if cr >= 0:
                if cr + 1 == n:
                    if not final:
                        break  # lone trailing \r: CR or CRLF? wait for the next byte
                    end, nxt = cr, n
                else:
                    end, nxt = cr, (cr + 2 if buf[cr + 1] == 10 else cr + 1)
            elif nl >= 0:
                end, nxt = nl, nl + 1
            else:
                break
            if end == pos:  # blank line: dispatch
                if self._data or self._event:  # as the SDKs: an empty `event:` alone is nothing
                    raw = buf[start:nxt]
                    if self._raw:
                        raw = b"".join(self._raw) + raw
                        self._raw.clear()
                        self._raw_len = 0
                    out.append(SSEEvent(self._event or None, "\n".join(self._data), raw))
                    self._event = None
                    self._data = []
                elif self._comment and self._keep_comments:
                    out.append(SSEEvent(None, "", b"".join(self._raw) + buf[start:nxt], True))
                self._raw.clear()
                self._raw_len = 0
                self._comment = False
                start = nxt
            elif buf[pos] == 58:  # ':' comment
                self._comment = True
            else:
                colon = find(b":", pos, end)
                if colon < 0:
                    name, value = buf[pos:end], b""
                else:
                    name = buf[pos:colon]
                    vs = colon + 2 if colon + 1 < end and buf[colon + 1] == 32 else colon + 1
                    value = buf[vs:end]
                if name == b"data":
                    self._data.append(value.decode("utf-8", "replace"))
                elif name == b"event":
                    self._event = value.decode("utf-8", "replace")
                elif name in (b"id", b"retry"):
                    pass
                elif self._bare_json:
                    line = buf[pos:end].decode("utf-8", "replace")
                    try:
                        json.loads(line)
                    except (ValueError, RecursionError):
                        pass
                    else:
                        raw = b"".join(self._raw) + buf[start:nxt]
                        self._raw.clear()
                        self._raw_len = 0
                        out.append(SSEEvent("error", line, raw))
                        self._event = None
                        self._data = []
                        self._comment = False
                        start = nxt
            pos = nxt
        if start < pos:  # complete lines of an unfinished frame
            part = buf[start:pos]
            self._raw.append(part)
            self._raw_len += len(part)
        if pos < n:
            self._buf.append(buf[pos:])
            self._buf_len = n - pos
        self._check_size()
        return out

    def _check_size(self) -> None:
        if self._raw_len + self._buf_len > self._max:
            raise UpstreamStreamError(f"upstream SSE event larger than {self._max} bytes",
                                      code="upstream_event_too_large")


def parse_all(body: bytes) -> list[SSEEvent]:
    """All complete events of a whole body (tests, tools)."""
    return SSEParser().feed(body)

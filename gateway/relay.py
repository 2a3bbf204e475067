"""The byte relay: the fast path for requests that need no inspection and no translation.

Bodies pass chunk by chunk with back-pressure (each `write` waits for the client's socket).
SSE bodies are forwarded on event boundaries only, so that if the upstream fails mid-stream the
client gets a whole error frame in its dialect instead of half an event.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp import web

from gateway.dialects.sse import MAX_EVENT_BYTES
from gateway.upstreams.base import UpstreamError
from gateway.upstreams.http import release_after_eof, response_headers

SMALL_BODY = 1 << 20  # non-SSE bodies up to this size are read whole and sent with Content-Length
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DONE = b"data: [DONE]"  # the OpenAI stream terminator


def last_event_end(buf: bytes | bytearray, start: int = 0) -> int:
    """Offset just past the last complete SSE event in `buf` (0 if none), searching from `start`.

    An event ends at a blank line: LF LF, CR LF CR LF, or CR CR (mixed endings are rare enough
    that the three plain forms suffice; a missed boundary only delays bytes, never corrupts).
    """
    end = 0
    for sep in (b"\n\n", b"\r\n\r\n", b"\r\r"):
        i = buf.rfind(sep, start)
        if i >= 0:
            end = max(end, i + len(sep))
    return end


class EventTooLarge(ValueError):
    """An upstream SSE event outgrew `MAX_EVENT_BYTES` without ending."""

    def __init__(self) -> None:
        super().__init__(f"upstream SSE event larger than {MAX_EVENT_BYTES} bytes")


class EventAligner:
    """Cuts an upstream SSE body into runs of whole events, and knows when the stream is over.

    `terminator`, when given, is a byte string the stream's last events must contain (``data:
    [DONE]``): a clean EOF without it is a truncation. Nothing may follow ``data: [DONE]``, so the
    response can end as soon as it has been sent.
    """

    def __init__(self, terminator: bytes | None) -> None:
        self.terminator = terminator
        self.seen = terminator is None
        self.last = terminator == DONE
        self.pending = bytearray()

    def feed(self, chunk: bytes) -> tuple[bytes, bool]:
        """The whole events to send now (b"" if none) and whether the response ends with them (its
        terminator is in them; any bytes after it are passed on as they are). Raises EventTooLarge."""
        pending = self.pending
        if not pending and (chunk.endswith(b"\n\n") or chunk.endswith(b"\r\n\r\n")):
            return chunk, self._ends(chunk)  # the common case: whole events, no copy, no search
        # everything before `pending` was sent at an event end: a new end can only be in the new
        # bytes (or straddle their start), so only those are searched
        start = max(0, len(pending) - 3)
        pending += chunk
        end = last_event_end(pending, start)
        if not end:
            if len(pending) > MAX_EVENT_BYTES:
                raise EventTooLarge()
            return b"", False
        block = bytes(pending[:end])
        del pending[:end]
        if not self._ends(block):
            return block, False
        if pending.strip():
            block += bytes(pending)
        pending.clear()
        return block, True

    def _ends(self, block: bytes) -> bool:
        if not self.seen and self.terminator in block:  # type: ignore[operator]
            self.seen = True
            return self.last
        return False

    def finish(self) -> tuple[bytes, str]:
        """At the upstream's EOF: bytes still to send, or why the stream counts as cut ("" if not)."""
        tail = bytes(self.pending).strip()
        if tail.startswith(DONE):
            return tail + b"\n\n", ""  # a terminator missing only its blank line
        if tail:
            # EOF inside an event: the SDKs would drop it silently; an error frame makes the cut visible
            return b"", "the upstream stream ended inside an event"
        if not self.seen:
            # a clean EOF without the terminator: the SDKs would end quietly and hide the truncation
            return b"", "the upstream stream ended before its terminator"
        return b"", ""


class TimedResponse(web.StreamResponse):
    """A streamed response whose every write must be taken by the client within `send_timeout`
    seconds. A client that stops reading would otherwise hold its upstream connection, and with it a
    place in the upstream pool, for as long as it likes: two such clients exhausted a pool of two.
    On expiry the client's connection is cut and ConnectionResetError raised, so the caller closes
    the upstream response as for any client that went away.

    One timer per response, not one per write: a write notes when it started; the timer, armed at
    most once per `send_timeout`, checks when it fires whether a write has been waiting that long
    (and re-arms for the one in progress, else sleeps until the next write arms it again)."""

    def __init__(self, *, send_timeout: float | None = None, headers_with_first_write: bool = False,
                 **kw: Any) -> None:
        super().__init__(**kw)
        self.send_timeout = send_timeout
        # The head leaves with the first body bytes, in one write (a guarded stream: its first write
        # follows at once, the stream's start).
        self._send_headers_immediately = not headers_with_first_write
        self._since: float | None = None  # loop time the write in progress started
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._expired = False

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.send_timeout is None:
            return await super().write(data)
        self._arm()
        try:
            await super().write(data)
        except (ConnectionError, RuntimeError):
            self._raise_if_expired()
            raise
        finally:
            self._since = None
        self._raise_if_expired()

    async def write_eof(self, data: bytes = b"") -> None:
        if self.send_timeout is None:
            return await super().write_eof(data)
        self._arm()
        try:
            await super().write_eof(data)
        except (ConnectionError, RuntimeError):
            self._raise_if_expired()
            raise
        finally:
            self._since = None
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
        self._raise_if_expired()

    def _arm(self) -> None:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        self._since = now = loop.time()
        if self._timer is None:
            assert self.send_timeout is not None
            self._timer = loop.call_at(now + self.send_timeout, self._fire)

    def _fire(self) -> None:
        self._timer = None
        since, timeout, loop = self._since, self.send_timeout, self._loop
        if since is None or timeout is None or loop is None:
            return  # no write waiting: the next one arms the timer again
        if loop.time() - since < timeout:  # a later write: give it its whole time
            self._timer = loop.call_at(since + timeout, self._fire)
            return
        self._expired = True
        self._cut()

    def _raise_if_expired(self) -> None:
        if self._expired:
            raise ConnectionResetError(f"client took no data for {self.send_timeout} s")

    def _cut(self) -> None:
        req = self._req
        if req is not None and req.transport is not None:
            req.transport.abort()


def is_sse(headers: object) -> bool:
    ctype = headers.get("Content-Type", "") if hasattr(headers, "get") else ""
    return "text/event-stream" in ctype


async def relay_response(request: web.Request, upstream_resp: aiohttp.ClientResponse,
                         extra_headers: dict[str, str], error_frame: Callable[[str, str], bytes],
                         terminator: bytes | None = None,
                         redact: Callable[[bytes], bytes] | None = None,
                         send_timeout: float | None = None,
                         tap: Callable[[bytes], None] | None = None) -> web.StreamResponse:
    """Send an upstream response to the client as it arrives. The caller closes `upstream_resp`
    (unless it is `draining`, see below).

    `error_frame(message, code)` renders the event that ends a failed SSE stream in the client's
    dialect; `terminator` is `EventAligner`'s. After ``data: [DONE]`` the client's response ends at
    once and the upstream connection is released once its body ends (`release_after_eof`): the
    caller must not close a `draining` response. `redact` rewrites an error answer's body (status
    400 or more) before it is sent: known secrets out. `tap`, when given, sees every byte sent (a
    token budget's usage count, gateway.limits.usage); None on the plain relay.
    """
    headers = response_headers(upstream_resp.headers)
    headers.update(extra_headers)
    sse = is_sse(upstream_resp.headers)
    length = upstream_resp.content_length
    if not sse and length is not None and length <= SMALL_BODY:
        try:
            body = await upstream_resp.read()
        except TimeoutError:
            raise UpstreamError("upstream timed out while sending its answer", 504, "upstream_timeout") from None
        except aiohttp.ClientError as e:
            raise UpstreamError(f"upstream failed while sending its answer: {type(e).__name__}", 502,
                                "upstream_error") from None
        if redact is not None and upstream_resp.status >= 400:
            body = redact(body)
        if tap is not None and upstream_resp.status < 400:
            tap(body)
        return web.Response(body=body, status=upstream_resp.status, headers=headers)

    if sse:
        headers.update(SSE_HEADERS)
    out = TimedResponse(status=upstream_resp.status, headers=headers, send_timeout=send_timeout)
    await out.prepare(request)
    if not sse:
        async for chunk in upstream_resp.content.iter_any():
            if tap is not None:
                tap(chunk)
            await out.write(chunk)
        await out.write_eof()
        return out

    aligner = EventAligner(terminator)
    try:
        async for chunk in upstream_resp.content.iter_any():
            try:
                block, end = aligner.feed(chunk)
            except EventTooLarge as e:
                await out.write(error_frame(str(e), "upstream_event_too_large"))
                await out.write_eof()
                return out
            if block:
                if tap is not None:
                    tap(block)
                await out.write(block)
            if end:
                return await _finish(out, upstream_resp)
    except (aiohttp.ClientError, TimeoutError):
        # The upstream died mid-stream: drop its half event, tell the client in its dialect.
        await out.write(error_frame("the upstream stream failed before it finished", "upstream_error"))
        await out.write_eof()
        return out
    tail, cut = aligner.finish()
    if tail:
        if tap is not None:
            tap(tail)
        await out.write(tail)
    elif cut:
        await out.write(error_frame(cut, "upstream_truncated"))
    await out.write_eof()
    return out


async def _finish(out: web.StreamResponse, upstream_resp: aiohttp.ClientResponse) -> web.StreamResponse:
    """The terminator is out: end the client's response now (the SDKs hang up at [DONE] anyway) and
    let the upstream connection go back to the pool once its body ends, without waiting for that."""
    release_after_eof(upstream_resp)
    await out.write_eof()
    return out

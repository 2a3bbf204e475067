"""The fast relay's HTTP/1.1 client: pooled keep-alive connections to one upstream, responses
parsed by httptools (llhttp) and pushed to a `ResponseSink` as callbacks, with no await per chunk.

aiohttp's `ClientSession.request` costs ~0.2 ms per request on a 2-core machine (URL building,
tracing hooks, cookie jar, timers, a StreamReader per body); a relay with nothing to inspect does
not need any of it. The decoded path keeps aiohttp's client. Timeouts are the caller's (it knows
the phases); this module keeps connections and frames responses.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import time
from collections import deque
from typing import Protocol
from urllib.parse import urlsplit

import httptools

HEAD_REMEMBER_BYTES = 4096  # longer response heads are not remembered
HEADS_MAX = 64  # response heads remembered per pool at most (ConnectionPool.heads)
# The first Content-Length / Date header of a head, as servers and clients write them (the regex engine
# finds a case-sensitive pattern ~2x faster). A head that spells one otherwise is never served from
# memory: its key keeps that header whole, and heads are remembered only with exactly one length,
# which the key cut out.
CONTENT_LENGTH = re.compile(rb"\r\n[Cc]ontent-[Ll]ength:[ \t]*(\d{1,18})[ \t]*\r\n")
_DATE = re.compile(rb"\r\n[Dd]ate:([\t -~]*)\r\n")


def response_key(data: bytes, end: int) -> tuple[tuple[bytes, ...], int] | None:
    """(key in ConnectionPool.heads, Content-Length) of the response head `data[:end]`: the head without
    the digits of its first Content-Length and the value of its first Date, the two parts of a
    self-hosted server's JSON answer head that change from one answer to the next. None without a
    Content-Length. Only heads with one are remembered, so a second one (left in the key) never matches."""
    m = CONTENT_LENGTH.search(data, 0, end + 2)
    if m is None:
        return None
    a, b = m.span(1)
    d = _DATE.search(data, 0, end + 2)
    if d is None:
        return (data[:a], data[b:end]), int(m.group(1))
    c, e = d.span(1)
    if c < a:
        return (data[:c], data[e:a], data[b:end]), int(m.group(1))
    return (data[:a], data[b:c], data[e:end]), int(m.group(1))


class UpstreamDisconnected(Exception):
    """The upstream closed or reset the connection before the response ended."""

    def __init__(self, message: str, *, nothing_received: bool) -> None:
        super().__init__(message)
        self.nothing_received = nothing_received


class UpstreamBadResponse(Exception):
    """The upstream's bytes are not valid HTTP/1.1."""


class ResponseSink(Protocol):
    def on_head(self, status: int, headers: list[tuple[bytes, bytes, bytes]]) -> None: ...
    def on_body(self, data: bytes) -> None: ...
    def on_end(self) -> None: ...
    def on_error(self, exc: Exception) -> None: ...
    def flush(self) -> None: ...  # after each read from the socket: write what the callbacks gathered
    # Remembered responses (see ConnectionPool.heads): what the sink derived from a response head
    # that it can serve again from the memo alone (None: nothing), and a whole response served so.
    def memo(self) -> object | None: ...
    def on_known(self, memo: object, body: bytes) -> None: ...


class UpstreamConnection(asyncio.Protocol):
    """One keep-alive connection. It hands itself back to the pool when a response ends and the
    upstream allows keep-alive, and leaves the pool when the socket closes."""

    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.sink: ResponseSink | None = None
        self.parser: httptools.HttpResponseParser | None = None
        self.headers: list[tuple[bytes, bytes, bytes]] = []  # name, value, lower-cased name
        self.alive = True
        self.reused = False
        self.received = 0
        self.last_read = 0.0
        self.idle_since = 0.0
        self._head_done = self._ended = self._extra = False
        self._holding = False  # holds one of the pool's permits
        self._close_delimited = False
        self._framed = False
        self._keep_alive = False
        self._lengths = 0  # Content-Length headers in this response's head
        self._interim = False  # a 1xx response came first
        self.paused = False  # reading paused (back-pressure from the client)

    # ---------------------------------------------------------------- used by the relay

    def send(self, request: bytes) -> None:
        """Send one request (then `start` its response), before anything else: the upstream works on
        it while the caller sets up the rest."""
        assert self.transport is not None
        self.transport.write(request)

    def start(self, sink: ResponseSink) -> None:
        """The response to the request just sent goes to `sink`."""
        self.sink = sink
        if self.parser is None:  # one per connection: llhttp starts afresh after each whole response
            self.parser = httptools.HttpResponseParser(self)
        self.headers = []
        self.received = 0
        self.last_read = time.monotonic()
        self._head_done = self._ended = self._extra = self._framed = self._interim = False
        self._lengths = 0

    def detach(self, sink: ResponseSink) -> None:
        """Give the rest of the response to another sink (a drain), reading on whatever the client does."""
        self.sink = sink
        self.resume()

    def abort(self) -> None:
        """Drop the connection now (the client went away, or the response is unusable)."""
        self.sink = None
        self.alive = False
        if self.transport is not None:
            self.transport.abort()
        self.pool._forget(self)

    def pause(self) -> None:
        if self.transport is not None and self.alive:
            self.transport.pause_reading()
            self.paused = True

    def resume(self) -> None:
        if self.paused and self.transport is not None and self.alive:
            self.transport.resume_reading()
            self.paused = False

    # ---------------------------------------------------------------- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        sink = self.sink
        if sink is None or self.parser is None:  # bytes nobody asked for: the connection is unusable
            self.abort()
            return
        first = self.received == 0
        self.received += len(data)
        self.last_read = time.monotonic()
        if first and self.pool.heads and self._known(sink, data):
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._fail(UpstreamBadResponse(f"invalid HTTP from upstream: {e}"))
            return
        if first and self._ended:
            self._remember(sink, data)
        sink.flush()  # the sink this read started with, even if the response ended or was detached
        if self._ended:
            self._after_response()

    def _known(self, sink: ResponseSink, data: bytes) -> bool:
        """A whole response in the read that starts it, whose head the pool has seen before (bar its
        Content-Length and Date): served from the sink's memo, without the parser's callbacks."""
        end = data.find(b"\r\n\r\n")
        if end < 0:
            return False
        found = response_key(data, end)
        if found is None:
            return False
        memo = self.pool.heads.get(found[0])
        if memo is None or end + 4 + found[1] != len(data):
            return False
        self.pool.known_heads += 1
        self._head_done = self._ended = self._keep_alive = True
        self.sink = None
        sink.on_known(memo, data[end + 4:])
        sink.flush()
        self._after_response()
        return True

    def _remember(self, sink: ResponseSink, data: bytes) -> None:
        """After the parser framed a whole response from one read: keep its head for `_known` when it
        is a plain keep-alive answer framed by its one Content-Length, and the sink has a memo of it."""
        if self._extra or self._interim or not self._keep_alive or self._lengths != 1 or not self._framed:
            return
        end = data.find(b"\r\n\r\n")
        found = response_key(data, end) if 0 <= end <= HEAD_REMEMBER_BYTES else None
        if found is None or end + 4 + found[1] != len(data):
            return
        memo = sink.memo()
        if memo is not None and self.pool.remembering:
            heads = self.pool.heads
            heads[found[0]] = memo
            if len(heads) >= HEADS_MAX:  # this upstream's heads differ from one answer to the next: the
                self.pool.remembering = False  # lookups would never pay, so there are none from now on
                heads.clear()

    def eof_received(self) -> bool:
        return False  # close our side too; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.alive = False
        self.pool._forget(self)
        sink = self.sink
        if sink is None or self._ended:
            return
        if self._head_done and self._close_delimited:
            self._ended = True  # a body without framing ends at EOF (HTTP/1.0 style)
            self.sink = None
            sink.on_end()
            sink.flush()
            return
        self._fail(UpstreamDisconnected("upstream closed the connection before the response ended",
                                        nothing_received=self.received == 0))

    # ---------------------------------------------------------------- httptools callbacks

    def on_message_begin(self) -> None:
        if self._ended:  # a second response to one request
            self._extra = True

    def on_header(self, name: bytes, value: bytes) -> None:
        lk = name.lower()
        self.headers.append((name, value, lk))
        if lk == b"content-length":
            self._framed = True
            self._lengths += 1
        elif lk == b"transfer-encoding":
            self._framed = self._framed or b"chunked" in value.lower()
            self._lengths = 2  # never remembered

    def on_headers_complete(self) -> None:
        if self._extra or self.sink is None:
            return
        assert self.parser is not None
        status = self.parser.get_status_code()
        if 100 <= status < 200:  # an interim response (103 Early Hints): the real head follows
            self.headers, self._framed, self._lengths, self._interim = [], False, 0, True
            return
        self._head_done = True
        self._close_delimited = not self._framed and status not in (204, 304)
        self.sink.on_head(status, self.headers)

    def on_body(self, body: bytes) -> None:
        if self.sink is not None and not self._extra:
            self.sink.on_body(body)

    def on_message_complete(self) -> None:
        if self._extra or not self._head_done:
            return
        self._ended = True
        assert self.parser is not None
        self._keep_alive = self.parser.should_keep_alive()  # llhttp forgets it once the callback returns
        sink, self.sink = self.sink, None
        if sink is not None:
            sink.on_end()

    # ---------------------------------------------------------------- internals

    def _after_response(self) -> None:
        """Back to the pool, unless the upstream said close or sent more than one response."""
        if self._extra or not self.alive or not self._keep_alive:
            self.abort()
        else:
            self.pool._release(self)

    def _fail(self, exc: Exception) -> None:
        sink = self.sink
        self.abort()
        if sink is not None:
            sink.on_error(exc)


class ConnectionPool:
    """Keep-alive connections to one `http(s)://host:port`; at most `limit` open at once (a request
    beyond that waits for one to come back, as aiohttp's connector does)."""

    def __init__(self, base_url: str, *, limit: int, connect_timeout: float, keepalive_s: float = 30.0) -> None:
        u = urlsplit(base_url)
        self.https = u.scheme == "https"
        self.host = u.hostname or "localhost"
        self.port = u.port or (443 if self.https else 80)
        self.path = u.path.rstrip("/")  # prefix of every request target
        default_port = self.port == (443 if self.https else 80)
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = host if default_port else f"{host}:{self.port}"
        self.limit = limit
        self.connect_timeout = connect_timeout
        self.keepalive_s = keepalive_s
        self._ssl = ssl.create_default_context() if self.https else None
        self._idle: list[UpstreamConnection] = []
        self.in_use = 0  # permits held: connections in use, or being opened
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._open: set[UpstreamConnection] = set()
        self.closed = False
        # Response heads seen before (key: `response_key`), each with its sink's memo: a self-hosted
        # server (vLLM, llama.cpp) answers with the same head each time bar Content-Length and Date,
        # so the next answer skips httptools' per-header callbacks and the head rewriting. Hosted
        # APIs put a fresh id in each head: theirs never match. A pool that has seen HEADS_MAX different
        # ones forgets them and stops remembering (and looking up: no cost per answer from then on).
        self.heads: dict[tuple[bytes, ...], object] = {}
        self.remembering = True
        self.known_heads = 0  # responses served from a remembered head

    def take_idle(self) -> UpstreamConnection | None:
        """An idle keep-alive connection, right now (no await), or None: then `acquire`."""
        if self.in_use >= self.limit or self._waiters:
            return None
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if conn.alive and now - conn.idle_since < self.keepalive_s:
                self.in_use += 1
                conn.reused, conn._holding = True, True
                return conn
            conn.abort()
        return None

    async def acquire(self, *, fresh: bool = False) -> UpstreamConnection:
        """An idle keep-alive connection, or a new one (always, with `fresh`). Raises OSError /
        TimeoutError when the upstream can't be reached."""
        conn = None if fresh else self.take_idle()
        if conn is not None:
            return conn
        await self._permit()
        try:
            while self._idle and not fresh:  # one may have come back while we waited
                conn = self._idle.pop()
                if conn.alive and time.monotonic() - conn.idle_since < self.keepalive_s:
                    conn.reused, conn._holding = True, True
                    return conn
                conn.abort()
            loop = asyncio.get_running_loop()
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: UpstreamConnection(self), self.host, self.port, ssl=self._ssl,
                    server_hostname=self.host if self._ssl else None)
            if self.closed:
                conn.abort()
                raise OSError("the gateway is shutting down")
            conn._holding = True
            self._open.add(conn)
            return conn
        except BaseException:
            self._give_back()
            raise

    async def _permit(self) -> None:
        """One of `limit` permits (a connection in use holds one); FIFO when none is free."""
        if self.in_use < self.limit and not self._waiters:
            self.in_use += 1
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut  # the permit is handed over by _give_back (in_use stays the same)
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self._give_back()  # it came just as we were cancelled: pass it on
            raise

    def _give_back(self) -> None:
        while self._waiters:
            w = self._waiters.popleft()
            if not w.done():
                w.set_result(None)
                return
        self.in_use -= 1

    def _release(self, conn: UpstreamConnection) -> None:
        if conn._holding:
            conn._holding = False
            self._give_back()
        if self.closed:
            conn.abort()
            return
        if conn.paused:  # the last client paused it (back-pressure)
            conn.resume()
        conn.idle_since = time.monotonic()
        self._idle.append(conn)

    def _forget(self, conn: UpstreamConnection) -> None:
        self._open.discard(conn)
        if conn._holding:
            conn._holding = False
            self._give_back()

    def close(self) -> None:
        self.closed = True
        for conn in list(self._open):
            conn.abort()
        self._idle.clear()

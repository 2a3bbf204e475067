"""The front door: a protocol that serves plain byte-relay requests itself and gives every other
connection to aiohttp.

Why: aiohttp's server and client together add ~0.5 ms per relayed request on 2 cores, nginx adds
~0.12 ms, and a bare uvloop protocol relay ~0.13 ms (bench/raw_floor.py). Most traffic through a
gateway whose policy does not inspect a route is plain relay, so that path is served here:
requests parsed by httptools, responses by `upstreams.pool`, bytes written from callbacks.

A request is served here only when all of these hold (`Gateway.plan_relay` decides the last ones
with the same code the aiohttp handler uses): HTTP/1.1, GET or POST, a Content-Length body (or
none) within the limits, no Expect/Upgrade, a dialect prefix without percent-escapes, a valid
gateway key when keys are on, valid JSON, a route to an HTTP upstream of the same dialect, no
policy that inspects this request, and tracing off. For anything else, including every error, the
connection is handed to aiohttp's `RequestHandler` with the bytes read so far, and aiohttp serves
it (and the rest of that connection) exactly as before. What the relay does is the same on both
paths (`relay.py` is the aiohttp twin): hop-by-hop headers dropped, keys injected, request id,
gzip decoded, SSE forwarded on event boundaries, a clean dialect error frame when the upstream
fails or truncates a stream, 502/504 before the head, back-pressure both ways, and the upstream
connection closed the moment the client goes away.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import zlib
from dataclasses import dataclass, field
from email.utils import formatdate
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

import httptools
from aiohttp import web
from aiohttp.http import SERVER_SOFTWARE

from gateway import dialects
from gateway.relay import SMALL_BODY, SSE_HEADERS, EventAligner, EventTooLarge
from gateway.server import (
    _STREAM_TERMINATORS,
    GATEWAY_KEY,
    GatewayError,
    error_headers,
    relay_error_frame,
    split_prefix,
)
from gateway.upstreams.http import DROP_REQUEST, DROP_RESPONSE
from gateway.upstreams.pool import CONTENT_LENGTH, UpstreamConnection, UpstreamDisconnected

if TYPE_CHECKING:
    from gateway.server import Gateway, RelayPlan, RequestContext
    from gateway.upstreams.http import HttpUpstream

log = logging.getLogger("guardgate.fastpath")

IDLE_TIMEOUT_S = 75.0  # a keep-alive client connection with no request for this long is closed (as aiohttp)
DRAIN_TIMEOUT_S = 2.0  # after a stream's terminator: how long the rest of the upstream body may take
DRAIN_LIMIT = 1 << 16
PIPELINE_LIMIT = 1 << 16  # bytes of a next request buffered while one is in flight
HEADS_MAX = 256  # request heads remembered per listening socket (FastFront.heads); all forgotten when full
HEAD_REMEMBER_BYTES = 4096  # longer heads are not remembered (an SDK's is ~600 bytes): ≤ ~3 MiB in all
SWEEP_MIN_S, SWEEP_MAX_S = 0.01, 0.5  # how often in-flight relays are checked for timeouts (see FastFront)

# The aiohttp path's header rules (upstreams/http.py, relay.py) as bytes, plus our request id: on
# aiohttp's path CIMultiDict assignment replaces a forged one, here it is dropped before ours is added.
_DROP_REQUEST = frozenset(h.encode() for h in DROP_REQUEST) | {b"x-guardgate-request-id"}
_DROP_RESPONSE = frozenset(h.encode() for h in DROP_RESPONSE) | {b"x-guardgate-request-id"}
_SSE_DROP = frozenset(k.lower().encode() for k in SSE_HEADERS)
_SSE_HEADERS = "".join(f"{k}: {v}\r\n" for k, v in SSE_HEADERS.items()).encode()
_SERVER = f"Server: {SERVER_SOFTWARE}\r\n".encode()
_REASONS = {s.value: s.phrase for s in HTTPStatus}
_STATUS_LINES = {code: b"HTTP/1.1 %d %s\r\n" % (code, phrase.encode()) for code, phrase in _REASONS.items()}
_DROP_RESPONSE_SSE = _DROP_RESPONSE | _SSE_DROP
_NO_BODY = frozenset({204, 304})


class _ServerDate:
    """`Server:` and `Date:` header lines, formatted once per second."""

    sec = -1
    line = b""

    @classmethod
    def get(cls) -> bytes:
        now = int(time.time())
        if now != cls.sec:
            cls.sec, cls.line = now, _SERVER + f"Date: {formatdate(now, usegmt=True)}\r\n".encode()
        return cls.line


def _connection_tokens(headers: list[tuple[bytes, bytes, bytes]]) -> frozenset[bytes]:
    """Header names listed in `Connection:` (hop-by-hop too)."""
    out: set[bytes] = set()
    for _, v, lk in headers:
        if lk == b"connection":
            out.update(t.strip().lower() for t in v.split(b",") if t.strip())
    return frozenset(out)


def error_bytes(dialect: str, err: GatewayError, request_id: str, keep_alive: bool) -> bytes:
    """A whole error response, as `server.error_response` renders it on aiohttp's path."""
    body = json.dumps(dialects.get(dialect).error_body(err.status, err.message, type=err.type, code=err.code,
                                                       param=err.param)).encode()
    head = [b"HTTP/1.1 %d %s\r\n" % (err.status, _REASONS.get(err.status, "Error").encode())]
    head += (f"{k}: {v}\r\n".encode() for k, v in error_headers(err, request_id).items())
    head += (b"Content-Type: application/json; charset=utf-8\r\n", _ServerDate.get(),
             b"Content-Length: %d\r\n" % len(body))
    if not keep_alive:
        head.append(b"Connection: close\r\n")
    return b"".join(head) + b"\r\n" + body


@dataclass(slots=True)
class _Head:
    """What the fast front needs from a request head, derived from the head's bytes alone.

    Kept in `FastFront.heads` under those bytes with the Content-Length digits cut out: a client sends
    the same headers with every request (an SDK does), so the next one skips httptools' per-header
    callbacks and the header rewriting: ~4 us of Python per request for a 6-header head, ~15 us for
    the openai SDK's 17 headers (bench/fastpath_cpu.py). A request is looked up when a read starts
    it and holds its whole head; the head then differs from one httptools accepted in the digits of
    its single Content-Length alone, which parse the same way. Its body may come in later reads."""

    method: str
    path: str
    split: tuple[str, str, str] | None  # (prefix, dialect, tail); None: not ours to serve (hand off)
    query: bytes | None
    auth: str | None
    ctype: str | None
    request_id: str | None
    keep_alive: bool
    lines: bytes  # the client's header lines that go upstream (hop-by-hop ones and ours dropped)
    has_accept: bool
    has_ctype: bool
    starts: dict[str, tuple[str | None, bytes]] = field(default_factory=dict)  # upstream -> (auth, head start)
    plans: dict[str | None, RelayPlan] = field(default_factory=dict)  # see Gateway.plan_relay

    def upstream_request(self, upstream: HttpUpstream, new_auth: str | None, rid_line: bytes, body: bytes) -> bytes:
        """The request for `upstream`, as aiohttp's path would send it (upstreams/http.py)."""
        known = self.starts.get(upstream.name)
        if known is None or known[0] != new_auth:  # the key is read per request: it may change
            pool = upstream.pool
            assert pool is not None and self.split is not None
            target = pool.path.encode() + self.split[2].encode()
            if self.query:
                target += b"?" + self.query
            start = b"%s %s HTTP/1.1\r\nHost: %s\r\n%s" % (self.method.encode(), target, pool.host_header.encode(),
                                                             self.lines)
            if new_auth:
                start += b"Authorization: " + new_auth.encode("latin-1") + b"\r\n"
            known = self.starts[upstream.name] = (new_auth, start)
        out = [known[1], rid_line]
        if not self.has_accept:
            out.append(b"Accept: */*\r\n")
        out.append(b"Accept-Encoding: gzip, deflate\r\n")
        if body or self.method == "POST":
            if not self.has_ctype and body:
                out.append(b"Content-Type: application/octet-stream\r\n")
            out.append(b"Content-Length: %d\r\n" % len(body))
        out += (b"\r\n", body)
        return b"".join(out)


def _head_key(data: bytes, end: int) -> tuple[tuple[bytes, ...], int]:
    """(key in FastFront.heads, Content-Length) of the head `data[:end]`: the head without the digits of
    its first Content-Length. Only heads with one are remembered, so a second one (left in the key)
    never matches."""
    m = CONTENT_LENGTH.search(data, 0, end + 2)
    if m is None:
        return (data[:end],), 0
    return (data[:m.start(1)], data[m.end(1):end]), int(m.group(1))


class FastFront:
    """Shared by all connections of one listening socket: the gateway, aiohttp's handler factory,
    and the connections for graceful shutdown."""

    def __init__(self, gw: Gateway, handler_factory: web.Server) -> None:
        self.gw = gw
        self.handler_factory = handler_factory
        self.conns: set[FrontProtocol] = set()
        self.closing = False
        self.served = 0  # requests answered here (relayed, or refused with an error)
        self.handed_off = 0  # connections given to aiohttp
        self.known_heads = 0  # requests served from a remembered head (see _Head)
        self.max_header = gw.cfg.limits.max_header_bytes
        self.max_body = gw.cfg.limits.max_body_bytes
        # Upstream timeouts are checked by one sweep over the relays in flight rather than a timer per
        # request (call_later + cancel was ~2 us of a ~26 us request): a timeout fires up to a tenth
        # of the shortest configured one late (aiohttp rounds timeouts over 5 s up to the second).
        shortest = min((t for u in gw.cfg.upstreams.values() for t in (u.timeouts.read, u.timeouts.total) if t),
                       default=SWEEP_MAX_S * 10)
        self.sweep_s = min(SWEEP_MAX_S, max(SWEEP_MIN_S, shortest / 10))
        self.in_flight: set[_Relay] = set()
        self.heads: dict[tuple[bytes, ...], _Head] = {}  # see _Head
        self._sweeper: asyncio.TimerHandle | None = None

    def __call__(self) -> FrontProtocol:
        return FrontProtocol(self)

    def watch(self, relay: _Relay) -> None:
        """Check `relay`'s timeouts from now until it is `unwatch`ed."""
        self.in_flight.add(relay)
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(self.sweep_s, self._sweep)

    def unwatch(self, relay: _Relay) -> None:
        self.in_flight.discard(relay)

    def _sweep(self) -> None:
        now = time.monotonic()
        for relay in list(self.in_flight):
            relay.check_timeouts(now)
        self._sweeper = (asyncio.get_running_loop().call_later(self.sweep_s, self._sweep)
                         if self.in_flight else None)

    async def shutdown(self, timeout: float) -> None:
        """Stop taking requests: idle connections close now, in-flight responses may finish within
        `timeout` seconds, then what is left is cut."""
        self.closing = True
        for c in list(self.conns):
            if c.relay is None and not c.raw:
                c.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while any(c.relay is not None for c in self.conns):
                    await asyncio.sleep(0.05)
        for c in list(self.conns):
            c.close()


class FastSite(web.TCPSite):
    """`web.TCPSite` whose connections start in the fast front (aiohttp gets them on hand-off)."""

    front: FastFront | None = None

    async def start(self) -> None:
        self._runner._reg_site(self)
        server = self._runner.server
        assert server is not None
        app = getattr(self._runner, "app", None)
        gw = app.get(GATEWAY_KEY) if app is not None else None
        self.front = FastFront(gw, server) if gw is not None else None
        factory: Any = self.front if self.front is not None and self.front.gw.cfg.fast_path else server
        self._server = await asyncio.get_running_loop().create_server(
            factory, self._host, self._port, ssl=self._ssl_context, backlog=self._backlog,
            reuse_address=self._reuse_address, reuse_port=self._reuse_port)
        self._bound_port = self._server.sockets[0].getsockname()[1] if self._server.sockets else self._port

    async def stop(self) -> None:
        await super().stop()
        if self.front is not None:
            await self.front.shutdown(self._runner._shutdown_timeout)


class FrontProtocol(asyncio.Protocol):
    """One client connection while it is ours."""

    def __init__(self, front: FastFront) -> None:
        self.front = front
        self.transport: asyncio.Transport | None = None
        self.raw = bytearray()  # bytes of the request being read (replayed to aiohttp on hand-off)
        self.relay: _Relay | None = None
        self.writing_paused = False
        self.reading_paused = False
        self.last_active = time.monotonic()
        self._idle_timer: asyncio.TimerHandle | None = None
        self._new_request()

    def _new_request(self, fresh_parser: bool = True) -> None:
        if fresh_parser:  # else reuse: llhttp starts afresh after each whole message
            self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.headers: list[tuple[bytes, bytes, bytes]] = []  # name, value, lower-cased name
        self.connection_header = False
        self.content_lengths = 0
        self.awaiting: tuple[_Head, int, int] | None = None  # a remembered head, its body not all in yet:
        # (head, where the body starts, where it ends) in self.raw
        self.body: list[bytes] = []
        self.complete = False
        self.keep_alive = False
        self.method = b""
        self.auth: str | None = None
        self.ctype: str | None = None
        self.request_id: str | None = None
        self.refuse = False
        self.head_done = False

    # ---------------------------------------------------------------- connection

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.front.conns.add(self)
        self._idle_timer = asyncio.get_running_loop().call_later(IDLE_TIMEOUT_S, self._idle_check)

    def connection_lost(self, exc: Exception | None) -> None:
        self.front.conns.discard(self)
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        if self.relay is not None:
            self.relay.client_gone()
            self.relay = None

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def pause_writing(self) -> None:
        self.writing_paused = True
        if self.relay is not None:
            self.relay.pause_upstream()

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self.relay is not None:
            self.relay.resume_upstream()

    def _idle_check(self) -> None:
        now = time.monotonic()
        if self.relay is None and now - self.last_active >= IDLE_TIMEOUT_S:
            self.close()
            return
        self._idle_timer = asyncio.get_running_loop().call_later(
            max(1.0, IDLE_TIMEOUT_S - (now - self.last_active)), self._idle_check)

    # ---------------------------------------------------------------- reading requests

    def data_received(self, data: bytes) -> None:
        self.last_active = time.monotonic()
        # A read that starts a request (nothing of it is in the parser yet) may be a known head; a whole
        # request served so is never copied into self.raw.
        if not self.raw and self.relay is None and self._known(data):
            return
        self.raw += data
        if self.relay is not None:  # a pipelined request: read once the response is out
            if len(self.raw) > PIPELINE_LIMIT and self.transport is not None:
                self.transport.pause_reading()
                self.reading_paused = True
            return
        if self.awaiting is not None:
            self._await_body()
        else:
            self._parse(data)

    def _known(self, data: bytes) -> bool:
        """A request whose head the front has seen before (see _Head): served without parsing it, now
        or once its body is in (httpx, under the openai SDK, writes the head and the body apart)."""
        end = data.find(b"\r\n\r\n")
        if end < 0:
            return False
        key, length = _head_key(data, end)
        head = self.front.heads.get(key)
        if (head is None or end + 4 + length < len(data) or length > self.front.max_body
                or end > self.front.max_header or self.front.closing):
            return False
        self.front.known_heads += 1
        if len(data) == end + 4 + length:  # the whole request in this read (the common case)
            self._serve(head, data[end + 4:], head.keep_alive, data)
        else:
            self.raw += data
            self.awaiting = head, end + 4, end + 4 + length
        return True

    def _await_body(self) -> None:
        assert self.awaiting is not None
        head, start, end = self.awaiting
        if len(self.raw) < end:
            return
        self.awaiting = None
        if len(self.raw) > end:  # a pipelined request behind it: the parser takes both, from the start
            self._parse(bytes(self.raw))
            return
        self._serve(head, bytes(memoryview(self.raw)[start:]), head.keep_alive)

    def _parse(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.refuse = True  # aiohttp answers the malformed request in its own way
        if not self.refuse and not self.head_done and len(self.raw) > self.front.max_header:
            self.refuse = True
        if self.refuse:
            self.hand_off()
        elif self.complete:
            self._start()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        lk = name.lower()
        self.headers.append((name, value, lk))
        if lk == b"connection":
            self.connection_header = True

    def on_headers_complete(self) -> None:
        self.head_done = True
        p = self.parser
        self.method = p.get_method()
        head_len = self.raw.find(b"\r\n\r\n")
        if (head_len < 0 or head_len > self.front.max_header or self.front.closing
                or p.get_http_version() != "1.1" or self.method not in (b"GET", b"POST") or p.should_upgrade()):
            self.refuse = True
            return
        for _, v, lk in self.headers:
            if lk == b"authorization":
                self.auth = v.decode("latin-1")
            elif lk == b"content-type":
                self.ctype = v.decode("latin-1")
            elif lk == b"x-request-id":
                self.request_id = v.decode("latin-1")
            elif lk == b"transfer-encoding" or lk == b"expect":
                self.refuse = True
            elif lk == b"content-length":
                self.content_lengths += 1
                try:
                    if int(v) > self.front.max_body:
                        self.refuse = True
                except ValueError:
                    self.refuse = True

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.complete = True
        self.keep_alive = self.parser.should_keep_alive()  # llhttp forgets it once the callback returns

    def hand_off(self) -> None:
        """aiohttp takes this connection from here on, starting with the bytes of this request."""
        tr = self.transport
        if tr is None or tr.is_closing():
            return
        self.front.conns.discard(self)
        self.front.handed_off += 1
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        handler = self.front.handler_factory()
        tr.set_protocol(handler)
        handler.connection_made(tr)
        if self.reading_paused:
            tr.resume_reading()
        if self.raw:
            handler.data_received(bytes(self.raw))
        self.raw = bytearray()

    # ---------------------------------------------------------------- serving

    def _start(self) -> None:
        """httptools has read a whole request: remember its head, and serve it."""
        body = b"".join(self.body)
        end = self.raw.find(b"\r\n\r\n")
        if end < 0 or end + 4 + len(body) != len(self.raw):  # LF-only heads or pipelined bytes
            self.hand_off()
            return
        head = self._head()
        if end <= HEAD_REMEMBER_BYTES:
            key, length = _head_key(bytes(self.raw[:end + 2]), end)
            # Remembered only when the Content-Length the key cut out is the one httptools framed the
            # body by (and the only one).
            if length == len(body) and self.content_lengths == len(key) - 1:
                heads = self.front.heads
                if len(heads) >= HEADS_MAX:
                    heads.clear()
                heads[key] = head
        self._serve(head, body, self.keep_alive)

    def _head(self) -> _Head:
        url = httptools.parse_url(self.url)
        path = url.path.decode("latin-1")
        drop = _DROP_REQUEST | _connection_tokens(self.headers) if self.connection_header else _DROP_REQUEST
        lines = []
        has_accept = has_ctype = False
        for k, v, lk in self.headers:
            if lk not in drop:
                lines += (k, b": ", v, b"\r\n")
                has_accept = has_accept or lk == b"accept"
                has_ctype = has_ctype or lk == b"content-type"
        return _Head(self.method.decode(), path, None if "%" in path or url.fragment else split_prefix(path),
                     url.query, self.auth, self.ctype, self.request_id, self.keep_alive, b"".join(lines),
                     has_accept, has_ctype)

    def _serve(self, head: _Head, body: bytes, keep_alive: bool, read: bytes = b"") -> None:
        """Relay the request, answer its error, or hand it to aiohttp (`read`: the whole request, when
        it came in one read that was not copied into self.raw)."""
        keep_alive = keep_alive and not self.front.closing
        gw = self.front.gw
        ctx = None if head.split is None else gw.fast_context(head.split, head.request_id)
        upstream = None
        try:
            if ctx is not None:
                upstream = gw.plan_relay(ctx, head.method, head.path, head.auth, head.ctype, body, head.plans)
        except GatewayError as e:  # answered here as aiohttp's path would: the request is fully read
            assert ctx is not None and self.transport is not None
            if self.raw:
                self.raw = bytearray()
            self.front.served += 1
            ctx.outcome = e.code
            self.transport.write(error_bytes(ctx.dialect, e, ctx.id, keep_alive))
            gw.record_fast_request(ctx, e.status, head.method)
            self.finished(keep_alive)
            return
        except Exception:  # anything odd: aiohttp's path decides and answers
            log.debug("fast path declined a request", exc_info=True)
        if upstream is None or upstream.pool is None:
            if read:
                self.raw += read
            self.hand_off()
            return
        assert ctx is not None
        rid_line = b"X-Guardgate-Request-Id: %s\r\n" % ctx.id.encode()
        request = head.upstream_request(upstream, upstream.auth_header(head.auth, gateway_keys_on=gw.keys_on),
                                        rid_line, body)
        conn = upstream.pool.take_idle()
        if conn is not None:  # the common case: the request goes out first, the relay is set up after
            conn.send(request)
        if self.raw:
            self.raw = bytearray()
        self.front.served += 1
        self.relay = _Relay(self, ctx, upstream, head.method, request, rid_line, keep_alive)
        self.relay.start(conn)

    def finished(self, keep_alive: bool) -> None:
        """The response is out (or abandoned): next request, or close."""
        self.relay = None
        self.last_active = time.monotonic()
        if not keep_alive or self.front.closing:
            self.close()
            return
        if self.head_done:  # the parser read this request (else it came from a known head: nothing to reset)
            self._new_request(fresh_parser=bool(self.raw))  # pipelined bytes: the parser has seen some of them
        if self.reading_paused and self.transport is not None:
            self.reading_paused = False
            self.transport.resume_reading()
        if self.raw:  # a request that arrived while the last one was being answered
            pending = bytes(self.raw)
            self.raw = bytearray(pending)
            self._parse(pending)


class _Drain:
    """After a stream's terminator: reads the rest of the upstream body so the connection can go
    back to the pool; gives up (closes it) past `DRAIN_LIMIT` bytes or `DRAIN_TIMEOUT_S`."""

    def __init__(self, conn: UpstreamConnection) -> None:
        self.conn = conn
        self.n = 0
        asyncio.get_running_loop().call_later(DRAIN_TIMEOUT_S, self._expire)

    def _expire(self) -> None:
        if self.conn.sink is self:
            self.conn.abort()

    def on_head(self, status: int, headers: list[tuple[bytes, bytes, bytes]]) -> None:
        pass

    def on_body(self, data: bytes) -> None:
        self.n += len(data)
        if self.n > DRAIN_LIMIT:
            self.conn.abort()

    def on_end(self) -> None:
        pass

    def on_error(self, exc: Exception) -> None:
        pass

    def flush(self) -> None:
        pass

    def memo(self) -> None:
        return None

    def on_known(self, memo: object, body: bytes) -> None:
        pass


class _Relay:
    """One request relayed: sends it upstream, and is the sink its response flows through."""

    __slots__ = ("aligner", "buffered", "client", "conn", "ctx", "deadline", "decoder", "done", "head", "head_sent",
                 "keep_alive", "memo_head", "method", "out", "request", "retried", "rid_line", "sent_at", "sse",
                 "status", "task", "transport", "upstream", "upstream_s")

    def __init__(self, client: FrontProtocol, ctx: RequestContext, upstream: HttpUpstream, method: str,
                 request: bytes, rid_line: bytes, keep_alive: bool) -> None:
        self.client = client
        self.transport = client.transport
        self.ctx = ctx
        self.upstream = upstream
        self.request = request
        self.rid_line = rid_line  # our X-Guardgate-Request-Id header line, sent both ways
        self.keep_alive = keep_alive
        self.method = method
        self.conn: UpstreamConnection | None = None
        self.task: asyncio.Task[None] | None = None
        self.sent_at = 0.0
        self.upstream_s: float | None = None
        self.deadline: float | None = None
        self.retried = False
        self.done = False
        self.head_sent = False
        self.status = 0
        self.out: list[bytes] = []
        self.buffered: list[bytes] | None = None  # small non-SSE body, sent whole with Content-Length
        self.head = b""
        self.decoder: Any = None
        self.sse = False
        self.aligner: EventAligner | None = None  # SSE: whole events only
        self.memo_head: bytes | None = None  # see memo

    # ---------------------------------------------------------------- request

    def start(self, conn: UpstreamConnection | None) -> None:
        """`conn`: the pooled connection the request was just sent on; None: none was idle, connect."""
        t = self.upstream.cfg.timeouts
        if t.total:
            self.deadline = time.monotonic() + t.total
        if conn is not None:
            self._begin(conn)
        else:
            self.task = asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self, fresh: bool = False) -> None:
        try:
            conn = await self.upstream.pool.acquire(fresh=fresh)  # type: ignore[union-attr]
        except TimeoutError:
            self._error(504, f"upstream {self.upstream.name} timed out", "upstream_timeout")
            return
        except OSError as e:
            self._error(502, f"cannot connect to upstream {self.upstream.name}: {e.strerror or e}",
                        "upstream_unreachable")
            return
        if self.done:  # the client left while we connected
            conn.pool._release(conn)
            return
        conn.send(self.request)
        self._begin(conn)

    def _begin(self, conn: UpstreamConnection) -> None:
        self.conn = conn
        self.sent_at = time.monotonic()
        if self.client.writing_paused:
            conn.pause()
        conn.start(self)
        self.client.front.watch(self)

    def check_timeouts(self, now: float) -> None:
        """The whole-exchange deadline, and the read timeout (not while the client is what is slow)."""
        if self.done or self.conn is None:  # connecting: the pool's connect timeout applies
            return
        if (self.deadline is not None and now >= self.deadline) or (
                not self.client.writing_paused and now - self.conn.last_read >= self.upstream.cfg.timeouts.read):
            conn, self.conn = self.conn, None
            conn.abort()
            self._failed(TimeoutError())

    def pause_upstream(self) -> None:
        if self.conn is not None:
            self.conn.pause()

    def resume_upstream(self) -> None:
        if self.conn is not None:
            self.conn.resume()
            self.conn.last_read = time.monotonic()  # a slow reader is not an idle upstream

    def client_gone(self) -> None:
        """The client closed its connection: drop the upstream request at once."""
        if self.done:
            return
        self.ctx.outcome = self.ctx.outcome or "client_disconnected"
        if self.task is not None and not self.task.done():
            self.task.cancel()
        if self.conn is not None:
            self.conn.abort()
            self.conn = None
        self._complete(499)

    # ---------------------------------------------------------------- the response (ResponseSink)

    def on_head(self, status: int, headers: list[tuple[bytes, bytes, bytes]]) -> None:
        ctx = self.ctx
        now = time.monotonic()
        ctx.ttfb_ms = (time.perf_counter() - ctx.started) * 1000
        self.upstream_s = now - self.sent_at  # recorded once the response is out
        self.status = status
        ctype = encoding = b""
        length: int | None = None
        tokens = False
        for _, v, lk in headers:
            if lk == b"content-type":
                ctype = v
            elif lk == b"content-length":
                try:
                    length = int(v)
                except ValueError:
                    pass
            elif lk == b"content-encoding":
                encoding = v.strip().lower()
            elif lk == b"connection":
                tokens = True
        self.sse = b"text/event-stream" in ctype
        drop = _DROP_RESPONSE_SSE if self.sse else _DROP_RESPONSE
        if tokens:
            drop = drop | _connection_tokens(headers)
        if encoding in (b"gzip", b"x-gzip"):
            self.decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif encoding == b"deflate":
            self.decoder = zlib.decompressobj()
        elif encoding not in (b"", b"identity"):
            drop = drop - {b"content-encoding"}  # not one we decode: the client gets it as it is
        line = _STATUS_LINES.get(status)
        out = [line if line is not None else b"HTTP/1.1 %d Unknown\r\n" % status]
        for k, v, lk in headers:
            if lk not in drop:
                out += (k, b": ", v, b"\r\n")
        prefix = b"".join(out)  # the part that depends on the upstream's head alone
        if not self.sse and self.decoder is None and status not in _NO_BODY:
            self.memo_head = prefix  # what on_known starts from, for the next such head (pool.heads)
        out = [prefix, self.rid_line, _ServerDate.get()]
        if self.sse:
            out.append(_SSE_HEADERS)
            self.aligner = EventAligner(_STREAM_TERMINATORS.get((ctx.dialect, ctx.tail)))
        if not self.keep_alive:
            out.append(b"Connection: close\r\n")
        if status in _NO_BODY:
            self.head = b"".join(out) + b"\r\n"
            self.buffered = []
        elif not self.sse and length is not None and length <= SMALL_BODY:
            self.head = b"".join(out)
            self.buffered = []
        else:
            out.append(b"Transfer-Encoding: chunked\r\n\r\n")
            self.out.append(b"".join(out))
            self.head_sent = True

    def memo(self) -> tuple[int, bytes] | None:
        """A plain answer (not SSE, not encoded) that came whole: its status and the start of the head
        `on_head` made of it, which depend on the upstream's head alone (pool.heads)."""
        return None if self.memo_head is None or self.buffered is None else (self.status, self.memo_head)

    def on_known(self, memo: object, body: bytes) -> None:
        """A whole answer whose head matched a `memo`: as on_head, on_body and on_end would serve it."""
        if self.done:
            return
        status, head = memo  # type: ignore[misc]
        self.ctx.ttfb_ms = (time.perf_counter() - self.ctx.started) * 1000
        self.upstream_s = time.monotonic() - self.sent_at
        out = [head, self.rid_line, _ServerDate.get()]
        if not self.keep_alive:
            out.append(b"Connection: close\r\n")
        out += (b"Content-Length: %d\r\n\r\n" % len(body), body)
        self.out.append(b"".join(out))
        self.head_sent = True
        self.conn = None  # it goes back to the pool by itself
        self._complete(status)

    def on_body(self, data: bytes) -> None:
        if self.done:
            return
        if self.decoder is not None:
            try:
                data = self.decoder.decompress(data)
            except zlib.error:
                self._fail_upstream("upstream sent a body that does not decompress")
                return
            if not data:
                return
        if self.buffered is not None:
            self.buffered.append(data)
        elif self.sse:
            self._sse(data)
        else:
            self._chunk(data)

    def on_end(self) -> None:
        if self.done:
            return
        if self.decoder is not None:
            rest = self.decoder.flush()
            self.decoder = None
            if rest:
                self.on_body(rest)
        if self.buffered is not None:
            if self.status in _NO_BODY:
                self.out.append(self.head)
            else:
                body = b"".join(self.buffered)
                self.out += (self.head, b"Content-Length: %d\r\n\r\n" % len(body), body)
            self.head_sent = True
        elif self.aligner is not None:
            tail, cut = self.aligner.finish()
            if tail:
                self._chunk(tail)
            elif cut:
                self._error_frame(cut, "upstream_truncated")
            self.out.append(b"0\r\n\r\n")
        else:
            self.out.append(b"0\r\n\r\n")
        self.conn = None  # it goes back to the pool by itself
        self._complete(self.status)

    def on_error(self, exc: Exception) -> None:
        reused = self.conn is not None and self.conn.reused
        self.conn = None  # already closed
        if self.done:
            return
        if reused and isinstance(exc, UpstreamDisconnected) and exc.nothing_received and not self.retried:
            # A reused keep-alive connection the upstream had closed (it saw nothing of this request):
            # send it once more on a fresh connection, as HTTP clients do for an idle close.
            self.retried = True
            self.task = asyncio.get_running_loop().create_task(self._connect(fresh=True))
            return
        self._failed(exc)

    def flush(self) -> None:
        if self.out and self.transport is not None:
            data = b"".join(self.out) if len(self.out) > 1 else self.out[0]
            self.out.clear()
            self.transport.write(data)
        if self.done:
            self._flushed_done()

    # ---------------------------------------------------------------- SSE

    def _chunk(self, data: bytes) -> None:
        self.out += (b"%x\r\n" % len(data), data, b"\r\n")

    def _error_frame(self, message: str, code: str) -> None:
        self.ctx.outcome = self.ctx.outcome or code
        self._chunk(relay_error_frame(self.ctx.dialect, message, code))

    def _sse(self, chunk: bytes) -> None:
        """As `relay.relay_response`: whole events only, the terminator ends the response."""
        assert self.aligner is not None
        try:
            block, end = self.aligner.feed(chunk)
        except EventTooLarge as e:
            self._error_frame(str(e), "upstream_event_too_large")
            self.out.append(b"0\r\n\r\n")
            conn, self.conn = self.conn, None
            if conn is not None:
                conn.abort()
            self._complete(self.status)
            return
        if block:
            self._chunk(block)
        if end:
            self._end_at_terminator()

    def _end_at_terminator(self) -> None:
        """[DONE] is out: end the client's response now; the upstream connection drains on its own."""
        self.out.append(b"0\r\n\r\n")
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.detach(_Drain(conn))
        self._complete(self.status)

    # ---------------------------------------------------------------- failures and the end

    def _fail_upstream(self, message: str) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.abort()
        self._failed(ValueError(message))

    def _failed(self, exc: BaseException) -> None:
        timeout = isinstance(exc, TimeoutError)
        name = self.upstream.name
        if not self.head_sent:
            if self.buffered is not None:  # the head came, the body did not
                msg = "upstream timed out while sending its answer" if timeout else \
                    f"upstream failed while sending its answer: {exc}"
            else:
                msg = f"upstream {name} timed out" if timeout else f"upstream {name} failed: {exc}"
            self._error(504 if timeout else 502, msg, "upstream_timeout" if timeout else "upstream_error")
        elif self.sse:
            self._error_frame("the upstream stream failed before it finished", "upstream_error")
            self.out.append(b"0\r\n\r\n")
            self._complete(self.status)
            self.flush()
        else:  # mid-body, no way to say so in HTTP/1.1 but to cut the connection
            self.ctx.outcome = self.ctx.outcome or "upstream_error"
            self.keep_alive = False
            if self.transport is not None:
                self.transport.abort()
            self._complete(self.status)
            self._flushed_done()

    def _error(self, status: int, message: str, code: str) -> None:
        """An error answered before any of the upstream's response went out, in the client's dialect."""
        if self.done:
            return
        self.ctx.outcome = code
        self.out.append(error_bytes(self.ctx.dialect, GatewayError(status, message, code, type="api_error"),
                                    self.ctx.id, self.keep_alive))
        self.head_sent = True
        self._complete(status)
        self.flush()

    def _complete(self, status: int) -> None:
        """The response is decided; it is recorded and the connection moves on once it is written
        (`flush`), so metrics and the access log cost the client nothing."""
        if self.done:
            return
        self.done = True
        self.status = status
        self.client.front.unwatch(self)
        if status == 499:
            self._flushed_done()

    def _flushed_done(self) -> None:
        if self.client.relay is not self:
            return
        gw = self.client.front.gw
        gw.record_fast_request(self.ctx, self.status, self.method, self.upstream.name, self.upstream_s)
        self.client.finished(self.keep_alive and self.status != 499)

"""An HTTP upstream: one pooled aiohttp ClientSession, header hygiene, key injection.

The server relays bytes through `HttpUpstream.send` (the fast path) or decodes them with the
upstream's dialect (translation / guarded path). This module knows how to reach a provider, not
what its bytes mean.
"""

from __future__ import annotations

import asyncio
import socket
import weakref
from collections.abc import Mapping

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from gateway.config import UpstreamConfig
from gateway.upstreams.base import UpstreamError

# RFC 9110 §7.6.1 hop-by-hop headers, plus ones a proxy must not pass on as-is.
HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection", "Keep-Alive", "Proxy-Connection", "Proxy-Authenticate", "Proxy-Authorization",
        "TE", "Trailer", "Transfer-Encoding", "Upgrade",
    )
)
# Never forwarded upstream: set by aiohttp or by us; and method overrides, which would make the
# upstream run another method than the one the gateway classified.
DROP_REQUEST = HOP_BY_HOP | {"host", "content-length", "accept-encoding", "authorization", "expect",
                             "x-http-method-override", "x-http-method", "x-method-override"}
REDACTED = b"[REDACTED]"
# Never passed back: aiohttp decompresses and re-frames the body.
DROP_RESPONSE = HOP_BY_HOP | {"content-length", "content-encoding", "date", "server"}


def _connection_named(headers: Mapping[str, str]) -> set[str]:
    """Headers listed in `Connection:` are hop-by-hop too."""
    value = headers.get("Connection", "")
    return {t.strip().lower() for t in value.split(",") if t.strip()}


def request_headers(client: Mapping[str, str], auth: str | None, request_id: str,
                    extra: Mapping[str, str] | None = None) -> CIMultiDict[str]:
    """Headers for the upstream request: the client's minus hop-by-hop, plus the chosen auth."""
    drop = DROP_REQUEST | _connection_named(client)
    out: CIMultiDict[str] = CIMultiDict()
    for k, v in client.items():
        if k.lower() not in drop:
            out.add(k, v)
    if auth:
        out["Authorization"] = auth
    out["X-Guardgate-Request-Id"] = request_id
    if extra:
        out.update(extra)
    return out


def response_headers(upstream: Mapping[str, str]) -> CIMultiDict[str]:
    drop = DROP_RESPONSE | _connection_named(upstream)
    out: CIMultiDict[str] = CIMultiDict()
    for k, v in upstream.items():
        if k.lower() not in drop:
            out.add(k, v)
    return out


_DRAINING: weakref.WeakSet[aiohttp.ClientResponse] = weakref.WeakSet()
_DRAIN_TASKS: set[asyncio.Task[None]] = set()


def release_after_eof(resp: aiohttp.ClientResponse, timeout: float = 2.0, limit: int = 1 << 16) -> None:
    """The stream is complete (its terminator came) but the body's end may not have arrived yet:
    read it in the background and hand the connection back to the pool, so the next request needs
    no new TCP/TLS handshake; close it instead if more than `limit` bytes or no end comes within
    `timeout`. Nobody waits for this. The caller must not close `resp` afterwards (see `draining`)."""
    if resp.content.at_eof():
        resp.release()
        return

    async def drain() -> None:
        try:
            n = 0
            async with asyncio.timeout(timeout):
                while chunk := await resp.content.readany():
                    n += len(chunk)
                    if n > limit:
                        raise ValueError("too much data after the stream's terminator")
            resp.release()  # at EOF: the connection goes back to the pool
        except BaseException:
            resp.close()
        finally:
            _DRAINING.discard(resp)

    _DRAINING.add(resp)
    task = asyncio.get_running_loop().create_task(drain())
    _DRAIN_TASKS.add(task)
    task.add_done_callback(_DRAIN_TASKS.discard)


def draining(resp: aiohttp.ClientResponse) -> bool:
    """True while `release_after_eof` owns `resp`."""
    return resp in _DRAINING


class HttpUpstream:
    """One provider endpoint with its own connection pool."""

    def __init__(self, cfg: UpstreamConfig) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.dialect = cfg.dialect
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        t = self.cfg.timeouts
        connector = aiohttp.TCPConnector(limit=self.cfg.max_connections, ttl_dns_cache=300,
                                         family=socket.AF_UNSPEC, keepalive_timeout=30)
        self._session = aiohttp.ClientSession(
            connector=connector,
            # `connect` bounds the wait for a free pooled connection as well as the connect itself:
            # with every connection held (clients streaming slowly), a request gets 503, not a hang.
            timeout=aiohttp.ClientTimeout(total=t.total, connect=t.connect, sock_connect=t.connect, sock_read=t.read),
            auto_decompress=True,
            skip_auto_headers=("User-Agent",),
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def auth_header(self, client_auth: str | None, gateway_keys_on: bool) -> str | None:
        """The upstream key wins; else the client's own Authorization, unless it was a gateway key."""
        key = self.cfg.api_key()
        if key:
            return f"Bearer {key}"
        if gateway_keys_on:
            return None
        return client_auth

    def redact(self, data: bytes) -> bytes:
        """`data` with the upstream key cut out: an upstream error that echoes the key it was sent
        (some do, for a key it rejects) must not hand it to the client."""
        key = self.cfg.api_key()
        return data.replace(key.encode(), REDACTED) if key and len(key) >= 8 else data

    async def send(self, method: str, path: str, query: str, headers: Mapping[str, str],
                   body: bytes | None) -> aiohttp.ClientResponse:
        """Start a request; the caller owns the response (must release/close it).

        `path` is canonical (gateway.endpoints) and `query` raw, so the URL is used as it is
        (`encoded=True`): nothing decodes or resolves it on the way, and the upstream receives the
        path that was classified, under the configured base path."""
        assert self._session is not None, "upstream not started"
        url = URL(self.cfg.base_url + path + (f"?{query}" if query else ""), encoded=True)
        try:
            return await self._session.request(method, url, data=body, headers=headers,
                                               allow_redirects=False)
        except aiohttp.ConnectionTimeoutError:
            raise UpstreamError(f"no connection to upstream {self.name} within {self.cfg.timeouts.connect} s (all "
                                f"{self.cfg.max_connections} busy, or it does not answer); retry later", status=503,
                                code="upstream_unavailable") from None
        except TimeoutError:
            raise UpstreamError(f"upstream {self.name} timed out", status=504, code="upstream_timeout") from None
        except aiohttp.ClientConnectorError as e:
            raise UpstreamError(f"cannot connect to upstream {self.name}: {e.os_error.strerror or e}",
                                status=502, code="upstream_unreachable") from None
        except aiohttp.ClientError as e:
            raise UpstreamError(f"upstream {self.name} failed: {type(e).__name__}", status=502,
                                code="upstream_error") from None

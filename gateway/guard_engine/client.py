"""A worker's connection to a guard engine: JSON calls, a deadline on each, and the engine's health.

One client per engine URL and event loop, shared by every guard of the process. A call that fails
(engine gone, refused, too slow, an error answer) raises `EngineUnavailable`: the guard turns it
into an error verdict (the step's `on_error`), never a pass. A background probe keeps `status()`
current for /readyz: "failed" while the engine does not answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import Any

import aiohttp

from gateway.guard_engine.protocol import HEALTH, WORKER_HEADER

log = logging.getLogger("guardgate.guard_engine")

PROBE_INTERVAL_S = 1.0
PROBE_TIMEOUT_S = 2.0


class EngineUnavailable(RuntimeError):
    """The guard engine did not answer, or answered with an error."""

    def __init__(self, message: str, code: str = "engine_unavailable", status: int = 0) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


class EngineClient:
    """Calls to one engine (`unix:/path.sock` or `http://host:port`)."""

    def __init__(self, url: str) -> None:
        self.url = url
        if url.startswith("unix:"):
            self._socket: str | None = url.removeprefix("unix:").removeprefix("//")
            self._base = "http://guard-engine"
        else:
            self._socket = None
            self._base = url.rstrip("/")
        self._http: aiohttp.ClientSession | None = None
        self._probe: asyncio.Task[None] | None = None
        self.ok: bool | None = None  # None: not known yet
        self.reason = "not contacted yet"
        self.last_ok = 0.0

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None or self._http.closed:
            if self._socket is not None:
                conn: aiohttp.BaseConnector = aiohttp.UnixConnector(path=self._socket, limit=0)
            else:
                conn = aiohttp.TCPConnector(limit=0)
            self._http = aiohttp.ClientSession(connector=conn, headers={WORKER_HEADER: str(os.getpid())})
        return self._http

    def _mark(self, ok: bool, reason: str = "") -> None:
        if ok:
            if self.ok is False:
                log.warning("guard engine %s answers again", self.url)
            self.ok, self.reason, self.last_ok = True, "", time.monotonic()
        else:
            if self.ok is not False:
                log.error("guard engine %s unavailable: %s", self.url, reason)
            self.ok, self.reason = False, reason

    async def call(self, path: str, body: dict[str, Any] | None, timeout_s: float) -> dict[str, Any]:
        """POST `body` (GET when None) and return the JSON answer; EngineUnavailable on any failure."""
        http = self._session()
        url = self._base + path
        try:
            async with asyncio.timeout(timeout_s):
                req = http.get(url) if body is None else http.post(url, json=body)
                async with req as resp:
                    data = await resp.json(content_type=None)
                    status = resp.status
        except TimeoutError:
            reason = f"no answer within {timeout_s:g} s"
            self._mark(False, reason)
            raise EngineUnavailable(f"guard engine {self.url}: {reason}", "engine_timeout") from None
        except (aiohttp.ClientError, OSError, ValueError) as e:
            reason = f"{type(e).__name__}: {e}"
            self._mark(False, reason)
            raise EngineUnavailable(f"guard engine {self.url}: {reason}") from None
        self._mark(True)
        if status >= 400:
            err = (data or {}).get("error") or {}
            raise EngineUnavailable(
                f"guard engine {self.url}: {err.get('message', f'HTTP {status}')}",
                str(err.get("code", "engine_error")),
                status,
            )
        return data

    # ---- health, for /readyz

    def watch(self) -> None:
        """Probe the engine in the background (once per loop; idempotent)."""
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(self._probe_loop())

    async def _probe_loop(self) -> None:
        while True:
            with contextlib.suppress(EngineUnavailable):
                await self.call(HEALTH, None, PROBE_TIMEOUT_S)
            await asyncio.sleep(PROBE_INTERVAL_S)

    def status(self) -> dict[str, Any]:
        if self.ok:
            return {"state": "ready", "engine": self.url}
        return {"state": "failed", "engine": self.url, "reason": f"guard engine unavailable: {self.reason}"}

    async def aclose(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
            self._probe = None
        if self._http is not None:
            await self._http.close()
            self._http = None


_clients: dict[tuple[str, int], tuple[EngineClient, int]] = {}


def acquire(url: str) -> EngineClient:
    """The shared client for `url` on the running loop (reference-counted; give it back with `release`)."""
    key = (url, id(asyncio.get_running_loop()))
    client, n = _clients.get(key, (None, 0))
    if client is None:
        client = EngineClient(url)
    _clients[key] = (client, n + 1)
    client.watch()
    return client


async def release(client: EngineClient) -> None:
    key = (client.url, id(asyncio.get_running_loop()))
    entry = _clients.get(key)
    if entry is None or entry[0] is not client:
        await client.aclose()
        return
    if entry[1] > 1:
        _clients[key] = (client, entry[1] - 1)
        return
    del _clients[key]
    await client.aclose()

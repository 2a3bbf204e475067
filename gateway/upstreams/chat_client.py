"""Chat clients for guards: Exchange in, Completion out, through a configured upstream or a `remote:` URL.

A guard that asks a model (alignment_check's judge, a remote Llama Guard) receives a `ChatClient`
(`gateway.guards.base`) at start and never sees a wire format. `ChatClients` is what the server lends
guards (`GuardResources`): a client for a configured upstream uses that upstream's pool, key and
timeouts; a `remote:` endpoint (`base_url`, `api_key_env`, `timeout_s`, `headers`) becomes an
OpenAI-dialect `HttpUpstream` of its own, with the same key handling. Either way the request goes
through the upstream's dialect codec and the gateway's telemetry (upstream span and metrics), and an
error the upstream sends back has the key cut out before it lands in a verdict or a log.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import aiohttp

from gateway import dialects
from gateway.config import Timeouts, UpstreamConfig
from gateway.dialects.base import DialectError
from gateway.endpoints import CHAT_PATH
from gateway.guards.base import REMOTE_KEYS, ChatClient, GuardResources
from gateway.types import Completion, Exchange, new_id
from gateway.upstreams.base import NeutralUpstream, UpstreamError
from gateway.upstreams.http import HttpUpstream, request_headers


class UpstreamChatClient:
    """Chat completions through one upstream (HTTP in its dialect, or the embedded model)."""

    def __init__(
        self,
        upstream: HttpUpstream | NeutralUpstream,
        telemetry: Any = None,
        headers: Mapping[str, str] | None = None,
        *,
        owned: bool = False,
    ) -> None:
        self.upstream = upstream
        self.telemetry = telemetry  # gateway.telemetry.Telemetry, or None (no spans, no metrics)
        self.headers = dict(headers or {})
        self._owned = owned  # a remote endpoint's upstream: started on first use, closed with us
        self._started = not owned
        self._lock = asyncio.Lock()

    async def complete(self, exchange: Exchange, *, extra_body: dict[str, Any] | None = None) -> Completion:
        up = self.upstream
        ex = replace(exchange, stream=False)
        if isinstance(up, NeutralUpstream):  # the embedded model: no body, so no extra fields
            return await up.complete(ex)
        if not ex.model:
            raise ValueError(f"upstream {up.name} needs a model name (the guard's `model` option)")
        env = up.cfg.api_key_env
        if env and not up.cfg.api_key():
            raise RuntimeError(f"upstream {up.name}: environment variable {env} is not set")
        await self._start()
        codec = dialects.get(up.dialect)
        body = codec.encode_request(ex)
        if extra_body:
            body.update(extra_body)
        headers = request_headers(
            {},
            up.auth_header(None, gateway_keys_on=True),
            new_id("guard_"),
            {"Content-Type": "application/json", **self.headers},
        )
        data = json.dumps(body, separators=(",", ":")).encode()
        send = self.telemetry.send if self.telemetry is not None else _send
        resp = await send(up, "POST", CHAT_PATH, "", headers, data)
        try:
            raw = await resp.read()
        except (aiohttp.ClientError, TimeoutError) as e:
            raise UpstreamError(f"upstream {up.name} failed while answering: {type(e).__name__}") from None
        finally:
            resp.close()
        if resp.status >= 400:
            message, _ = codec.decode_error(resp.status, up.redact(raw))
            raise UpstreamError(f"upstream {up.name}: HTTP {resp.status}: {message[:300]}", resp.status)
        try:
            return codec.decode_response(raw)
        except DialectError as e:
            raise UpstreamError(
                f"upstream {up.name}: answer does not decode: {e.message}", 502, "bad_upstream_response"
            ) from None

    async def _start(self) -> None:
        if self._started:
            return
        async with self._lock:
            if not self._started:
                await self.upstream.start()
                self._started = True

    async def aclose(self) -> None:
        if self._owned and self._started:
            await self.upstream.aclose()
            self._started = False


async def _send(up: HttpUpstream, method: str, path: str, query: str, headers: Any, body: bytes) -> Any:
    return await up.send(method, path, query, headers, body)


def remote_upstream(remote: Mapping[str, Any]) -> tuple[HttpUpstream, dict[str, str]]:
    """An OpenAI-dialect upstream for a guard's `remote:` endpoint, and the headers it adds."""
    unknown = sorted(set(remote) - set(REMOTE_KEYS))
    if unknown or not isinstance(remote.get("base_url"), str):
        raise ValueError(f"remote needs base_url and takes only {', '.join(REMOTE_KEYS)} (got {sorted(remote)})")
    base = remote["base_url"].rstrip("/")
    t = float(remote.get("timeout_s", 10.0))
    cfg = UpstreamConfig(
        name=f"remote:{base}",
        base_url=base,
        dialect="openai",
        api_key_env=remote.get("api_key_env"),
        timeouts=Timeouts(connect=t, read=t, total=t),
        max_connections=100,
    )
    return HttpUpstream(cfg), {str(k): str(v) for k, v in (remote.get("headers") or {}).items()}


class ChatClients(GuardResources):
    """The chat clients the server lends its guards: one per configured upstream asked for, and one
    per distinct `remote:` endpoint (its own pool, closed by `aclose`). Without upstreams (`guardgate
    check`, `eval`) only `remote:` endpoints can be asked."""

    def __init__(
        self, upstreams: Mapping[str, HttpUpstream | NeutralUpstream] | None = None, telemetry: Any = None
    ) -> None:
        self.upstreams = upstreams if upstreams is not None else {}
        self.telemetry = telemetry
        self._clients: dict[str, UpstreamChatClient] = {}

    def chat_client(self, upstream: str | None = None, remote: Mapping[str, Any] | None = None) -> ChatClient:
        if (upstream is None) == (remote is None):
            raise ValueError("a chat client needs exactly one of upstream (a configured upstream's name) or remote")
        if upstream is not None:
            up = self.upstreams.get(upstream)
            if up is None:
                known = ", ".join(sorted(self.upstreams)) or "none here"
                raise LookupError(f"no upstream named {upstream!r} (configured: {known})")
            key = f"upstream:{upstream}"
            if key not in self._clients:
                self._clients[key] = UpstreamChatClient(up, self.telemetry)
            return self._clients[key]
        assert remote is not None
        key = json.dumps(dict(remote), sort_keys=True, default=str)
        if key not in self._clients:
            http, headers = remote_upstream(remote)
            self._clients[key] = UpstreamChatClient(http, self.telemetry, headers, owned=True)
        return self._clients[key]

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.aclose()
        self._clients.clear()

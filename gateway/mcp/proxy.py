"""The MCP Streamable HTTP reverse proxy: `/mcp/{name}` in front of each configured server.

    POST    the client's JSON-RPC message(s): parsed and validated (400 with a JSON-RPC error when they
            are not JSON-RPC), each through the policy (`traffic.Traffic.from_client`); a refused
            request is answered by the gateway and nothing of that POST reaches the server. The
            server's answer, JSON or an SSE stream, comes back message by message through the policy.
    GET     the server's own SSE stream (server requests, notifications, answers replayed after
            `Last-Event-ID`): each event through the policy.
    DELETE  ends the session: relayed.
Headers pass both ways (`Mcp-Session-Id`, `MCP-Protocol-Version`, `Last-Event-ID`, event ids), minus
hop-by-hop ones and the gateway key; the server's own key comes from `key_env`. An event or message
the policy did not change goes out as the exact bytes the server sent. Without a policy that inspects
anything, every request is relayed byte for byte.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from gateway.config import Timeouts, UpstreamConfig
from gateway.context import GatewayError, RequestContext
from gateway.dialects.base import UpstreamStreamError
from gateway.dialects.sse import SSEEvent, SSEParser
from gateway.mcp import jsonrpc
from gateway.mcp.config import McpServerConfig
from gateway.mcp.jsonrpc import Message, id_key
from gateway.mcp.mapping import Scope
from gateway.mcp.metrics import McpMetrics
from gateway.mcp.traffic import FromServer, NotificationRefused, Sessions, Traffic
from gateway.upstreams.http import HttpUpstream, request_headers, response_headers

log = logging.getLogger("guardgate.mcp")

SESSION = "Mcp-Session-Id"
JSON = "application/json"
_NOT_SENT = "not sent: another message of this batch was refused"


def upstream_for(server: McpServerConfig) -> HttpUpstream:
    """An HTTP upstream (pool, timeouts, key injection) for one MCP server."""
    return HttpUpstream(
        UpstreamConfig(
            name=f"mcp:{server.name}",
            base_url=server.url,
            api_key_env=server.key_env,
            timeouts=Timeouts(read=server.timeout_s),
        )
    )  # type: ignore[arg-type]


class McpProxy:
    """Every configured MCP server, its upstream and the sessions seen through it."""

    def __init__(
        self,
        servers: dict[str, McpServerConfig],
        telemetry: Any,
        audit: Any,
        *,
        keys_on: bool,
        max_message_bytes: int = 16 << 20,
    ) -> None:
        self.servers = servers
        self.upstreams = {name: upstream_for(s) for name, s in servers.items()}
        self.telemetry = telemetry
        self.audit = audit
        self.keys_on = keys_on
        self.max_message_bytes = max_message_bytes
        self.sessions = Sessions()
        self.metrics = McpMetrics(telemetry.registry)

    async def start(self) -> None:
        for up in self.upstreams.values():
            await up.start()

    async def aclose(self) -> None:
        for up in self.upstreams.values():
            await up.aclose()

    # ------------------------------------------------------------------ the handler

    async def handle(self, request: web.Request, plan: Any) -> web.StreamResponse:
        ctx: RequestContext = plan.ctx
        upstream: HttpUpstream = plan.upstream
        name = upstream.name.removeprefix("mcp:")
        server = self.servers[name]
        auth = upstream.auth_header(request.headers.get("Authorization"), gateway_keys_on=self.keys_on)
        headers = request_headers(request.headers, auth, ctx.id, server.headers)
        session = request.headers.get(SESSION)
        policy = plan.policy if plan.policy is not None and plan.policy.needs_inspection else None
        self._trace(ctx, name, session)
        if policy is None:
            return await self._relay(request, plan, headers)
        scope = Scope(
            server=name,
            request_id=ctx.id,
            key=ctx.key.name if ctx.key else None,
            audit=self.audit,
            record_audit=self.telemetry.record_audit,
            observe=lambda m, d, t, st, a: self.metrics.check(name, m, t, st, a),
        )
        traffic = Traffic(policy, scope, binary=server.binary)
        if plan.method == "POST":
            return await self._post(request, plan, traffic, headers, session)
        resp = await self.telemetry.send(upstream, plan.method, "", plan.query, headers, None)
        if plan.method == "DELETE":
            self.sessions.forget(name, session)
        return await self._answer(request, ctx, resp, traffic, headers, session, batch=False)

    async def _post(
        self, request: web.Request, plan: Any, traffic: Traffic, headers: CIMultiDict[str], session: str | None
    ) -> web.StreamResponse:
        ctx, name = plan.ctx, traffic.scope.server
        msgs, batch = jsonrpc.parse_body(plan.body)
        errors: dict[int, dict[str, Any]] = {}
        for i, m in enumerate(msgs):
            try:
                err = await traffic.from_client(m)
            except NotificationRefused as e:
                self.metrics.message(name, m.method, "to_server", "refused")
                raise GatewayError(400, str(e), "method_not_allowed", param=str(jsonrpc.METHOD_NOT_FOUND)) from None
            if err is not None:
                errors[i] = err
            self.metrics.message(
                name,
                m.method if m.kind != "response" else "response",
                "to_server",
                "refused" if err is not None else "forwarded",
            )
            if m.method == "tools/call" and err is None:
                self._trace_tool(m)
        if errors:  # nothing of this POST goes to the server: an answer for each of its requests
            out = [
                errors.get(i) or jsonrpc.error(m.id, jsonrpc.POLICY_REFUSED, _NOT_SENT)
                for i, m in enumerate(msgs)
                if m.kind == "request"
            ]
            ctx.outcome = "mcp_refused"
            return web.Response(
                body=jsonrpc.dumps(out if batch else out[0]),
                content_type=JSON,
                headers={"X-Guardgate-Request-Id": ctx.id},
            )
        body = plan.body
        if traffic.rewrote:  # the gate changed a call's arguments: the server gets what it released
            body = jsonrpc.dumps([m.raw for m in msgs] if batch else msgs[0].raw)
        for k, p in traffic.pending.items():
            self.sessions.remember(name, session, k, p)
        resp = await self.telemetry.send(plan.upstream, "POST", "", plan.query, headers, body)
        return await self._answer(request, ctx, resp, traffic, headers, session, batch=batch)

    # ------------------------------------------------------------------ the server's answer

    async def _answer(
        self,
        request: web.Request,
        ctx: RequestContext,
        resp: aiohttp.ClientResponse,
        traffic: Traffic,
        headers: CIMultiDict[str],
        session: str | None,
        batch: bool,
    ) -> web.StreamResponse:
        out_headers = response_headers(resp.headers)
        out_headers["X-Guardgate-Request-Id"] = ctx.id
        session = resp.headers.get(SESSION) or session
        ctype = resp.headers.get("Content-Type", "").split(";")[0].strip().lower()
        try:
            if resp.status == 200 and ctype == "text/event-stream":
                return await self._stream(request, resp, traffic, headers, session, out_headers)
            body = await self._read(resp)
            asked = [k for k, p in traffic.pending.items()]  # this POST's requests: each needs an answer
            if not body.strip() and (not asked or resp.status >= 400):
                return web.Response(status=resp.status, headers=out_headers)
            msgs = jsonrpc.parse_data(body.decode("utf-8", "replace")) if ctype == JSON or body[:1] in b"[{" else None
            out_headers.popall("Content-Type", None)
            if msgs is None:
                status = resp.status if resp.status >= 400 else 502
                ctx.outcome = "mcp_unclassified"
                err = jsonrpc.error(
                    None,
                    jsonrpc.UNCLASSIFIED,
                    f"the MCP server answered HTTP {resp.status} with "
                    "a body that is not JSON-RPC; the gateway does not relay what it cannot classify",
                )
                return web.Response(status=status, body=jsonrpc.dumps(err), content_type=JSON, headers=out_headers)
            results = [await self._from_server(m, traffic, headers, session) for m in msgs]
            forward = [r.forward for r in results if r.forward is not None]
            answered = {id_key(f.get("id")) for f in forward if "method" not in f}
            missing = [
                jsonrpc.error(
                    json.loads(k), jsonrpc.UNCLASSIFIED, "the MCP server's answer has no response to this request"
                )
                for k in asked
                if k not in answered
            ]
            if not missing and not any(r.changed for r in results):
                return web.Response(status=resp.status, body=body, content_type=JSON, headers=out_headers)
            forward += missing
            if not forward:
                return web.Response(status=202, headers=out_headers)
            batch = batch or len(forward) > 1 or body.lstrip()[:1] == b"["
            data = forward if batch else forward[0]
            return web.Response(status=resp.status, body=jsonrpc.dumps(data), content_type=JSON, headers=out_headers)
        finally:
            resp.close()

    async def _read(self, resp: aiohttp.ClientResponse) -> bytes:
        chunks, n = [], 0
        async for chunk in resp.content.iter_any():
            n += len(chunk)
            if n > self.max_message_bytes:
                raise GatewayError(
                    502,
                    f"the MCP server's answer exceeds {self.max_message_bytes} bytes",
                    "upstream_message_too_large",
                    type="api_error",
                )
            chunks.append(chunk)
        return b"".join(chunks)

    async def _stream(
        self,
        request: web.Request,
        resp: aiohttp.ClientResponse,
        traffic: Traffic,
        headers: CIMultiDict[str],
        session: str | None,
        out_headers: CIMultiDict[str],
    ) -> web.StreamResponse:
        """An SSE answer or the GET stream, event by event through the policy, in order."""
        out = web.StreamResponse(status=resp.status, headers=out_headers)
        await out.prepare(request)
        parser = SSEParser(keep_comments=True, bare_json_errors=False, max_event_bytes=self.max_message_bytes)
        seen = _Seen()
        try:
            async for chunk in resp.content.iter_any():
                for ev in parser.feed(chunk):
                    data = await self._event(ev, traffic, headers, session, seen)
                    if data:
                        await out.write(data)
            for ev in parser.close():
                data = await self._event(ev, traffic, headers, session, seen)
                if data:
                    await out.write(data)
        except UpstreamStreamError as e:
            log.warning("MCP server %s: stream ended: %s", traffic.scope.server, e)
        except (aiohttp.ClientError, TimeoutError) as e:
            log.info("MCP server %s: stream broke: %s", traffic.scope.server, type(e).__name__)
        # A request of this POST whose answer never came (or was not JSON-RPC): the client gets an error,
        # not a wait for its timeout. Unless the stream gave event ids: then the server may have closed it
        # on purpose and the client resumes it with a GET and Last-Event-ID (the answer comes there).
        for k in traffic.pending:
            if k not in seen.answered and not seen.event_ids:
                err = jsonrpc.error(
                    json.loads(k),
                    jsonrpc.UNCLASSIFIED,
                    "the MCP server's stream ended without a JSON-RPC answer to this request",
                )
                await out.write(b"event: message\ndata: " + jsonrpc.dumps(err) + b"\n\n")
        await out.write_eof()
        return out

    async def _event(
        self, ev: SSEEvent, traffic: Traffic, headers: CIMultiDict[str], session: str | None, seen: _Seen
    ) -> bytes | None:
        if not ev.comment and any(ln.startswith(b"id:") for ln in ev.raw.splitlines()):
            seen.event_ids = True
        if ev.comment or not ev.data.strip():
            return ev.raw  # keep-alives and priming events (an id to resume from, no message)
        name = traffic.scope.server
        if ev.event not in (None, "message"):
            self.metrics.message(name, None, "to_client", "dropped")
            return None
        msgs = jsonrpc.parse_data(ev.data)
        if msgs is None:
            log.warning("MCP server %s sent an event that is not JSON-RPC: dropped", name)
            self.metrics.message(name, None, "to_client", "dropped")
            return None
        results = [await self._from_server(m, traffic, headers, session) for m in msgs]
        forward = [r.forward for r in results if r.forward is not None]
        seen.answered.update(id_key(f.get("id")) for f in forward if "method" not in f)
        if not forward:
            return None
        if not any(r.changed for r in results):
            return ev.raw
        data = forward if ev.data.lstrip().startswith("[") else forward[0]
        return _frame(ev.raw, jsonrpc.dumps(data))

    async def _from_server(
        self, m: Message, traffic: Traffic, headers: CIMultiDict[str], session: str | None
    ) -> FromServer:
        name = traffic.scope.server
        earlier = self.sessions.get(name, session, id_key(m.id)) if m.kind == "response" else None
        r = await traffic.from_server(m, earlier)
        pending = traffic.pending.get(id_key(m.id)) or earlier if m.kind == "response" else None
        method = pending.method.name if pending is not None else (m.method or "unknown")
        outcome = "dropped" if r.forward is None else "changed" if r.changed else "forwarded"
        self.metrics.message(name, method, "to_client", outcome)
        if r.reply is not None:
            await self._reply(traffic, r.reply, headers)
        return r

    async def _reply(self, traffic: Traffic, message: dict[str, Any], headers: CIMultiDict[str]) -> None:
        """Answer a server request the client never saw (refused by the policy) on the client's session."""
        up = self.upstreams[traffic.scope.server]
        h = CIMultiDict(headers)
        h["Content-Type"] = JSON
        h["Accept"] = "application/json, text/event-stream"
        h.popall("Last-Event-ID", None)
        try:
            resp = await up.send("POST", "", "", h, jsonrpc.dumps(message))
            resp.close()
        except Exception as e:  # the server will time its request out; nothing else to do
            log.info("MCP server %s: answering its refused request failed: %s", traffic.scope.server, e)

    # ------------------------------------------------------------------ no policy: bytes

    async def _relay(self, request: web.Request, plan: Any, headers: CIMultiDict[str]) -> web.StreamResponse:
        resp = await self.telemetry.send(plan.upstream, plan.method, "", plan.query, headers, plan.body or None)
        try:
            out_headers = response_headers(resp.headers)
            out_headers["X-Guardgate-Request-Id"] = plan.ctx.id
            out = web.StreamResponse(status=resp.status, headers=out_headers)
            await out.prepare(request)
            try:
                async for chunk in resp.content.iter_any():
                    await out.write(chunk)
            except (aiohttp.ClientError, TimeoutError):
                pass
            await out.write_eof()
            return out
        finally:
            resp.close()

    # ------------------------------------------------------------------ traces

    def _trace(self, ctx: RequestContext, server: str, session: str | None) -> None:
        if not self.telemetry.tracing:
            return
        from opentelemetry import trace

        span = trace.get_current_span()
        span.set_attribute("guardgate.mcp.server", server)
        if session:
            span.set_attribute("mcp.session.id", session[:128])

    def _trace_tool(self, m: Message) -> None:
        if not self.telemetry.tracing:
            return
        from opentelemetry import trace

        span = trace.get_current_span()
        span.set_attribute("mcp.method.name", "tools/call")
        span.set_attribute("gen_ai.tool.name", str(m.params.get("name", ""))[:128])


@dataclass(slots=True)
class _Seen:
    """What one SSE stream carried: the answers forwarded, and whether the server gave event ids."""

    answered: set[str] = field(default_factory=set)
    event_ids: bool = False


def _frame(raw: bytes, data: bytes) -> bytes:
    """An SSE frame with the original's `id:`, `event:` and `retry:` lines and new data."""
    keep = [ln for ln in raw.splitlines() if ln.startswith((b"id:", b"event:", b"retry:"))]
    return b"".join(ln + b"\n" for ln in keep) + b"data: " + data + b"\n\n"

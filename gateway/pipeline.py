"""The decoded path: request → input guards → upstream → stream gate → client.

Used when a chat request must be inspected (the policy has steps) or translated (client and
upstream speak different dialects, or the upstream is a local model). Everything else goes to the
byte relay. Data flows one way; this module wires the layers and knows no wire format itself.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from gateway import dialects
from gateway.dialects.base import DialectError, UpstreamStreamError
from gateway.relay import SSE_HEADERS
from gateway.types import Event, Exchange
from gateway.upstreams.base import NeutralUpstream, UpstreamError
from gateway.upstreams.http import HttpUpstream, release_after_eof

if TYPE_CHECKING:
    from gateway.server import Gateway, RequestContext


def _gateway_error(*args: Any, **kw: Any) -> Exception:
    from gateway.server import GatewayError

    return GatewayError(*args, **kw)


async def upstream_events(resp: aiohttp.ClientResponse, dialect_name: str) -> AsyncIterator[Event]:
    """Neutral events from an upstream SSE body; closing this generator closes the connection."""
    from gateway.dialects.sse import SSEParser

    parser = SSEParser()
    dec = dialects.get(dialect_name).stream_decoder()
    try:
        try:
            async for chunk in resp.content.iter_any():
                for sse in parser.feed(chunk):
                    for ev in dec.feed(sse.event, sse.data):
                        yield ev
                if dec.done():
                    return
            for sse in parser.close():
                for ev in dec.feed(sse.event, sse.data):
                    yield ev
        except (aiohttp.ClientError, TimeoutError) as e:
            raise UpstreamStreamError(f"upstream stream failed: {type(e).__name__}") from None
        except UpstreamStreamError:
            raise
        except DialectError as e:
            raise UpstreamStreamError(f"upstream stream does not decode: {e.message}") from None
        if not dec.ended_cleanly():
            raise UpstreamStreamError("upstream stream ended before its terminator", code="upstream_truncated")
    finally:
        if dec.done():  # complete: the connection goes back to the pool once the body ends
            release_after_eof(resp)
        else:
            resp.close()


class Pipeline:
    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    def _policy(self, ctx: RequestContext) -> Any:
        return self.policy_named(ctx.policy)

    def policy_named(self, name: str | None) -> Any:
        """The running policy of that name (None for none, or without a policy store)."""
        store = self.gw.policies
        if store is None or not name:
            return None
        return store.get(name)

    async def dispatch(self, request: web.Request, ctx: RequestContext, upstream: HttpUpstream | NeutralUpstream,
                       body: bytes, payload: Any) -> web.StreamResponse:
        policy = self._policy(ctx)
        if self._relays(request.method, ctx, upstream, policy):
            assert isinstance(upstream, HttpUpstream)
            return await self.gw.relay(request, ctx, upstream, body)
        neutral = isinstance(upstream, NeutralUpstream)
        same = not neutral and upstream.dialect == ctx.dialect
        if request.method == "POST" and ctx.tail == "/chat/completions":
            return await self.chat(request, ctx, upstream, body, policy)
        elif request.method == "POST" and ctx.tail == "/moderations":
            served = await self.moderations(request, ctx, body, policy)
            if served is not None:
                return served
        if request.method == "GET" and ctx.tail.rstrip("/") == "/models" and not same:
            return await self.models(request, ctx, upstream)
        if neutral or not same:
            raise _gateway_error(404, f"{request.method} {ctx.prefix}{ctx.tail} is not available on upstream "
                                 f"{ctx.upstream} ({'local model' if neutral else upstream.dialect + ' dialect'})",
                                 "not_found")
        assert isinstance(upstream, HttpUpstream)
        return await self.gw.relay(request, ctx, upstream, body)

    def relays(self, method: str, ctx: RequestContext, upstream: HttpUpstream | NeutralUpstream) -> bool:
        """True when `dispatch` sends this request to the byte relay as it is (the fast front asks)."""
        return self._relays(method, ctx, upstream, self._policy(ctx))

    @staticmethod
    def _relays(method: str, ctx: RequestContext, upstream: HttpUpstream | NeutralUpstream, policy: Any) -> bool:
        if isinstance(upstream, NeutralUpstream) or upstream.dialect != ctx.dialect:
            return False  # a local model, or a translation
        if method == "POST" and ctx.tail == "/chat/completions":
            return policy is None or not policy.needs_inspection
        if method == "POST" and ctx.tail == "/moderations":
            return _moderation_step(policy) is None  # else the policy's Llama Guard answers
        return True

    # ------------------------------------------------------------------ chat

    async def chat(self, request: web.Request, ctx: RequestContext, upstream: HttpUpstream | NeutralUpstream,
                   body: bytes, policy: Any) -> web.StreamResponse:
        cd = dialects.get(ctx.dialect)
        try:
            ex = cd.decode_request(body)
        except DialectError as e:
            raise _gateway_error(e.status, e.message, e.code or "invalid_request", param=e.param) from None
        run = None
        if policy is not None:
            from gateway.policy.chain import PolicyRun

            run = PolicyRun(policy, request_id=ctx.id, route=ctx.prefix + ctx.tail, dialect=ctx.dialect,
                            model=ex.model, key=ctx.key.name if ctx.key else None, audit=self.gw.audit)
        status, error = 500, None
        try:
            resp = await self._chat(request, ctx, upstream, ex, run)
            status = resp.status
            return resp
        except Exception as e:
            status = getattr(e, "status", 500)
            error = getattr(e, "code", type(e).__name__)
            raise
        except asyncio.CancelledError:
            status, error = 499, "client_disconnected"
            raise
        finally:
            if run is not None:
                self.gw.telemetry.record_audit(run.finish(status=status, error=error))

    async def _input_gate(self, task: asyncio.Task[Any], ctx: RequestContext) -> None:
        decision = await task
        if decision.blocked:
            ctx.outcome = "blocked_input"
            raise _gateway_error(400, decision.message or "Request blocked by content policy", "content_filter",
                                 param="messages", retry=False)

    async def _chat(self, request: web.Request, ctx: RequestContext, upstream: HttpUpstream | NeutralUpstream,
                    ex: Exchange, run: Any) -> web.StreamResponse:
        cd = dialects.get(ctx.dialect)
        input_task: asyncio.Task[Any] | None = None
        if run is not None and run.policy.has_input:
            input_task = asyncio.create_task(run.check_input(ex))
            if not (run.policy.input_parallel and isinstance(upstream, HttpUpstream)):
                await self._input_gate(input_task, ctx)
                input_task = None
        try:
            if isinstance(upstream, NeutralUpstream):
                if not ex.stream:
                    try:
                        completion = await upstream.complete(ex)
                    except UpstreamError:
                        raise
                    return await self._send_completion(ctx, cd, ex, completion, run)
                return await self._send_stream(request, ctx, cd, ex, upstream.stream(ex), run)

            ud = dialects.get(upstream.dialect)
            up_body = json.dumps(ud.encode_request(ex), separators=(",", ":")).encode()
            headers = self.gw.upstream_headers(request, ctx, upstream, {"Content-Type": "application/json"})
            send = asyncio.ensure_future(
                self.gw.telemetry.send(upstream, "POST", ctx.tail, request.query_string, headers, up_body))
            if input_task is not None:
                # Speculative: the upstream is already on its way; no byte leaves before the verdict.
                try:
                    await self._input_gate(input_task, ctx)
                except BaseException:
                    send.cancel()
                    try:
                        (await send).close()
                    except BaseException:
                        pass
                    raise
                input_task = None
            resp = await send
        finally:
            if input_task is not None and not input_task.done():
                input_task.cancel()
        ctx.ttfb_ms = (time.perf_counter() - ctx.started) * 1000
        if resp.status >= 400:
            try:
                raw = await resp.read()
            finally:
                resp.close()
            message, code = ud.decode_error(resp.status, raw)
            body = cd.error_body(resp.status, message, type="upstream_error", code=code)
            out = web.json_response(body, status=resp.status, headers={"X-Guardgate-Request-Id": ctx.id})
            for h in ("Retry-After", "retry-after-ms", "x-should-retry"):
                if h in resp.headers:
                    out.headers[h] = resp.headers[h]
            ctx.outcome = "upstream_error"
            return out
        if not ex.stream:
            try:
                raw = await resp.read()
            except (aiohttp.ClientError, TimeoutError):
                resp.close()
                raise UpstreamError("upstream failed while sending its answer", 502) from None
            finally:
                resp.close()
            try:
                completion = ud.decode_response(raw)
            except DialectError as e:
                raise UpstreamError(f"upstream answer does not decode: {e.message}", 502, "bad_upstream_response") \
                    from None
            return await self._send_completion(ctx, cd, ex, completion, run)
        return await self._send_stream(request, ctx, cd, ex, upstream_events(resp, upstream.dialect), run)

    async def _send_completion(self, ctx: RequestContext, cd: Any, ex: Exchange, completion: Any,
                               run: Any) -> web.Response:
        if run is not None and run.policy.has_output:
            completion = await run.check_output(ex, completion)
        if completion.finish_reason == "content_filter":
            ctx.outcome = "blocked_output"
        self.gw.telemetry.observe_completion(completion)
        return web.json_response(cd.encode_response(completion, ex), headers={"X-Guardgate-Request-Id": ctx.id})

    async def _send_stream(self, request: web.Request, ctx: RequestContext, cd: Any, ex: Exchange,
                           events: AsyncIterator[Event], run: Any) -> web.StreamResponse:
        events = self.gw.telemetry.upstream_events(events)
        if run is not None and run.policy.has_stream:
            events = run.guard_stream(ex, events)
        events = self.gw.telemetry.client_events(events)
        enc = cd.stream_encoder(ex)
        out = web.StreamResponse(status=200, headers={"Content-Type": "text/event-stream; charset=utf-8",
                                                      "X-Guardgate-Request-Id": ctx.id, **SSE_HEADERS})
        await out.prepare(request)
        try:
            try:
                async for ev in events:
                    frame = enc.encode(ev)
                    if frame:
                        await out.write(frame)
                await out.write(enc.end())
            except UpstreamStreamError as e:
                ctx.outcome = e.code or "upstream_error"
                await out.write(enc.error(e.message, ctx.outcome))
            except UpstreamError as e:
                ctx.outcome = e.code
                await out.write(enc.error(e.message, e.code))
        finally:
            await events.aclose()  # type: ignore[attr-defined]
        await out.write_eof()
        return out

    # ------------------------------------------------------------------ models, moderations

    async def models(self, request: web.Request, ctx: RequestContext,
                     upstream: HttpUpstream | NeutralUpstream) -> web.Response:
        cd = dialects.get(ctx.dialect)
        if isinstance(upstream, NeutralUpstream):
            models = [{"id": m, "created": 0, "owned_by": "guardgate"} for m in await upstream.models()]
        else:
            ud = dialects.get(upstream.dialect)
            headers = self.gw.upstream_headers(request, ctx, upstream)
            resp = await upstream.send("GET", "/models", "", headers, None)
            try:
                raw = await resp.read()
            finally:
                resp.close()
            if resp.status >= 400:
                message, code = ud.decode_error(resp.status, raw)
                return web.json_response(cd.error_body(resp.status, message, type="upstream_error", code=code),
                                         status=resp.status)
            try:
                models = ud.decode_models(raw)
            except DialectError as e:
                raise UpstreamError(f"upstream models list does not decode: {e.message}", 502) from None
        return web.json_response(cd.encode_models(models))

    async def moderations(self, request: web.Request, ctx: RequestContext, body: bytes,
                          policy: Any) -> web.Response | None:
        """Served by the policy's local Llama Guard when it has one (first llama_guard step); else None (relay)."""
        step = _moderation_step(policy)
        if step is None:
            return None
        if step.unavailable:
            raise UpstreamError(f"moderation guard unavailable: {step.unavailable}", 503, "guard_unavailable")
        guard = step.guard
        cd = dialects.get(ctx.dialect)
        try:
            req = cd.decode_moderation_request(body)
        except DialectError as e:
            raise _gateway_error(e.status, e.message, e.code or "invalid_request", param=e.param) from None
        from gateway.guards.moderation import moderate

        try:
            results = await moderate(guard, req)
        except Exception as e:  # a guard that did not run never answers "not flagged"
            raise UpstreamError(f"moderation guard failed: {type(e).__name__}: {e}", 503, "guard_error") from None
        ctx.outcome = "moderation"
        model = req.model or str(guard.options.get("model", guard.name))
        return web.json_response(cd.encode_moderation_response(results, model=model),
                                 headers={"X-Guardgate-Request-Id": ctx.id})


def _moderation_step(policy: Any) -> Any:
    for step in policy.steps if policy is not None else ():
        if step.guard_name == "llama_guard":
            return step
    return None

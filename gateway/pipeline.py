"""Carries out the plan `gateway.routing` made for a request, one way:
request → input guards → upstream → stream gate → client.

Chat that must be inspected or translated is decoded into neutral types and re-encoded in the
client's dialect; embeddings and moderations under an input policy pass the input stage and are
then relayed; everything the plan says to relay goes through the byte relay. This module wires the
layers and knows no wire format itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncGenerator, Awaitable
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from gateway import dialects, upstream_text
from gateway.answer_buffer import read_upto
from gateway.batches import MODEL_WRITTEN, batched, flat, rebatched
from gateway.context import GatewayError, RequestContext
from gateway.dialects._common import json_bytes
from gateway.dialects.base import ClientCodec, DialectError, UpstreamCodec, UpstreamStreamError
from gateway.dialects.embeddings import decode_embedding_inputs
from gateway.dialects.stream import StreamStats
from gateway.endpoints import CHAT_PATH, MODELS_PATH, Kind, path_param
from gateway.limits.usage import Counted, UsageTap, from_usage
from gateway.policy.content import moderation_media
from gateway.policy.tokens import count_tokens
from gateway.relay import BUFFER_BYTES, SSE_HEADERS, TimedResponse, relay_response
from gateway.responses_state import ResponseStore
from gateway.routing import Action, Plan, moderation_step
from gateway.telemetry import Telemetry
from gateway.types import (
    Event,
    Exchange,
    Finish,
    Message,
    Part,
    TextDelta,
    ToolCall,
    ToolCallDelta,
    UsageEvent,
)
from gateway.upstreams.base import NeutralUpstream, UpstreamError
from gateway.upstreams.http import HttpUpstream, draining, release_after_eof, request_headers


@functools.cache
def relay_error_frame(dialect: str, kind: str, message: str, code: str) -> bytes:
    """The frame that ends a relayed stream whose upstream failed mid-way, in the endpoint's own
    stream format: a Responses `error` event for the Responses API (its lifecycle events came from
    the upstream), else the dialect's chat error frame (legacy completions share OpenAI's)."""
    if kind == Kind.RESPONSES:
        from gateway.dialects import responses

        return responses.error_frame(message, code)
    enc = dialects.get(dialect).stream_encoder(Exchange(model="", messages=[], stream=True))
    return enc.error(message, code)




def _note_first(stats: StreamStats, batch: list[Event]) -> None:
    """When the first model-written event came from the upstream (telemetry's upstream TTFT)."""
    for ev in batch:
        if isinstance(ev, MODEL_WRITTEN):
            stats.first_in = time.perf_counter()
            return


async def upstream_batches(resp: aiohttp.ClientResponse, codec: UpstreamCodec,
                           stats: StreamStats | None = None) -> AsyncGenerator[list[Event], None]:
    """Neutral events from an upstream SSE body (decoded by the upstream side's `codec`), one list per
    read from the network (events that arrived together go on together); closing this generator
    closes the connection."""
    from gateway.dialects.sse import SSEParser

    parser = SSEParser()
    dec = codec.stream_decoder()
    try:
        try:
            async for chunk in resp.content.iter_any():
                batch: list[Event] = []
                for sse in parser.feed(chunk):
                    batch += dec.feed(sse.event, sse.data)
                if batch:
                    if stats is not None:
                        stats.events_in += len(batch)
                        if stats.first_in is None:
                            _note_first(stats, batch)
                    yield batch
                if dec.done():
                    return
            batch = []
            for sse in parser.close():
                batch += dec.feed(sse.event, sse.data)
            if batch:
                yield batch
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


def upstream_side(plan: Plan) -> tuple[UpstreamCodec, str]:
    """(codec, path) of the upstream request for a decoded generation: the endpoint's own API when the
    upstream speaks it (chat in the client's dialect, legacy completions on an OpenAI upstream; the
    path as classified, so an Azure deployment path stays one), else the upstream dialect's chat API
    (translation: a Responses request, or anything towards the Llama API)."""
    upstream, ctx, kind = plan.upstream, plan.ctx, plan.endpoint.kind
    assert isinstance(upstream, HttpUpstream)
    if kind is Kind.COMPLETIONS and upstream.dialect == "openai":
        return dialects.upstream_codec("openai", kind), ctx.tail
    if kind is Kind.CHAT and upstream.dialect == ctx.dialect:
        return dialects.get(upstream.dialect), ctx.tail
    return dialects.get(upstream.dialect), CHAT_PATH


class UsageAudit:
    """The audit log as a policy run sees it: the request's token usage, when known by the time the
    record is written (after the answer), rides in the record as `usage`."""

    __slots__ = ("ctx", "log")

    def __init__(self, log: Any, ctx: RequestContext) -> None:
        self.log, self.ctx = log, ctx

    def write(self, record: dict[str, Any]) -> None:
        u = self.ctx.usage
        if u is not None:
            record["usage"] = {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
                               "source": u.source}
        self.log.write(record)


def prompt_tokens(ex: Exchange) -> int:
    """The gateway's own count of a request's prompt (cl100k), for an upstream that reports no usage."""
    return sum(count_tokens(m.text) for m in ex.messages)


class Pipeline:
    """Carries out a `routing.Plan`. It holds only what it needs: telemetry, the audit log, and
    whether gateway keys are on (then a client's Authorization is never forwarded)."""

    def __init__(self, telemetry: Telemetry, audit: Any = None, *, keys_on: bool = False,
                 send_timeout: float | None = None, responses: ResponseStore | None = None,
                 buffer_bytes: int = BUFFER_BYTES) -> None:
        self.telemetry = telemetry
        self.audit = audit
        self.keys_on = keys_on
        self.responses = responses  # responses_state: gateway
        self.send_timeout = send_timeout  # see relay.TimedResponse
        self.mcp: Any = None  # gateway.mcp.proxy.McpProxy (set by the server when mcp_servers are configured)
        self.buffer_bytes = buffer_bytes  # a non-stream answer is read whole up to this (relay.read_upto)

    def upstream_headers(self, request: web.Request, ctx: RequestContext, upstream: HttpUpstream,
                         extra: dict[str, str] | None = None) -> CIMultiDict[str]:
        """The client's headers for the upstream: hop-by-hop dropped, the right Authorization set."""
        auth = upstream.auth_header(request.headers.get("Authorization"), gateway_keys_on=self.keys_on)
        return request_headers(request.headers, auth, ctx.id, extra)

    async def dispatch(self, request: web.Request, plan: Plan) -> web.StreamResponse:
        action = plan.action
        if action is Action.RELAY:
            return await self.relay(request, plan)
        if action is Action.GENERATE:
            return await self.chat(request, plan)
        if action is Action.INPUT_THEN_RELAY:
            await self.input_then_relay(plan)
            return await self.relay(request, plan)
        if action is Action.MODERATE:
            return await self.moderations(plan)
        if action is Action.MCP:
            return await self.mcp.handle(request, plan)
        assert action is Action.MODELS
        return await self.models(request, plan)

    async def relay(self, request: web.Request, plan: Plan) -> web.StreamResponse:
        """Byte for byte: no parse, no re-encode; the upstream gets the path that was classified."""
        ctx, upstream = plan.ctx, plan.upstream
        assert isinstance(upstream, HttpUpstream)
        headers = self.upstream_headers(request, ctx, upstream)
        resp = await self.telemetry.send(upstream, plan.method, ctx.tail, plan.query, headers, plan.body or None)
        # Only under a token budget are the relayed bytes read (for their usage); else none of this runs.
        tap = UsageTap(plan.payload) if ctx.meter_tokens and plan.payload is not None and resp.status < 400 else None
        try:
            ctx.ttfb_ms = (time.perf_counter() - ctx.started) * 1000
            return await relay_response(request, resp, {"X-Guardgate-Request-Id": ctx.id},
                                        functools.partial(relay_error_frame, ctx.dialect,
                                                          plan.endpoint.kind.value),
                                        plan.endpoint.terminator, upstream.redact, self.send_timeout,
                                        tap.feed if tap is not None else None, self.buffer_bytes)
        finally:
            if not draining(resp):  # a finished stream's connection may be on its way back to the pool
                resp.close()
            if tap is not None:
                ctx.usage = tap.count()

    def _run(self, plan: Plan) -> Any:
        """A policy run for this request (None without a policy)."""
        if plan.policy is None:
            return None
        from gateway.policy.chain import PolicyRun

        ctx = plan.ctx
        audit = UsageAudit(self.audit, ctx) if self.audit is not None else None
        return PolicyRun(plan.policy, request_id=ctx.id, route=ctx.prefix + ctx.tail, dialect=ctx.dialect,
                         model=ctx.model, key=ctx.key.name if ctx.key else None, audit=audit)

    async def input_then_relay(self, plan: Plan) -> None:
        """Embeddings and moderations under an input policy: the texts pass the input stage first."""
        ctx = plan.ctx
        try:
            if plan.endpoint.kind is Kind.EMBEDDINGS:
                messages = decode_embedding_inputs(plan.payload)
            else:
                req = dialects.get(ctx.dialect).decode_moderation_request(plan.payload)
                messages = [m for conversation in req.inputs for m in conversation]
        except DialectError as e:
            raise GatewayError(e.status, e.message, e.code or "invalid_request", param=e.param) from None
        run = self._run(plan)
        status, error = 200, None
        try:
            self._media_rule(run, ctx, messages)
            await self._input_gate(run.check_input(Exchange(model=ctx.model or "", messages=messages)), ctx,
                                   param="input")
        except GatewayError as e:
            status, error = e.status, e.code
            raise
        finally:
            self.telemetry.record_audit(run.finish(status=status, error=error))

    # ------------------------------------------------------------------ chat

    async def chat(self, request: web.Request, plan: Plan) -> web.StreamResponse:
        ctx = plan.ctx
        cd = dialects.codec(ctx.dialect, plan.endpoint.kind)
        payload = plan.payload  # parsed once, by the router
        if "model" not in payload and ctx.model:  # Azure: the deployment in the path names the model
            payload = {**payload, "model": ctx.model}
        try:
            ex = cd.decode_payload(payload)
        except DialectError as e:
            raise GatewayError(e.status, e.message, e.code or "invalid_request", param=e.param) from None
        if plan.endpoint.kind is Kind.RESPONSES:
            self._resolve_state(ctx, ex)
        run = self._run(plan)
        status, error = 500, None
        try:
            resp = await self._chat(request, plan, ex, run)
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
                self.telemetry.record_audit(run.finish(status=status, error=error))

    async def _input_gate(self, task: Awaitable[Any], ctx: RequestContext, param: str = "messages") -> None:
        decision = await task
        if decision.blocked:
            ctx.outcome = "blocked_input"
            raise GatewayError(400, decision.message or "Request blocked by content policy", "content_filter",
                               param=param, retry=False)

    @staticmethod
    def _media_rule(run: Any, ctx: RequestContext, messages: list[Message]) -> None:
        """The policy's `content:` rule (policy/content.py): a refused image, audio or file part ends the
        request here with 400 `content_not_inspected`, naming the part and the policy line to change."""
        if run is None or not run.policy.needs_inspection:
            return
        media = run.check_content(Exchange(model="", messages=messages))
        if media.refused is not None:
            ctx.outcome = "blocked_input"
            raise GatewayError(400, media.message, "content_not_inspected", param=media.refused.path or "messages",
                               retry=False)

    async def _chat(self, request: web.Request, plan: Plan, ex: Exchange, run: Any) -> web.StreamResponse:
        ctx, upstream = plan.ctx, plan.upstream
        cd = dialects.codec(ctx.dialect, plan.endpoint.kind)
        self._media_rule(run, ctx, ex.messages)
        input_task: asyncio.Task[Any] | None = None
        if run is not None and run.policy.has_input:
            if run.policy.input_parallel and isinstance(upstream, HttpUpstream):
                input_task = asyncio.create_task(run.check_input(ex))
            else:
                await self._input_gate(run.check_input(ex), ctx)
        # The request as the input stage rewrote it (input `redact`, pii masking); a rewriting policy
        # never runs in parallel with the upstream (policy.schema refuses it), so the verdict is in.
        up_ex = run.upstream_exchange(ex) if run is not None and input_task is None else ex
        try:
            if isinstance(upstream, NeutralUpstream):
                if not ex.stream:
                    completion = await upstream.complete(up_ex)
                    return await self._send_completion(request, ctx, cd, ex, completion, run)
                stats = StreamStats()
                return await self._send_stream(request, ctx, cd, ex, batched(upstream.stream(up_ex), stats), run,
                                               stats)

            ud, path = upstream_side(plan)
            try:
                up_body = json_bytes(ud.encode_request(up_ex))
            except DialectError as e:  # a part the upstream's dialect has no slot for: refused, never dropped
                raise GatewayError(e.status, e.message, e.code or "invalid_request", param=e.param) from None
            headers = self.upstream_headers(request, ctx, upstream, {"Content-Type": "application/json"})
            if input_task is None:  # the verdict is in (or there is no input stage): no task to spare
                resp = await self.telemetry.send(upstream, "POST", path, plan.query, headers, up_body)
            else:
                # Speculative: the upstream is already on its way; no byte leaves before the verdict.
                send = asyncio.ensure_future(self.telemetry.send(upstream, "POST", path, plan.query, headers,
                                                                 up_body))
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
                raw = upstream.redact(await resp.read())
            finally:
                resp.close()
            message, code = ud.decode_error(resp.status, raw)
            if upstream_text.checks_answers(run):  # the upstream's words never reach the client unchecked
                message, code = upstream_text.error_message(resp.status, ctx.id), upstream_text.error_code(code)
                hints = upstream_text.error_headers(resp.headers)
            else:
                hints = {h: resp.headers[h] for h in ("Retry-After", "retry-after-ms", "x-should-retry")
                         if h in resp.headers}
            body = cd.error_body(resp.status, message, type="upstream_error", code=code)
            out = web.json_response(body, status=resp.status, headers={"X-Guardgate-Request-Id": ctx.id, **hints})
            ctx.outcome = "upstream_error"
            return out
        if not ex.stream:
            try:
                raw, whole = await read_upto(resp, self.buffer_bytes)
            finally:
                resp.close()
            if not whole:
                raise UpstreamError(f"upstream answer larger than {self.buffer_bytes} bytes "
                                    "(limits.buffer_answer_bytes)", 502, "bad_upstream_response")
            try:
                completion = ud.decode_response(raw)
            except DialectError as e:  # its message may quote the upstream's bytes: not under a policy
                why = f"request {ctx.id}" if upstream_text.checks_answers(run) else e.message
                raise UpstreamError(f"upstream answer does not decode: {why}", 502, "bad_upstream_response") from None
            return await self._send_completion(request, ctx, cd, ex, completion, run)
        stats = StreamStats()
        return await self._send_stream(request, ctx, cd, ex, upstream_batches(resp, ud, stats), run, stats)

    async def _send_completion(self, request: web.Request, ctx: RequestContext, cd: Any, ex: Exchange,
                               completion: Any, run: Any) -> web.Response:
        """The checked answer. Its audit record, when there is an audit log, is written before it leaves;
        the rest of the books (metrics, the access log) are kept after its last byte (as for a stream
        and the relay), off the client's clock."""
        if run is not None and run.policy.has_output:
            completion = await run.check_output(ex, completion)
        if upstream_text.checks_answers(run):
            completion = upstream_text.completion(completion, ex)
        if run is not None:
            completion = run.unmask_completion(completion)
        if any(ch.finish_reason == "content_filter" for ch in completion.choices):
            ctx.outcome = "blocked_output"
        else:
            self._remember(ctx, ex, completion.message)
        ctx.usage = from_usage(completion.usage) if completion.usage is not None else None
        if ctx.meter_tokens and (ctx.usage is None or not ctx.usage.total):
            texts = [p.text for ch in completion.choices for p in ch.message.parts if p.text]
            texts += [t.arguments for ch in completion.choices for t in ch.message.tool_calls]
            ctx.usage = Counted(prompt_tokens(ex), sum(count_tokens(t) for t in texts), "gateway")
        out = web.Response(body=json_bytes(cd.encode_response(completion, ex)), content_type="application/json",
                           headers={"X-Guardgate-Request-Id": ctx.id})
        if run is not None and run.audit is not None:
            run.finish(status=out.status)  # the record (chat's `finally` reports the same one to telemetry)
        await out.prepare(request)
        await out.write_eof()
        self.telemetry.observe_completion(completion)
        return out

    async def _send_stream(self, request: web.Request, ctx: RequestContext, cd: ClientCodec, ex: Exchange,
                           batches: AsyncGenerator[list[Event], None], run: Any,
                           stats: StreamStats) -> web.StreamResponse:
        """Guard and encode the stream: each list of events (what the gate released together, or
        what one network read brought) leaves in one write; telemetry gets the stream's figures once,
        at its end, from what the upstream reader and the encoder noted on the way."""
        checks = upstream_text.checks_answers(run)
        if checks:
            batches = upstream_text.checked_starts(batches, ex)
        if run is not None and run.policy.has_stream:
            batches = run.guard_batches(ex, batches)
        if run is not None and run.restore:
            batches = rebatched(run.unmask_stream(flat(batches)))
        if self._keeps(ctx, ex):
            batches = self._remembering(ctx, ex, batches)
        enc = cd.stream_encoder(ex)
        enc.stats = stats
        meter = ctx.meter_tokens
        released: list[str] = []
        out = TimedResponse(status=200, headers={"Content-Type": "text/event-stream; charset=utf-8",
                                                 "X-Guardgate-Request-Id": ctx.id, **SSE_HEADERS},
                            send_timeout=self.send_timeout, headers_with_first_write=True)
        await out.prepare(request)
        last: bytes | None = None  # the stream's last bytes, once it ended (else the client left, or a fault)
        cut: str | None = None  # the policy's message, when a cut stream ends with an error event
        cut_with_error = run is not None and run.policy.on_stream_block == "error"
        try:
            try:
                async for batch in batches:
                    if meter:
                        released += [ev.text if isinstance(ev, TextDelta) else ev.arguments
                                     for ev in batch if isinstance(ev, MODEL_WRITTEN)]
                    if cut_with_error and cut is None and any(
                            isinstance(ev, Finish) and ev.reason == "content_filter" for ev in batch):
                        cut = run.stream_block_message()
                        if cut is not None:  # the error event takes the place of the content_filter finish
                            batch = [ev for ev in batch if not isinstance(ev, (Finish, UsageEvent))]
                    data = enc.encode_all(batch)
                    if data:
                        await out.write(data)
                if cut is not None:
                    ctx.outcome = "blocked_output"
                    last = enc.error(cut, "content_filter", type="invalid_request_error")
                else:
                    last = enc.end()
            except UpstreamStreamError as e:
                ctx.outcome = e.code or "upstream_error"
                message, code = (upstream_text.stream_error(e.code, ctx.id) if checks
                                 else (e.message, ctx.outcome))
                last = enc.error(message, code)
            except UpstreamError as e:
                ctx.outcome = e.code
                last = enc.error(e.message, e.code)
        finally:
            await batches.aclose()
            if stats.usage is not None:
                ctx.usage = from_usage(stats.usage)
            if meter and (ctx.usage is None or not ctx.usage.total):
                ctx.usage = Counted(prompt_tokens(ex), count_tokens("".join(released)), "gateway")
            if last is None:  # the stream did not end (the client left, or an error): report it now
                self.telemetry.observe_stream(stats)
        try:
            await out.write_eof(last or b"")  # the terminator and the end of the body: one write
        finally:
            self.telemetry.observe_stream(stats)  # after the last byte, off the client's clock
        return out

    # ------------------------------------------------------------------ Responses state

    @staticmethod
    def _owner(ctx: RequestContext) -> str:
        return ctx.key.name if ctx.key is not None else ""

    def _resolve_state(self, ctx: RequestContext, ex: Exchange) -> None:
        """A Responses request that names state kept elsewhere: continued from the gateway's store, or
        refused. Such state is never sent upstream unread (a chat upstream could not use it anyway)."""
        echo = ex.client.setdefault("echo", {})
        echo["store"] = self.responses is not None and echo.get("store", True) is not False
        if ex.client.get("conversation"):
            raise GatewayError(400, "`conversation` names a conversation kept by the provider, which the gateway's "
                               "guards cannot read; send the conversation as `input`", "unsupported_parameter",
                               param="conversation")
        prev = ex.client.get("previous_response_id")
        if not prev:
            return
        if self.responses is None:
            raise GatewayError(400, "`previous_response_id` names conversation state the gateway's guards cannot "
                               "read; send the whole conversation as `input`, or set `responses_state: gateway` "
                               "so the gateway keeps the conversations it guarded", "unsupported_parameter",
                               param="previous_response_id")
        earlier = self.responses.get(self._owner(ctx), prev)
        if earlier is None:
            raise GatewayError(400, f"no response {prev!r} is kept by the gateway (unknown, expired, or made with "
                               "another key)", "previous_response_not_found", param="previous_response_id")
        # This request's own instructions lead; earlier instructions are not carried over (as upstream).
        lead = 1 if ex.messages and ex.messages[0].role == "system" and echo.get("instructions") else 0
        ex.messages = [*ex.messages[:lead], *earlier, *ex.messages[lead:]]

    def _keeps(self, ctx: RequestContext, ex: Exchange) -> bool:
        return (self.responses is not None and ctx.endpoint is not None and ctx.endpoint.kind is Kind.RESPONSES
                and ex.client.get("echo", {}).get("store", False) is True)

    def _remember(self, ctx: RequestContext, ex: Exchange, answer: Message) -> None:
        """Keep the conversation as guarded plus the answer as released (not the request's instructions)."""
        if not self._keeps(ctx, ex):
            return
        assert self.responses is not None
        lead = 1 if ex.messages and ex.messages[0].role == "system" and ex.client["echo"].get("instructions") else 0
        self.responses.put(self._owner(ctx), str(ex.client.get("response_id")), [*ex.messages[lead:], answer])

    async def _remembering(self, ctx: RequestContext, ex: Exchange,
                           batches: AsyncGenerator[list[Event], None]) -> AsyncGenerator[list[Event], None]:
        """Pass the released events on; once the stream ended unblocked, keep the answer they spell."""
        text: list[str] = []
        calls: dict[int, ToolCall] = {}
        blocked = False
        async with contextlib.aclosing(batches):  # a dropped client closes the gate now, not at GC
            async for batch in batches:
                for ev in batch:
                    if isinstance(ev, TextDelta) and ev.index == 0 and ev.channel == "text":
                        text.append(ev.text)
                    elif isinstance(ev, ToolCallDelta) and ev.index == 0:
                        call = calls.setdefault(ev.call_index, ToolCall(id=ev.id or "", name=ev.name or "",
                                                                        arguments=""))
                        call.arguments += ev.arguments
                    elif isinstance(ev, Finish) and ev.reason == "content_filter":
                        blocked = True
                yield batch
        if not blocked:
            answer = Message("assistant", [Part("text", "".join(text))] if text else [],
                             tool_calls=[calls[i] for i in sorted(calls)])
            self._remember(ctx, ex, answer)

    # ------------------------------------------------------------------ models, moderations

    async def models(self, request: web.Request, plan: Plan) -> web.Response:
        """The models list (or one model) of a local model or another dialect's upstream, translated."""
        ctx, upstream = plan.ctx, plan.upstream
        cd = dialects.get(ctx.dialect)
        if isinstance(upstream, NeutralUpstream):
            models = [{"id": m, "created": 0, "owned_by": "guardgate"} for m in await upstream.models()]
        else:
            ud = dialects.get(upstream.dialect)
            headers = self.upstream_headers(request, ctx, upstream)
            resp = await upstream.send("GET", MODELS_PATH, "", headers, None)
            try:
                raw = upstream.redact(await resp.read())
            finally:
                resp.close()
            if resp.status >= 400:
                message, code = ud.decode_error(resp.status, raw)
                pol = plan.policy
                if pol is not None and pol.has_output and not pol.shadow:  # as for chat: the gateway's words
                    message, code = upstream_text.error_message(resp.status, ctx.id), upstream_text.error_code(code)
                return web.json_response(cd.error_body(resp.status, message, type="upstream_error", code=code),
                                         status=resp.status)
            try:
                models = ud.decode_models(raw)
            except DialectError as e:
                raise UpstreamError(f"upstream models list does not decode: {e.message}", 502) from None
        one = path_param(plan.endpoint, ctx.tail, "model")
        if one is None:
            return web.json_response(cd.encode_models(models))
        for m in cd.encode_models(models).get("data", []):
            if m.get("id") == one:
                return web.json_response(m)
        raise GatewayError(404, f"model {one!r} not found", "model_not_found", param="model")

    async def moderations(self, plan: Plan) -> web.Response:
        """Answered by the policy's local Llama Guard (its first llama_guard step)."""
        ctx = plan.ctx
        step = moderation_step(plan.policy)
        if step.unavailable:
            raise UpstreamError(f"moderation guard unavailable: {step.unavailable}", 503, "guard_unavailable")
        guard = step.guard
        cd = dialects.get(ctx.dialect)
        try:
            req = cd.decode_moderation_request(plan.payload)
        except DialectError as e:
            raise GatewayError(e.status, e.message, e.code or "invalid_request", param=e.param) from None
        from gateway.guards.moderation import moderate

        images = moderation_media(plan.policy, guard, req)
        try:
            results = await moderate(guard, req, images=images)
        except Exception as e:  # a guard that did not run never answers "not flagged"
            raise UpstreamError(f"moderation guard failed: {type(e).__name__}: {e}", 503, "guard_error") from None
        ctx.outcome = "moderation"
        model = req.model or str(guard.options.get("model", guard.name))
        return web.json_response(cd.encode_moderation_response(results, model=model),
                                 headers={"X-Guardgate-Request-Id": ctx.id})

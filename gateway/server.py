"""The aiohttp application: request ids, body limits, health, errors in the client's dialect.

Every request other than /healthz, /readyz and /metrics goes through `Gateway.handle`:
  head (`routing.Router.admit`: canonical path, endpoint, key) → body (limit) → plan
  (`Router.plan`: payload, route, policy, action) → `Pipeline.dispatch` carries the plan out.
"""

from __future__ import annotations

import asyncio
import datetime
import itertools
import json
import logging
import os
import re
import time
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from gateway import dialects, readiness
from gateway.config import GatewayConfig
from gateway.context import CTX_KEY, GatewayError, RequestContext
from gateway.endpoints import Kind, dialect_of
from gateway.guardrails.handler import Guardrails
from gateway.limits import Limiter, RateLimits, make_store
from gateway.pipeline import Pipeline
from gateway.policy.record import on_verdict
from gateway.responses_state import ResponseStore
from gateway.routing import Plan, Router
from gateway.telemetry import Telemetry, observe_verdict
from gateway.upstreams.base import NeutralUpstream, UpstreamError
from gateway.upstreams.chat_client import ChatClients
from gateway.upstreams.http import HttpUpstream

log = logging.getLogger("guardgate")
access_log = logging.getLogger("guardgate.access")

GATEWAY_KEY: web.AppKey[Gateway] = web.AppKey("gateway")


def error_headers(err: GatewayError, request_id: str) -> dict[str, str]:
    retry = err.retry if err.retry is not None else err.status in (429, 502, 503, 504)
    out = {"X-Guardgate-Request-Id": request_id, "x-should-retry": "true" if retry else "false"}
    if err.status == 503 and retry:
        out["Retry-After"] = "1"
    if err.headers:
        out.update(err.headers)
    return out


def error_response(dialect: str, err: GatewayError, request_id: str) -> web.Response:
    if dialect == "mcp":  # MCP clients read a JSON-RPC error (gateway.mcp)
        from gateway.mcp.jsonrpc import http_error_body

        body = http_error_body(err)
    else:
        body = dialects.get(dialect).error_body(err.status, err.message, type=err.type, code=err.code,
                                                param=err.param)
    return web.json_response(body, status=err.status, headers=error_headers(err, request_id))


_ID_PREFIX = os.urandom(8).hex()
_ID_SEQ = itertools.count(1)


def _reseed_ids() -> None:
    global _ID_PREFIX, _ID_SEQ
    _ID_PREFIX, _ID_SEQ = os.urandom(8).hex(), itertools.count(1)


os.register_at_fork(after_in_child=_reseed_ids)


def new_request_id() -> str:
    """32 hex characters, like uuid4().hex: a random per-process prefix and a counter. Ids must be
    unique, not unguessable."""
    return f"{_ID_PREFIX}{next(_ID_SEQ):016x}"


_CLIENT_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def request_id_for(request: web.Request) -> str:
    """The client's X-Request-Id when it is a sane token (it lands in logs and the audit), else ours."""
    rid = request.headers.get("X-Request-Id")
    return rid if rid is not None and _CLIENT_ID.fullmatch(rid) else new_request_id()


class Gateway:
    """Owns the upstreams, the policies and the audit log for one running server."""

    def __init__(self, cfg: GatewayConfig, policies: Any = None, audit: Any = None,
                 telemetry: Telemetry | None = None) -> None:
        self.telemetry = telemetry if telemetry is not None else Telemetry()
        on_verdict(observe_verdict)  # guard spans and metrics, per verdict as it arrives
        self.cfg = cfg
        self.policies = policies  # gateway.policy store (None: no policies configured)
        self.audit = audit
        self.upstreams: dict[str, HttpUpstream | NeutralUpstream] = {}
        self.chat_clients: ChatClients | None = None
        self.ready = False
        self.router: Router | None = None
        self.pipeline: Pipeline | None = None
        self.guardrails: Guardrails | None = None  # the check API (/guardrails/...)
        self.limiter: Limiter | None = None  # built only when some key or route sets a rate limit
        self.mcp: Any = None  # gateway.mcp.proxy.McpProxy, when the config has mcp_servers
        self._finishing: set[asyncio.Future[None]] = set()

    # ------------------------------------------------------------------ lifecycle

    async def start(self, app: web.Application) -> None:
        for name, ucfg in self.cfg.upstreams.items():
            if ucfg.type == "llama_cpp":
                from gateway.upstreams.local import LocalUpstream

                up: HttpUpstream | NeutralUpstream = LocalUpstream(ucfg)
            else:
                up = HttpUpstream(ucfg)
            await up.start()
            self.upstreams[name] = up
        # what guards get at start: chat clients on these upstreams or on a `remote:` URL (judges)
        self.chat_clients = ChatClients(self.upstreams, self.telemetry)
        self.router = Router(self.cfg, self.upstreams, self.policies)
        if self.cfg.mcp_servers:
            from gateway.mcp.proxy import McpProxy

            self.mcp = McpProxy(self.cfg.mcp_servers, self.telemetry, self.audit, keys_on=bool(self.router.keys))
            await self.mcp.start()
            self.router.mcp_upstreams = self.mcp.upstreams
        if self.router.limits_on:
            lim = self.cfg.limits
            self.limiter = Limiter(make_store(lim.store, lim.url, lim.store_timeout_ms / 1000),
                                   lim.on_store_error, lim.store_timeout_ms / 1000, self.telemetry)
        self.guardrails = Guardrails(self.policies, self.audit, self.telemetry)
        self.pipeline = Pipeline(self.telemetry, self.audit, keys_on=bool(self.router.keys),
                                 send_timeout=self.cfg.limits.send_timeout_s,
                                 buffer_bytes=self.cfg.limits.buffer_answer_bytes,
                                 responses=ResponseStore() if self.cfg.responses_state == "gateway" else None)
        self.pipeline.mcp = self.mcp
        if self.policies is not None:
            await self.policies.start(resources=self.chat_clients)
        self.telemetry.bind(self)
        self.ready = True

    async def stop(self, app: web.Application) -> None:
        self.ready = False
        if self.policies is not None:
            await self.policies.aclose()
        if self.chat_clients is not None:
            await self.chat_clients.aclose()
        for up in self.upstreams.values():
            await up.aclose()
        if self.mcp is not None:
            await self.mcp.aclose()
        if self.limiter is not None:
            await self.limiter.aclose()
        await self.telemetry.aclose()

    # ------------------------------------------------------------------ the handler

    async def read_body(self, request: web.Request) -> bytes:
        """The whole body, within the limit. A compressed body is refused: aiohttp would inflate it
        (a decompression bomb within the wire limit) and the relay would have to re-label it; no
        SDK compresses requests."""
        limit = self.cfg.limits.max_body_bytes
        encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding != "identity":
            raise GatewayError(415, f"request bodies with Content-Encoding {encoding[:40]!r} are not accepted; "
                               "send it uncompressed", "unsupported_content_encoding")
        if request.content_length is not None and request.content_length > limit:
            raise GatewayError(413, f"request body of {request.content_length} bytes exceeds the limit of "
                               f"{limit} bytes", "request_too_large")
        try:
            async with asyncio.timeout(self.cfg.limits.body_timeout_s):
                return await request.read()
        except TimeoutError:
            raise GatewayError(408, f"request body did not arrive within {self.cfg.limits.body_timeout_s} s",
                               "request_timeout", retry=False) from None
        except web.HTTPRequestEntityTooLarge:
            raise GatewayError(413, f"request body exceeds the limit of {limit} bytes",
                               "request_too_large") from None
        except (web.HTTPBadRequest, ValueError) as e:  # a malformed body framing or payload
            raise GatewayError(400, f"request body could not be read: {e}", "invalid_request") from None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Every request that is not a health or metrics probe: head → plan → pipeline."""
        ctx = RequestContext(id=request_id_for(request), dialect=dialect_of(request.raw_path))
        request[CTX_KEY] = ctx
        try:
            assert self.router is not None and self.pipeline is not None and self.guardrails is not None
            query = self.router.admit(ctx, request.method, request.raw_path,
                                      request.headers.getall("Authorization", []), request.headers.get("x-api-key"))
            body = await self.read_body(request) if request.body_exists else b""
            if ctx.endpoint is not None and ctx.endpoint.kind is Kind.GUARDRAILS:  # answered here, never routed
                resp = await self.guardrails.handle(request, ctx, body)
                ctx.status = resp.status
                return resp
            plan = self.router.plan(ctx, request.method, query, body)
            try:
                if plan.rate is None:
                    resp = await self.pipeline.dispatch(request, plan)
                else:
                    resp = await self.limited(request, plan, plan.rate)
            finally:  # also when the client hangs up right after the end of a stream (the handler is cancelled)
                if ctx.usage is not None:
                    self.record_usage(ctx, audited=plan.policy is not None)
        except GatewayError as e:
            ctx.outcome = ctx.outcome or e.code
            resp = error_response(ctx.dialect, e, ctx.id)
        except UpstreamError as e:
            ctx.outcome = e.code
            resp = error_response(ctx.dialect, GatewayError(e.status, e.message, e.code, type="api_error"), ctx.id)
        ctx.status = resp.status
        return resp

    async def limited(self, request: web.Request, plan: Plan, rate: RateLimits) -> web.StreamResponse:
        """Carry out a plan under rate limits: admitted (or 429 / 503) before anything goes upstream;
        the answer's tokens charged and the stream slot released once it is done, whatever happened."""
        assert self.limiter is not None and self.pipeline is not None
        ctx = plan.ctx
        ticket = await self.limiter.acquire(ctx, rate)
        ctx.meter_tokens = rate.meters_tokens
        try:
            return await self.pipeline.dispatch(request, plan)
        finally:
            tokens = ctx.usage.total if ctx.usage is not None else 0
            if self.limiter.has_work(ticket, tokens):
                # shielded: a client that leaves mid-stream cancels us, but its slot must still be released
                task = asyncio.ensure_future(self.limiter.finish(ticket, tokens))
                self._finishing.add(task)
                task.add_done_callback(self._finishing.discard)
                await asyncio.shield(task)

    def record_usage(self, ctx: RequestContext, audited: bool) -> None:
        """Usage per key and model: /metrics; and in the audit log (when there is one) for a request the
        policy did not record (a guarded request's record carries it: pipeline.UsageAudit), a line of its
        own."""
        u = ctx.usage
        key = ctx.key.name if ctx.key is not None else "-"
        model = ctx.model or "-"
        self.telemetry.record_usage(key, model, u.prompt_tokens, u.completion_tokens, u.source)
        if self.audit is not None and not audited:
            self.audit.write({"type": "usage", "ts": _now_iso(), "request_id": ctx.id, "key": key, "model": model,
                              "route": ctx.prefix + ctx.tail, "upstream": ctx.upstream,
                              "prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
                              "source": u.source})


def _now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# ---------------------------------------------------------------------- app factory


def _access_log_middleware() -> Any:
    @web.middleware
    async def mw(request: web.Request, handler: Any) -> web.StreamResponse:
        t0 = time.perf_counter()
        status = 500
        try:
            resp = await handler(request)
            status = resp.status
            return resp
        except web.HTTPException as e:
            status = e.status
            raise
        except asyncio.CancelledError:
            status = 499  # client went away
            raise
        finally:
            ctx: RequestContext | None = request.get(CTX_KEY)
            if access_log.isEnabledFor(logging.INFO) and request.path not in ("/healthz", "/readyz", "/metrics"):
                log_access(ctx, request.method, request.path,
                           ctx.status if ctx and ctx.status and status != 499 else status, t0)

    return mw


def log_access(ctx: RequestContext | None, method: str, path: str, status: int, t0: float) -> None:
    """One JSON line per request: no keys, no content."""
    rec: dict[str, Any] = {"id": ctx.id if ctx else None, "method": method, "path": path, "status": status,
                           "ms": round((time.perf_counter() - t0) * 1000, 2)}
    if ctx:
        rec.update(dialect=ctx.dialect, upstream=ctx.upstream, model=ctx.model, policy=ctx.policy,
                   stream=ctx.stream)
        if ctx.ttfb_ms is not None:
            rec["ttfb_ms"] = round(ctx.ttfb_ms, 2)
        if ctx.outcome:
            rec["outcome"] = ctx.outcome
    access_log.info(json.dumps(rec, separators=(",", ":")))


def _errors_middleware() -> Any:
    """Never a traceback to the client: anything unexpected becomes a dialect-shaped 500."""

    @web.middleware
    async def mw(request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            dialect = dialect_of(request.raw_path)
            code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(e.status, "error")
            msg = f"{request.method} {request.path}: {e.reason}"
            return error_response(dialect, GatewayError(e.status, msg, code), request_id_for(request))
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception:
            log.exception("unhandled error on %s %s", request.method, request.path)
            err = GatewayError(500, "internal gateway error", "internal_error", type="api_error")
            return error_response(dialect_of(request.raw_path), err, "")

    return mw


class _BadRequestLogFilter(logging.Filter):
    """aiohttp logs every malformed request (bad header, bad request line) at ERROR with a traceback:
    a client can fill the logs at will. Keep one line, at INFO, without the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg, record.args = "malformed request refused: %s", (str(exc.message).strip().splitlines()[0],)
            record.exc_info = record.exc_text = None
            return logging.getLogger("aiohttp.server").isEnabledFor(logging.INFO)
        return True


_BAD_REQUEST_FILTER = _BadRequestLogFilter()


def create_app(gw: Gateway) -> web.Application:
    app = web.Application(
        client_max_size=gw.cfg.limits.max_body_bytes,
        middlewares=[gw.telemetry.middleware(), _access_log_middleware(), _errors_middleware()],
        handler_args={"max_field_size": gw.cfg.limits.max_header_bytes,
                      "max_line_size": gw.cfg.limits.max_header_bytes,
                      # aiohttp closes a connection that is idle, or still sending its request head,
                      # this long after its last request (or its start): a head trickled a byte at a
                      # time cannot hold a connection open past it.
                      "keepalive_timeout": gw.cfg.limits.head_timeout_s},
    )
    app[GATEWAY_KEY] = gw
    logging.getLogger("aiohttp.server").addFilter(_BAD_REQUEST_FILTER)  # idempotent

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        # The table of gateway.readiness (upstreams, routes, each step's guard, model, device and
        # state); not ready while some step's guard says it failed (e.g. `semgrep: required`).
        body = readiness.describe(gw)
        ready = gw.ready
        if ready and gw.policies is not None:
            ready, body["policies_status"] = gw.policies.status()
        body["ready"] = ready
        return web.json_response(body, status=200 if ready else 503)

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", gw.telemetry.metrics_handler)
    # Everything else, whatever its spelling: the router decides (canonical path, endpoint, policy).
    app.router.add_route("*", "/{tail:.*}", gw.handle)
    app.on_startup.append(gw.start)
    app.on_cleanup.append(gw.stop)
    return app

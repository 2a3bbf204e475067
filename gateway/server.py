"""The aiohttp application: auth, limits, request ids, routing, and the choice of path.

Every request on a dialect prefix goes through `Gateway.handle`:
  auth (gateway keys) → body limits and JSON check → route (path prefix, model glob) →
  either the byte relay (same dialect, nothing to inspect) or the pipeline (decode, guards,
  translate, encode). Errors Guardgate produces are rendered in the client's dialect.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import itertools
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from multidict import CIMultiDict

from gateway import dialects
from gateway.config import GatewayConfig, GatewayKey, Route
from gateway.relay import relay_response
from gateway.telemetry import Telemetry
from gateway.types import Exchange
from gateway.upstreams.base import NeutralUpstream, UpstreamError
from gateway.upstreams.http import HttpUpstream, draining, request_headers

log = logging.getLogger("guardgate")
access_log = logging.getLogger("guardgate.access")

# Client-facing prefixes and the dialect each speaks (longest first).
PREFIXES: tuple[tuple[str, str], ...] = (
    ("/llama/compat/v1", "openai"),
    ("/llama/v1", "llama"),
    ("/openai/v1", "openai"),
    ("/v1", "openai"),
)
GATEWAY_KEY: web.AppKey[Gateway] = web.AppKey("gateway")
CTX_KEY: web.RequestKey[RequestContext] = web.RequestKey("ctx")


@dataclass(slots=True)
class RequestContext:
    """Per-request facts every layer may read (never the body or keys)."""

    id: str
    dialect: str
    prefix: str
    tail: str  # path after the prefix, e.g. "/chat/completions"
    started: float = field(default_factory=time.perf_counter)
    key: GatewayKey | None = None
    route: Route | None = None
    upstream: str | None = None
    policy: str | None = None
    model: str | None = None
    stream: bool = False
    status: int = 0
    ttfb_ms: float | None = None
    outcome: str = ""


PLANS_MAX = 16  # models remembered per request head (Gateway.plan_relay); all forgotten when full


@dataclass(slots=True, frozen=True)
class RelayPlan:
    """What `Gateway.plan_relay` decided for one request head and model."""

    key: GatewayKey | None
    route: Route
    upstream: HttpUpstream | None  # None: not the byte relay's (aiohttp's path serves it)
    policy: str | None
    policy_obj: Any  # the policy `policy` named then


class GatewayError(Exception):
    """An error Guardgate answers itself, rendered in the client's dialect."""

    def __init__(self, status: int, message: str, code: str, *, type: str = "invalid_request_error",
                 param: str | None = None, retry: bool | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.type, self.param = status, message, code, type, param
        self.retry = retry


def error_headers(err: GatewayError, request_id: str) -> dict[str, str]:
    retry = err.retry if err.retry is not None else err.status in (429, 502, 503, 504)
    return {"X-Guardgate-Request-Id": request_id, "x-should-retry": "true" if retry else "false"}


def error_response(dialect: str, err: GatewayError, request_id: str) -> web.Response:
    body = dialects.get(dialect).error_body(err.status, err.message, type=err.type, code=err.code,
                                            param=err.param)
    return web.json_response(body, status=err.status, headers=error_headers(err, request_id))


@functools.cache
def relay_error_frame(dialect: str, message: str, code: str) -> bytes:
    """The frame that ends a relayed stream whose upstream failed mid-way."""
    enc = dialects.get(dialect).stream_encoder(Exchange(model="", messages=[], stream=True))
    return enc.error(message, code)


# What a relayed SSE stream must carry before EOF to count as finished (None: not checked).
_STREAM_TERMINATORS = {("openai", "/chat/completions"): b"data: [DONE]", ("openai", "/completions"): b"data: [DONE]",
                       ("llama", "/chat/completions"): b'"complete"'}


_JSON = json.JSONDecoder()
_NOT_PLAIN_UTF8 = frozenset(b"\x00\xef\xfe\xff")  # first bytes of the BOMs and UTF-16/32 text


_SCAN = _JSON.scan_once  # the C scanner under JSONDecoder.decode


def loads_body(body: bytes) -> Any:
    """`json.loads(body)`, same results and errors, without its encoding detection when the body
    plainly starts as UTF-8 (no BOM, no NUL in the first two bytes: what `json.detect_encoding`
    calls UTF-8), and straight through the C scanner when the text is one JSON value with nothing
    around it (the decoder's own Python and whitespace regexes, which decide everything else).
    Together ~1.5 us of each relayed request."""
    if body and body[0] not in _NOT_PLAIN_UTF8 and (len(body) < 2 or body[1]):
        text = body.decode("utf-8", "surrogatepass")
        try:
            obj, end = _SCAN(text, 0)
        except StopIteration:  # not a value at 0 (leading whitespace, or none): the decoder says why
            return _JSON.decode(text)
        return obj if end == len(text) else _JSON.decode(text)
    return json.loads(body)


_ID_PREFIX = os.urandom(8).hex()
_ID_SEQ = itertools.count(1)


def _reseed_ids() -> None:
    global _ID_PREFIX, _ID_SEQ
    _ID_PREFIX, _ID_SEQ = os.urandom(8).hex(), itertools.count(1)


os.register_at_fork(after_in_child=_reseed_ids)


def new_request_id() -> str:
    """32 hex characters, like uuid4().hex: a random per-process prefix and a counter. Ids must be
    unique, not unguessable; uuid4 per request was ~2% of the relay's CPU (urandom syscall)."""
    return f"{_ID_PREFIX}{next(_ID_SEQ):016x}"


_CLIENT_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def request_id_for(request: web.Request) -> str:
    return client_request_id(request.headers.get("X-Request-Id"))


def client_request_id(rid: str | None) -> str:
    """The client's X-Request-Id when it is a sane token (it lands in logs and the audit), else ours."""
    return rid if rid is not None and _CLIENT_ID.fullmatch(rid) else new_request_id()


def split_prefix(path: str) -> tuple[str, str, str] | None:
    for prefix, dialect in PREFIXES:
        if path == prefix or path.startswith(prefix + "/"):
            return prefix, dialect, path[len(prefix):] or "/"
    return None


class Gateway:
    """Owns the upstreams, the policies and the audit log for one running server."""

    def __init__(self, cfg: GatewayConfig, policies: Any = None, audit: Any = None,
                 telemetry: Telemetry | None = None) -> None:
        self.telemetry = telemetry if telemetry is not None else Telemetry()
        self.cfg = cfg
        self.policies = policies  # gateway.policy store (None: no policies configured)
        self.audit = audit
        self.upstreams: dict[str, HttpUpstream | NeutralUpstream] = {}
        self.ready = False
        self._keys: list[tuple[bytes, GatewayKey]] = []
        self.pipeline: Any = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self, app: web.Application) -> None:
        from gateway.pipeline import Pipeline

        for name, ucfg in self.cfg.upstreams.items():
            if ucfg.type == "llama_cpp":
                from gateway.upstreams.local import LocalUpstream

                up: HttpUpstream | NeutralUpstream = LocalUpstream(ucfg)
            else:
                up = HttpUpstream(ucfg)
            await up.start()
            self.upstreams[name] = up
        self._keys = []
        for k in self.cfg.keys:
            value = k.value()
            if not value:
                raise RuntimeError(f"gateway key {k.name}: environment variable {k.key_env} is not set")
            self._keys.append((value.encode(), k))
        self.pipeline = Pipeline(self)
        if self.policies is not None:
            await self.policies.start()
        self.telemetry.bind(self)
        self.ready = True

    async def stop(self, app: web.Application) -> None:
        self.ready = False
        if self.policies is not None:
            await self.policies.aclose()
        for up in self.upstreams.values():
            await up.aclose()
        await self.telemetry.aclose()

    # ------------------------------------------------------------------ helpers

    @property
    def keys_on(self) -> bool:
        return bool(self._keys)

    def authenticate(self, request: web.Request) -> GatewayKey | None:
        return self.check_key(request.headers.get("Authorization"))

    def check_key(self, auth: str | None) -> GatewayKey | None:
        """The gateway key the client presented; compared in constant time against every key."""
        if not self._keys:
            return None
        auth = auth or ""
        token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        found: GatewayKey | None = None
        presented = token.encode()
        for value, key in self._keys:
            # compare every key (no early exit) so timing does not reveal which prefix matched
            if hmac.compare_digest(presented, value) and token:
                found = key
        if found is None:
            raise GatewayError(401, "missing or invalid gateway key" if token else "missing gateway key",
                               "invalid_api_key", type="authentication_error")
        return found

    async def read_body(self, request: web.Request) -> bytes:
        limit = self.cfg.limits.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise GatewayError(413, f"request body of {request.content_length} bytes exceeds the limit of "
                               f"{limit} bytes", "request_too_large")
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise GatewayError(413, f"request body exceeds the limit of {limit} bytes",
                               "request_too_large") from None

    def upstream_headers(self, request: web.Request, ctx: RequestContext, upstream: HttpUpstream,
                         extra: dict[str, str] | None = None) -> CIMultiDict[str]:
        """The client's headers for the upstream: hop-by-hop dropped, the right Authorization set."""
        auth = upstream.auth_header(request.headers.get("Authorization"), gateway_keys_on=bool(self._keys))
        return request_headers(request.headers, auth, ctx.id, extra)

    def policy_name(self, ctx: RequestContext) -> str | None:
        if self.cfg.policy:
            return self.cfg.policy
        if ctx.key is not None and ctx.key.policy:
            return ctx.key.policy
        return ctx.route.policy if ctx.route else None

    # ------------------------------------------------------------------ the handler

    async def handle(self, request: web.Request) -> web.StreamResponse:
        split = split_prefix(request.path)
        if split is None:  # routed here only for dialect prefixes; defensive
            raise web.HTTPNotFound()
        prefix, dialect, tail = split
        ctx = RequestContext(id=request_id_for(request), dialect=dialect,
                             prefix=prefix, tail=tail)
        request[CTX_KEY] = ctx
        try:
            resp = await self._handle(request, ctx)
        except GatewayError as e:
            ctx.outcome = ctx.outcome or e.code
            resp = error_response(dialect, e, ctx.id)
        except UpstreamError as e:
            ctx.outcome = e.code
            resp = error_response(dialect, GatewayError(e.status, e.message, e.code, type="api_error"), ctx.id)
        ctx.status = resp.status
        return resp

    async def _handle(self, request: web.Request, ctx: RequestContext) -> web.StreamResponse:
        ctx.key = self.authenticate(request)
        body = await self.read_body(request) if request.can_read_body else b""
        payload = self._payload(ctx, request.method, request.headers.get("Content-Type"), body)
        upstream = self._route(ctx, request.path)
        return await self.pipeline.dispatch(request, ctx, upstream, body, payload)

    @staticmethod
    def _payload(ctx: RequestContext, method: str, ctype: str | None, body: bytes) -> Any:
        """The JSON body of a POST (None for others); sets ctx.model and ctx.stream."""
        if not body or method != "POST" or "json" not in (ctype if ctype is not None else "json"):
            return None
        try:
            payload = loads_body(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise GatewayError(400, f"request body is not valid JSON: {e}", "invalid_json") from None
        if isinstance(payload, dict):
            model = payload.get("model")
            ctx.model = model if isinstance(model, str) else None
            ctx.stream = payload.get("stream") is True
        return payload

    def _route(self, ctx: RequestContext, path: str) -> HttpUpstream | NeutralUpstream:
        route = self.cfg.route_for(path, ctx.model)
        if route is None:
            if ctx.model is not None:
                raise GatewayError(404, f"no route for model {ctx.model!r}", "model_not_found", param="model")
            raise GatewayError(404, f"no route for {path}", "not_found")
        ctx.route, ctx.upstream = route, route.upstream
        ctx.policy = self.policy_name(ctx)
        return self.upstreams[route.upstream]

    def fast_context(self, split: tuple[str, str, str], request_id: str | None) -> RequestContext | None:
        """For the fast front (`gateway.fastpath`): a context for a dialect path (`split_prefix`), while
        it may serve requests itself (ready, tracing off); else None (aiohttp's path serves it)."""
        if not self.ready or self.telemetry.tracing:
            return None
        prefix, dialect, tail = split
        return RequestContext(client_request_id(request_id), dialect, prefix, tail)  # positional: ~40% less

    def plan_relay(self, ctx: RequestContext, method: str, path: str, auth: str | None, ctype: str | None,
                   body: bytes, plans: dict[str | None, RelayPlan] | None = None) -> HttpUpstream | None:
        """The upstream when this request goes straight to the byte relay; None when it needs the
        aiohttp path (guards, translation, a local model). Raises GatewayError as `handle` would.

        `plans`: kept by the caller for one request head (same method, path and Authorization), by
        model. What follows from those alone (key, route, upstream, policy) is worked out once per
        model and reused while the policy it names is the same object (a reload replaces it)."""
        parsed = bool(plans)
        if plans:  # one was made for this head, so its key is valid: the body may be read before the check
            self._payload(ctx, method, ctype, body)
            plan = plans.get(ctx.model)
            if plan is not None and (plan.policy is None or self.pipeline.policy_named(plan.policy) is plan.policy_obj):
                ctx.key, ctx.route, ctx.upstream, ctx.policy = plan.key, plan.route, plan.route.upstream, plan.policy
                return plan.upstream
        ctx.key = self.check_key(auth)
        if not parsed:
            self._payload(ctx, method, ctype, body)
        upstream = self._route(ctx, path)
        relays = isinstance(upstream, HttpUpstream) and self.pipeline.relays(method, ctx, upstream)
        if plans is not None and ctx.route is not None:
            if len(plans) >= PLANS_MAX:
                plans.clear()
            plans[ctx.model] = RelayPlan(ctx.key, ctx.route, upstream if relays else None,  # type: ignore[arg-type]
                                         ctx.policy, self.pipeline.policy_named(ctx.policy))
        return upstream if relays else None  # type: ignore[return-value]

    def record_fast_request(self, ctx: RequestContext, status: int, method: str, upstream: str | None = None,
                            upstream_s: float | None = None) -> None:
        """Metrics and the access log line for a request the fast front served (`upstream_s`: from the
        request sent to the response head, when one came)."""
        ctx.status = status
        self.telemetry.note_fast_request(ctx, status, upstream, upstream_s)
        if access_log.isEnabledFor(logging.INFO):
            log_access(ctx, method, ctx.prefix + ctx.tail, status, ctx.started)

    async def relay(self, request: web.Request, ctx: RequestContext, upstream: HttpUpstream,
                    body: bytes) -> web.StreamResponse:
        """Byte for byte: no parse, no re-encode."""
        headers = self.upstream_headers(request, ctx, upstream)
        resp = await self.telemetry.send(upstream, request.method, ctx.tail, request.query_string, headers,
                                   body if body else None)
        try:
            ctx.ttfb_ms = (time.perf_counter() - ctx.started) * 1000
            return await relay_response(request, resp, {"X-Guardgate-Request-Id": ctx.id},
                                        functools.partial(relay_error_frame, ctx.dialect),
                                        _STREAM_TERMINATORS.get((ctx.dialect, ctx.tail)))
        finally:
            if not draining(resp):  # a finished stream's connection may be on its way back to the pool
                resp.close()


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
            split = split_prefix(request.path)
            dialect = split[1] if split else ("llama" if request.path.startswith("/llama/") else "openai")
            code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(e.status, "error")
            msg = f"{request.method} {request.path}: {e.reason}"
            return error_response(dialect, GatewayError(e.status, msg, code), request_id_for(request))
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception:
            log.exception("unhandled error on %s %s", request.method, request.path)
            split = split_prefix(request.path)
            dialect = split[1] if split else "openai"
            return error_response(dialect, GatewayError(500, "internal gateway error", "internal_error",
                                                        type="api_error"), "")

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
                      "max_line_size": gw.cfg.limits.max_header_bytes},
    )
    app[GATEWAY_KEY] = gw
    logging.getLogger("aiohttp.server").addFilter(_BAD_REQUEST_FILTER)  # idempotent

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        body: dict[str, Any] = {"ready": gw.ready}
        if gw.ready and gw.policies is not None:  # per policy per step: e.g. which CodeShield tiers are live
            body["ready"], body["policies"] = gw.policies.status()
        return web.json_response(body, status=200 if body["ready"] else 503)

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", gw.telemetry.metrics_handler)
    for prefix, _ in PREFIXES:
        app.router.add_route("*", prefix + "/{tail:.*}", gw.handle)
    app.on_startup.append(gw.start)
    app.on_cleanup.append(gw.stop)
    return app

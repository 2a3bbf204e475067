"""Traces (OpenTelemetry) and metrics (Prometheus) for one gateway.

    tel = Telemetry()                       # tracer from the OTEL_* env vars; a private metrics registry
    app = web.Application(middlewares=[tel.middleware(), ...])
    app.router.add_get("/metrics", tel.metrics_handler)
    resp = await tel.send(upstream, "POST", path, query, headers, body)   # upstream span + traceparent
    tel.observe_stream(stats)               # a stream's end: added TTFT, finish reasons, usage (once)
    tel.record_audit(run.finish(...))       # guard metrics + guard spans from the audit record

Traces. One SERVER span per request (`guardgate.request`, parent taken from the client's W3C
`traceparent`) with the OpenTelemetry GenAI attributes (`gen_ai.*`) and ours (`guardgate.*`); a
CLIENT child for the upstream call whose context is injected into the upstream request headers;
one INTERNAL child per guard check (`guardgate.guard <name>`). Guard spans are live when the
policy code reports each verdict to `observe_verdict` through `policy.record.on_verdict` (exact
timing: end = when the verdict arrived, start = end - its latency); otherwise they are built from
the audit record at the end of the request, one per step, marked `guardgate.guard.synthetic`
(input steps start with the request, stream steps span the guarded stream). With no exporter
configured there is no tracer at all: the middleware then only bumps a counter and a histogram,
and the client's own `traceparent` passes through to the upstream untouched.

Telemetry observes, it does not wrap: a stream's figures (`dialects.stream.StreamStats`: when the
first token came from the upstream and went to the client, finish reasons, usage) are noted where
the events pass anyway (the upstream reader, the encoder) and reported once, at the stream's end.

Metrics. A private `CollectorRegistry` per `Telemetry` (tests stay isolated); see `_Metrics`. They
are prometheus_client's own instruments; gauges declare a `multiprocess_mode` (for `--workers N`,
where `/metrics` sums over the worker processes).

Layout: `tracing.py` (the provider from OTEL_*, upstream and guard spans), `metrics.py` (the
instruments, the scrape-time collector, /metrics), `streams.py` (per-request state, per-stream
observation, `observe_verdict`); here `Telemetry` wires them (request span and counters, the audit
record). Every name importers used from the single module is re-exported here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry

from gateway.telemetry.metrics import (
    GUARD_BUCKETS,
    LATENCY_BUCKETS,
    LEAK_BUCKETS,
    MAX_USAGE_MODELS,
    TABLE_SET,
    _Cached,
    _CallbackCollector,
    _engine_sessions,
    _Metrics,
    _Recording,
    route_label,
)
from gateway.telemetry.streams import _REQ, _Request, _StreamObservation, observe_verdict
from gateway.telemetry.tracing import (
    SYSTEMS,
    _guard_attrs,
    _otlp_exporter,
    _Tracing,
    _truthy,
    _UpstreamCall,
    tracer_provider_from_env,
)

__all__ = [
    "GUARD_BUCKETS",
    "LATENCY_BUCKETS",
    "LEAK_BUCKETS",
    "MAX_USAGE_MODELS",
    "SKIP_PATHS",
    "SYSTEMS",
    "TABLE_SET",
    "_REQ",
    "Telemetry",
    "_Cached",
    "_CallbackCollector",
    "_Metrics",
    "_Request",
    "_UpstreamCall",
    "_engine_sessions",
    "_guard_attrs",
    "_otlp_exporter",
    "_truthy",
    "observe_verdict",
    "route_label",
    "tracer_provider_from_env",
]

log = logging.getLogger("guardgate.telemetry")

SKIP_PATHS = frozenset({"/metrics", "/healthz", "/readyz"})


# --------------------------------------------------------------------------- the object


class Telemetry(_Tracing, _StreamObservation, _Recording):
    """Traces and metrics for one gateway.

    `tracer_provider`: "env" (default) builds one from the OTEL_* variables (None when no exporter
    is configured); pass a provider (tests: an in-memory exporter) or None to force tracing off.
    """

    def __init__(self, registry: CollectorRegistry | None = None, *, tracer_provider: Any = "env") -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.registry.register(_CallbackCollector(self))  # before the gauges it refreshes
        self.m = _Metrics(self.registry)
        if isinstance(tracer_provider, str) and tracer_provider == "env":
            tracer_provider = tracer_provider_from_env()
        self.provider = tracer_provider
        self.tracer = tracer_provider.get_tracer("guardgate") if tracer_provider is not None else None
        self.ctx_key: Any = None
        self._session_sources: list[Callable[[], Mapping[str, int]]] = [_engine_sessions]
        self._policy_store: Any = None
        self._systems: dict[str, str] = {}
        self._usage_models: set[str] = set()

    @property
    def tracing(self) -> bool:
        return self.tracer is not None

    # ------------------------------------------------------------------ wiring

    def bind(self, gateway: Any) -> None:
        """Learn the gateway's upstreams (gen_ai.system) and policy store (cache hits). Duck-typed."""
        for name, up in getattr(gateway, "upstreams", {}).items():
            cfg = getattr(up, "cfg", None)
            kind = "llama_cpp" if getattr(cfg, "type", "") == "llama_cpp" or not hasattr(up, "dialect") \
                else up.dialect
            self._systems[name] = SYSTEMS.get(kind, kind)
        self._policy_store = getattr(gateway, "policies", None)

    def add_sessions_source(self, fn: Callable[[], Mapping[str, int]]) -> None:
        """A callback giving guard sessions alive by model, read at every scrape."""
        self._session_sources.append(fn)

    def sessions(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for fn in self._session_sources:
            try:
                for k, v in fn().items():
                    out[k] = out.get(k, 0) + int(v)
            except Exception:
                log.debug("sessions source failed", exc_info=True)
        return out

    def cache_hits(self) -> dict[str, int]:
        """Verdict-cache hits summed over the live guards of the bound policy store (by guard name)."""
        store = self._policy_store
        if store is None or not hasattr(store, "policies"):
            return {}
        out: dict[str, int] = {}
        seen: set[int] = set()
        try:
            for policy in store.policies():
                for step in policy.steps:
                    g = step.guard
                    stats = getattr(g, "stats", None)
                    if id(g) in seen or not isinstance(stats, dict) or "cache_hits" not in stats:
                        continue
                    seen.add(id(g))
                    out[step.guard_name] = out.get(step.guard_name, 0) + int(stats["cache_hits"])
        except Exception:
            log.debug("reading guard cache stats failed", exc_info=True)
        return out

    async def aclose(self) -> None:
        """Flush and stop the exporters (call on shutdown)."""
        if self.provider is not None and hasattr(self.provider, "shutdown"):
            self.provider.shutdown()

    # ------------------------------------------------------------------ the request span + request metrics

    def middleware(self, ctx_key: Any = None) -> Any:
        """aiohttp middleware (put it first): the request span and the request counters.

        Reads the `RequestContext` the server stores at `request[ctx_key]` (default
        `gateway.server.CTX_KEY`) when the request ends.
        """
        if ctx_key is None:
            from gateway.context import CTX_KEY

            ctx_key = CTX_KEY
        self.ctx_key = ctx_key
        tracer = self.tracer
        if tracer is not None:
            from opentelemetry import context as otel_context
            from opentelemetry import propagate, trace

        @web.middleware
        async def telemetry_mw(request: web.Request, handler: Any) -> web.StreamResponse:
            if request.path in SKIP_PATHS:
                return await handler(request)
            st = _Request(self, request, time.perf_counter(), time.time_ns())
            token = _REQ.set(st)
            otel_token = None
            if tracer is not None:
                parent = propagate.extract(request.headers)
                st.span = tracer.start_span("guardgate.request", context=parent, kind=trace.SpanKind.SERVER,
                                            start_time=st.t0_ns,
                                            attributes={"http.request.method": request.method,
                                                        "url.path": request.path})
                otel_token = otel_context.attach(trace.set_span_in_context(st.span, parent))
            status = 500
            try:
                resp = await handler(request)
                status = resp.status
                return resp
            except web.HTTPException as e:
                status = e.status
                raise
            except BaseException as e:  # CancelledError: the client went away
                status = 499 if isinstance(e, asyncio.CancelledError) else 500
                if st.span is not None and status == 500:
                    st.span.record_exception(e)
                raise
            finally:
                try:
                    self._end_request(st, status)
                finally:
                    if otel_token is not None:
                        otel_context.detach(otel_token)
                    _REQ.reset(token)

        return telemetry_mw

    def count_request(self, ctx: Any, status: int, t0: float) -> None:
        """The request counter and duration histogram (`t0`: perf_counter at the request's start)."""
        self.m.count(ctx, status, time.perf_counter() - t0)

    def _end_request(self, st: _Request, status: int) -> None:
        ctx = st.ctx()
        if ctx is not None and ctx.status and status != 499:
            status = ctx.status
        self.count_request(ctx, status, st.t0)
        route = route_label(ctx)
        dialect = getattr(ctx, "dialect", None) or "none"
        span = st.span
        if span is None:
            return
        from opentelemetry.trace import Status, StatusCode

        attrs: dict[str, Any] = {"http.response.status_code": status, "http.route": route,
                                 "guardgate.dialect": dialect}
        if ctx is not None:
            attrs["guardgate.request_id"] = ctx.id
            if ctx.upstream:
                attrs["guardgate.upstream"] = ctx.upstream
                system = st.system or self._systems.get(ctx.upstream)
                if system:
                    attrs["gen_ai.system"] = system
            if ctx.policy:
                attrs["guardgate.policy"] = ctx.policy
            if ctx.model:
                attrs["gen_ai.request.model"] = ctx.model
            op = ctx.operation
            if op:
                attrs["gen_ai.operation.name"] = op
            attrs["guardgate.stream"] = bool(ctx.stream)
            if ctx.outcome:
                attrs["guardgate.outcome"] = ctx.outcome
            if getattr(ctx, "key", None) is not None:
                attrs["guardgate.key"] = ctx.key.name
        if st.finish_reasons:
            attrs["gen_ai.response.finish_reasons"] = list(st.finish_reasons)
        if st.usage is not None:
            attrs["gen_ai.usage.input_tokens"] = int(st.usage.prompt_tokens)
            attrs["gen_ai.usage.output_tokens"] = int(st.usage.completion_tokens)
        if st.response_model:
            attrs["gen_ai.response.model"] = st.response_model
        if st.response_id:
            attrs["gen_ai.response.id"] = st.response_id
        rec = st.audit
        if rec is not None:
            attrs["guardgate.policy"] = rec.get("policy") or attrs.get("guardgate.policy", "")
            attrs["guardgate.policy.mode"] = rec.get("mode") or "enforce"
            attrs["guardgate.action"] = rec.get("action") or "allow"
            attrs["guardgate.leaked_tokens"] = int(rec.get("leaked_tokens") or 0)
            attrs["guardgate.released_tokens"] = int(rec.get("released_tokens") or 0)
            if rec.get("blocked_stage"):
                attrs["guardgate.blocked_stage"] = rec["blocked_stage"]
            if rec.get("would_action"):
                attrs["guardgate.would_action"] = rec["would_action"]
        span.set_attributes(attrs)
        if status >= 500:
            span.set_status(Status(StatusCode.ERROR, getattr(ctx, "outcome", "") or f"HTTP {status}"))
        span.end()

    def record_audit(self, record: Mapping[str, Any] | None) -> None:
        """The final audit record of a request (PolicyRun.finish()): guard metrics, leak, guard spans."""
        if not record:
            return
        st = _REQ.get()
        policy = str(record.get("policy") or "none")
        steps = list(record.get("steps") or ())
        for step in steps:
            key = (str(step.get("stage")), str(step.get("step")))
            self.record_guard(step, latency=st is None or key not in st.live)
        self.m.actions.labels(policy, str(record.get("action") or "allow")).inc()
        if record.get("flagged_at") is not None:
            self.m.leak.labels(policy).observe(int(record.get("leaked_tokens") or 0))
        if st is None:
            return
        st.audit = dict(record)
        if self.tracer is not None and st.span is not None:
            self._synthetic_guard_spans(st, steps)

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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

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
    route_label,
)
from gateway.telemetry.streams import _REQ, _Request, observe_verdict
from gateway.telemetry.tracing import (
    SYSTEMS,
    _guard_attrs,
    _otlp_exporter,
    _truthy,
    _UpstreamCall,
    tracer_provider_from_env,
)
from gateway.types import Completion, Verdict
from gateway.workers.metrics import exposition_registry

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


class Telemetry:
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

    # ------------------------------------------------------------------ the upstream call

    def inject(self, headers: Any) -> None:
        """Write the current trace context (traceparent, tracestate, baggage) into `headers`."""
        if self.tracer is None:
            return
        from opentelemetry import propagate

        propagate.inject(headers)

    @contextlib.asynccontextmanager
    async def upstream_span(self, upstream: str, headers: Any = None, *, method: str = "POST",
                            url: str | None = None,
                            system: str | None = None) -> AsyncIterator[_UpstreamCall]:
        """Time one upstream call; with tracing, a CLIENT span whose context goes into `headers`.

        Set `call.status` inside the block (the response status) for the metric and the span.
        """
        st = _REQ.get()
        call = _UpstreamCall()
        t0 = time.perf_counter()
        if st is not None:
            if st.send_t is None:
                st.send_t = t0
            if system:
                st.system = system
        span = None
        if self.tracer is not None:
            from opentelemetry import propagate, trace

            attrs: dict[str, Any] = {"http.request.method": method, "guardgate.upstream": upstream}
            if url:
                attrs["url.full"] = url
                host = url.split("://", 1)[-1].split("/", 1)[0]
                if ":" in host and not host.endswith("]"):
                    host, port = host.rsplit(":", 1)
                    if port.isdigit():
                        attrs["server.port"] = int(port)
                attrs["server.address"] = host
            if system:
                attrs["gen_ai.system"] = system
            parent = trace.set_span_in_context(st.span) if st is not None and st.span is not None else None
            span = self.tracer.start_span("guardgate.upstream", context=parent, kind=trace.SpanKind.CLIENT,
                                          attributes=attrs)
            if headers is not None:
                propagate.inject(headers, context=trace.set_span_in_context(span))
        try:
            yield call
        except BaseException as e:
            if call.status is None:
                call.status = getattr(e, "status", None) or (
                    "cancelled" if isinstance(e, asyncio.CancelledError) else "error")
            if span is not None:
                from opentelemetry.trace import Status, StatusCode

                span.set_status(Status(StatusCode.ERROR, f"{type(e).__name__}: {e}"))
            raise
        finally:
            status = str(call.status) if call.status is not None else "unknown"
            self.m.upstream.labels(upstream, status).observe(time.perf_counter() - t0)
            if st is not None:
                st.upstream_end_ns = time.time_ns()
            if span is not None:
                if isinstance(call.status, int):
                    span.set_attribute("http.response.status_code", call.status)
                    if call.status >= 500:
                        from opentelemetry.trace import Status, StatusCode

                        span.set_status(Status(StatusCode.ERROR, f"HTTP {call.status}"))
                span.end()

    async def send(self, upstream: Any, method: str, path: str, query: str, headers: Any,
                   body: bytes | None) -> Any:
        """`upstream.send(...)` inside an upstream span: a drop-in replacement at the call sites."""
        if self.tracer is None:  # the relay's hot path: time it, nothing else
            st = _REQ.get()
            t0 = time.perf_counter()
            if st is not None and st.send_t is None:
                st.send_t = t0
            status: int | str = "error"
            try:
                resp = await upstream.send(method, path, query, headers, body)
                status = resp.status
                return resp
            except BaseException as e:
                status = getattr(e, "status", None) or (
                    "cancelled" if isinstance(e, asyncio.CancelledError) else "error")
                raise
            finally:
                self.m.upstream.labels(upstream.name, str(status)).observe(time.perf_counter() - t0)
        base = getattr(getattr(upstream, "cfg", None), "base_url", "")
        dialect = getattr(upstream, "dialect", None)
        url = (base + path) if base else None
        system = SYSTEMS.get(dialect, dialect) if dialect else None
        async with self.upstream_span(upstream.name, headers, method=method, url=url, system=system) as call:
            resp = await upstream.send(method, path, query, headers, body)
            call.status = resp.status
            return resp

    # ------------------------------------------------------------------ streams and completions

    def observe_stream(self, stats: Any) -> None:
        """A stream as it ended (`dialects.stream.StreamStats`, noted on the way by the upstream reader
        and the encoder): added TTFT, finish reasons, usage, the response's identity. Called once."""
        st = _REQ.get()
        if st is None:
            return
        st.first_in, st.first_out = stats.first_in, stats.first_out
        if stats.first_in is not None:
            st.first_in_ns = st.t0_ns + int((stats.first_in - st.t0) * 1e9)
        st.finish_reasons = list(stats.finish_reasons)
        if stats.usage is not None:
            st.usage = stats.usage
        st.response_model, st.response_id = stats.response_model, stats.response_id
        self._observe_ttft(st)

    def _observe_ttft(self, st: _Request) -> None:
        if st.first_in is None or st.first_out is None:
            return
        if st.send_t is not None:
            # client TTFT minus upstream TTFT (both from when each side started)
            added = (st.first_out - st.t0) - (st.first_in - st.send_t)
        else:  # local upstream: no send to time from; the hold-back alone
            added = st.first_out - st.first_in
        self.record_ttfb(max(0.0, added) * 1000.0)

    def record_ttfb(self, ms: float, policy: str | None = None) -> None:
        """Observe `ms` of time-to-first-token added by the gateway."""
        if policy is None:
            st = _REQ.get()
            ctx = st.ctx() if st is not None else None
            policy = getattr(ctx, "policy", None)
        self.m.added_ttft.labels(policy or "none").observe(ms / 1000.0)

    def observe_completion(self, completion: Completion) -> None:
        """A non-stream answer as sent to the client: finish reason, usage, response model."""
        st = _REQ.get()
        if st is None:
            return
        st.finish_reasons = [ch.finish_reason for ch in completion.choices]
        st.usage = completion.usage
        st.response_model, st.response_id = completion.model or None, completion.id or None

    # ------------------------------------------------------------------ guards and the audit record

    def _live_verdict(self, st: _Request, stage: str, step: str, v: Verdict) -> None:
        self.m.guard_latency.labels(v.guard, stage).observe(v.latency_ms / 1000.0)
        st.live.add((stage, step))
        if self.tracer is None or st.span is None:
            return
        end = time.time_ns()
        verdict = "error" if v.error is not None else "flagged" if v.flagged else "pass"
        attrs = _guard_attrs(v.guard, stage, step, verdict, v.score, v.categories, v.tokens_evaluated,
                             v.error)
        attrs["guardgate.guard.latency_ms"] = round(v.latency_ms, 3)
        self._guard_span(st, v.guard, attrs, end - int(v.latency_ms * 1e6), end, v.error)

    def _guard_span(self, st: _Request, guard: str, attrs: dict[str, Any], start_ns: int, end_ns: int,
                    error: str | None) -> None:
        from opentelemetry import trace
        from opentelemetry.trace import Status, StatusCode

        assert self.tracer is not None
        span = self.tracer.start_span(f"guardgate.guard {guard}", context=trace.set_span_in_context(st.span),
                                      start_time=max(start_ns, st.t0_ns), attributes=attrs)
        if error:
            span.set_status(Status(StatusCode.ERROR, error))
        span.end(end_time=max(end_ns, start_ns))

    def record_guard(self, step: Mapping[str, Any], *, latency: bool = True) -> None:
        """Metrics from one audit step record (stage, guard, verdict, score, categories, latency_ms,
        checks, tokens_evaluated, error). `latency=False` when the checks were observed live."""
        guard, stage = str(step.get("guard") or "unknown"), str(step.get("stage") or "unknown")
        verdict = str(step.get("verdict") or "not run").replace(" ", "_")
        cats = [str(c) for c in step.get("categories") or ()] if verdict == "flagged" else []
        for c in cats or ["none"]:
            self.m.verdicts.labels(guard, stage, verdict, c).inc()
        tokens = int(step.get("tokens_evaluated") or 0)
        if tokens:
            self.m.tokens.labels(guard, stage).inc(tokens)
        checks = int(step.get("checks") or 0)
        if latency and checks:
            # the record keeps the sum over checks: each check counts at the mean
            per = float(step.get("latency_ms") or 0.0) / checks / 1000.0
            h = self.m.guard_latency.labels(guard, stage)
            for _ in range(checks):
                h.observe(per)

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

    def _synthetic_guard_spans(self, st: _Request, steps: list[Mapping[str, Any]]) -> None:
        """Guard spans from the record for steps whose checks were not reported live."""
        now = time.time_ns()
        for step in steps:
            stage, label = str(step.get("stage")), str(step.get("step"))
            checks = int(step.get("checks") or 0)
            if not checks or (stage, label) in st.live:
                continue
            lat_ns = int(float(step.get("latency_ms") or 0.0) * 1e6)
            if stage == "input":
                start, end = st.t0_ns, st.t0_ns + lat_ns
            elif stage == "stream":
                start = st.first_in_ns or st.upstream_end_ns or st.t0_ns
                end = max(now, start + lat_ns)
            else:  # output: after the upstream answered
                start = st.upstream_end_ns or max(st.t0_ns, now - lat_ns)
                end = start + lat_ns
            guard = str(step.get("guard") or "unknown")
            attrs = _guard_attrs(guard, stage, label, str(step.get("verdict")), step.get("score"),
                                 step.get("categories") or (), int(step.get("tokens_evaluated") or 0),
                                 step.get("error"))
            attrs.update({"guardgate.guard.checks": checks, "guardgate.guard.synthetic": True,
                          "guardgate.guard.latency_ms": float(step.get("latency_ms") or 0.0)})
            for k in ("action", "outcome", "would"):
                if step.get(k):
                    attrs[f"guardgate.guard.{k}"] = str(step[k])
            self._guard_span(st, guard, attrs, start, end, step.get("error"))

    # ------------------------------------------------------------------ rate limits and usage

    def count_limit_refused(self, key: str, limit: str) -> None:
        self.m.rate_limited.labels(key, limit).inc()

    def count_limit_store_error(self, store: str, op: str, on_store_error: str) -> None:
        self.m.limit_store_errors.labels(store, op, on_store_error).inc()

    def record_usage(self, key: str, model: str, prompt: int, completion: int, source: str) -> None:
        """Tokens one answered request used. `model` is bounded (`MAX_USAGE_MODELS`, then "other"):
        it is the client's string, and a route's glob may match any number of them."""
        if model not in self._usage_models:
            if len(self._usage_models) >= MAX_USAGE_MODELS:
                model = "other"
            else:
                self._usage_models.add(model)
        self.m.usage_requests.labels(key, model).inc()
        self.m.usage_tokens.labels(key, model, "prompt", source).inc(prompt)
        self.m.usage_tokens.labels(key, model, "completion", source).inc(completion)

    # ------------------------------------------------------------------ /metrics

    def refresh_gauges(self) -> None:
        """Gauges read from callbacks, set just before a scrape (a model that went away reads 0)."""
        m = self.m
        now = self.sessions()
        for model in m.sessions_seen - now.keys():
            m.sessions.labels(model).set(0)
        for model, n in now.items():
            m.sessions.labels(model).set(n)
        m.sessions_seen |= now.keys()

    async def metrics_handler(self, request: web.Request) -> web.Response:
        """GET /metrics: Prometheus text (OpenMetrics when the scraper asks for it)."""
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        resp = web.Response(body=encoder(exposition_registry(self.registry)))  # sums over workers
        resp.headers["Content-Type"] = content_type
        return resp

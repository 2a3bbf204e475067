"""Tracing: the TracerProvider built from the standard OTEL_* variables, and guard span attributes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from gateway.telemetry.streams import _REQ, _Request
from gateway.types import Verdict

log = logging.getLogger("guardgate.telemetry")

# gen_ai.system by upstream dialect (OpenTelemetry GenAI semantic conventions; custom values where
# the registry has none).
SYSTEMS = {"openai": "openai", "llama": "meta_llama", "llama_cpp": "llama_cpp"}


def _truthy(v: str | None) -> bool:
    return (v or "").strip().lower() in ("1", "true", "yes", "on")


def tracer_provider_from_env(environ: Mapping[str, str] | None = None) -> Any:
    """A TracerProvider as the standard OTEL_* variables ask, or None when no exporter is configured.

    OTEL_TRACES_EXPORTER: comma list of otlp | console | none. Unset: otlp when an OTLP endpoint
    variable is set, else none. OTLP uses OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL (http/protobuf by
    default, grpc when its package is installed), and the exporter reads its own endpoint/header
    variables. OTEL_SDK_DISABLED=true turns tracing off. Sampling follows OTEL_TRACES_SAMPLER.
    """
    env = os.environ if environ is None else environ
    if _truthy(env.get("OTEL_SDK_DISABLED")):
        return None
    names = [n.strip().lower() for n in env.get("OTEL_TRACES_EXPORTER", "").split(",") if n.strip()]
    if not names:
        endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        names = ["otlp"] if endpoint else []
    exporters: list[tuple[str, Any]] = []
    for name in names:
        if name == "none":
            continue
        if name == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            exporters.append(("simple", ConsoleSpanExporter()))
        elif name == "otlp":
            exp = _otlp_exporter(env)
            if exp is not None:
                exporters.append(("batch", exp))
        else:
            log.warning("OTEL_TRACES_EXPORTER=%s is not supported (otlp, console, none); ignored", name)
    if not exporters:
        return None
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    resource = Resource.create({})  # reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": "guardgate"}))
    provider = TracerProvider(resource=resource)
    for how, exp in exporters:
        provider.add_span_processor(SimpleSpanProcessor(exp) if how == "simple" else BatchSpanProcessor(exp))
    return provider


def _otlp_exporter(env: Mapping[str, str]) -> Any:
    proto = (env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
             or "").lower()
    modules = {"grpc": "opentelemetry.exporter.otlp.proto.grpc.trace_exporter",
               "http": "opentelemetry.exporter.otlp.proto.http.trace_exporter"}
    order = ["grpc"] if proto == "grpc" else ["http"] if proto.startswith("http") else ["http", "grpc"]
    for kind in order:
        try:
            mod = __import__(modules[kind], fromlist=["OTLPSpanExporter"])
        except ImportError:
            continue
        return mod.OTLPSpanExporter()
    pkg = "opentelemetry-exporter-otlp-proto-" + ("grpc" if proto == "grpc" else "http")
    log.warning("OTLP trace export requested but %s is not installed; tracing is off", pkg)
    return None



@dataclass(slots=True)
class _UpstreamCall:
    status: int | str | None = None


def _guard_attrs(guard: str, stage: str, step: str, verdict: str, score: Any, categories: Iterable[Any],
                 tokens: int, error: Any) -> dict[str, Any]:
    attrs: dict[str, Any] = {"guardgate.guard.name": guard, "guardgate.guard.stage": stage,
                             "guardgate.guard.step": step, "guardgate.guard.verdict": verdict,
                             "guardgate.guard.categories": [str(c) for c in categories],
                             "guardgate.guard.tokens_evaluated": tokens}
    if score is not None:
        attrs["guardgate.guard.score"] = float(score)
    if error:
        attrs["guardgate.guard.error"] = str(error)
    return attrs


class _Tracing:
    """`Telemetry`'s spans past the request span: the upstream call (CLIENT span, context injected
    into the upstream request) and the guard spans (live, or synthetic from the audit record)."""

    m: Any  # metrics._Metrics
    tracer: Any

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

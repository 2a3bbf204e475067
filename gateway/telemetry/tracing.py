"""Tracing: the TracerProvider built from the standard OTEL_* variables, and guard span attributes."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

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

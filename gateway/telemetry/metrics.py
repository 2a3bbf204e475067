"""Metrics: every Prometheus instrument Guardgate exports (prometheus_client), the scrape-time
collector, and the bounded route label."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import choose_encoder

from gateway.endpoints import TABLE
from gateway.workers.metrics import exposition_registry

TABLE_SET = frozenset(TABLE)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
GUARD_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
MAX_USAGE_MODELS = 200  # distinct model labels on the usage metrics; the rest are "other"
LEAK_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class _Cached:
    """A labelled metric whose children are kept in a dict: `labels()` of prometheus_client takes a
    lock and validates on every call (~2 us); a dict hit is ~0.1 us. Label values are bounded."""

    __slots__ = ("_children", "metric")

    def __init__(self, metric: Any) -> None:
        self.metric = metric
        self._children: dict[tuple[str, ...], Any] = {}

    def labels(self, *values: str) -> Any:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self.metric.labels(*values)
        return child


class _Metrics:
    """Every Prometheus metric Guardgate exports, in one registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.requests = _Cached(Counter("guardgate_requests", "Client requests by route, dialect and HTTP status.",
                                        ["route", "dialect", "status"], registry=r))
        self.duration = _Cached(Histogram("guardgate_request_duration_seconds",
                                          "Whole request time, streams included.", ["route", "dialect"],
                                          buckets=LATENCY_BUCKETS, registry=r))
        self.upstream = _Cached(Histogram("guardgate_upstream_latency_seconds",
                                          "Upstream call: request sent to response headers.", ["upstream", "status"],
                                          buckets=LATENCY_BUCKETS, registry=r))
        # Rate limits and usage (gateway.limits): per key and model.
        self.rate_limited = _Cached(Counter("guardgate_rate_limited", "Requests refused with 429 by key and the "
                                            "limit that refused them.", ["key", "limit"], registry=r))
        self.limit_store_errors = _Cached(Counter("guardgate_rate_limit_store_errors",
                                                  "Rate-limit store failures (Redis down or slow) by store, "
                                                  "operation and what on_store_error did.",
                                                  ["store", "op", "on_store_error"], registry=r))
        self.usage_tokens = _Cached(Counter("guardgate_usage_tokens", "Tokens answered requests used, by key, "
                                            "model, type (prompt, completion) and source (upstream usage or "
                                            "the gateway's own count).", ["key", "model", "type", "source"],
                                            registry=r))
        self.usage_requests = _Cached(Counter("guardgate_usage_requests", "Requests whose token usage is known, "
                                              "by key and model.", ["key", "model"], registry=r))
        self.added_ttft = _Cached(Histogram("guardgate_added_ttft_seconds",
                                    "Time to first token added by the gateway (client TTFT minus upstream "
                                    "TTFT): input checks that run first, decoding, stream hold-back.",
                                    ["policy"], buckets=LATENCY_BUCKETS, registry=r))
        self.guard_latency = _Cached(Histogram("guardgate_guard_check_seconds", "One guard check.",
                                       ["guard", "stage"], buckets=GUARD_BUCKETS, registry=r))
        self.verdicts = _Cached(Counter("guardgate_guard_verdicts",
                                "Step verdicts per request (pass, flagged, error, not_run) by guard and "
                                "category (one per flagged category; 'none' otherwise).",
                                ["guard", "stage", "verdict", "category"], registry=r))
        self.tokens = _Cached(Counter("guardgate_guard_tokens_evaluated", "Tokens the guards evaluated.",
                              ["guard", "stage"], registry=r))
        self.leak = _Cached(Histogram("guardgate_stream_leaked_tokens",
                              "Tokens released to the client past the start of the first flagged window "
                              "(requests with a flag only).", ["policy"], buckets=LEAK_BUCKETS, registry=r))
        self.actions = _Cached(Counter("guardgate_policy_actions", "Requests by policy and the action taken.",
                               ["policy", "action"], registry=r))
        # Read from the engines at each scrape; with several workers, each reports its own engine's
        # sessions and /metrics sums the live ones.
        self.sessions = Gauge("guardgate_guard_sessions_alive", "Guard KV sessions resident in the in-process "
                              "engine.", ["model"], registry=r, multiprocess_mode="livesum")
        self.sessions_seen: set[str] = set()

    def count(self, ctx: Any, status: int, seconds: float) -> None:
        route = route_label(ctx)
        dialect = getattr(ctx, "dialect", None) or "none"
        self.requests.labels(route, dialect, str(status)).inc()
        self.duration.labels(route, dialect).observe(seconds)


class _CallbackCollector:
    """Counters read at scrape time from callbacks (guard verdict caches); sets the callback gauges
    first (registered before them, so a scrape reads them fresh)."""

    def __init__(self, tel: Any) -> None:  # the Telemetry it reads
        self.tel = tel

    def describe(self) -> list[Any]:
        return []  # values come from callbacks: no description at registration time

    def collect(self) -> Iterable[Any]:
        self.tel.refresh_gauges()
        hits = CounterMetricFamily("guardgate_guard_cache_hits", "Guard verdict cache hits.",
                                   labels=["guard"])
        for guard, n in self.tel.cache_hits().items():
            hits.add_metric([guard], n)
        yield hits


def _engine_sessions() -> dict[str, int]:
    """Sessions alive per model in the process-wide llama.cpp pool, if that engine was ever loaded.

    Looked up in `sys.modules`, never imported: telemetry must not pull the engine in.
    """
    mod = sys.modules.get("gateway.engine.pool")
    pool = getattr(mod, "_default_pool", None) if mod is not None else None
    if pool is None:
        return {}
    out: dict[str, int] = {}
    for path, snap in pool.stats().items():
        name = os.path.basename(str(path))
        out[name] = out.get(name, 0) + int(snap.get("sessions_alive", 0))
    return out


def route_label(ctx: Any) -> str:
    """A bounded route label: dialect prefix + the endpoint's template from the table (gateway.endpoints);
    an endpoint outside the table by its name ("/files/*", "/other/*"); "unmatched" before classification."""
    if ctx is None or ctx.endpoint is None:
        return "unmatched"
    ep = ctx.endpoint
    return ctx.prefix + (ep.template if ep in TABLE_SET else f"/{ep.name}/*")


class _Recording:
    """`Telemetry`'s metric recording past the request counters: guard steps, rate limits, usage,
    the callback gauges, and the /metrics handler."""

    m: _Metrics
    registry: CollectorRegistry
    _usage_models: set[str]
    sessions: Callable[[], Mapping[str, int]]

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

"""Telemetry without a server: tracer selection from OTEL_* variables, metrics from audit records,
guard spans (live and from the record), the upstream span, /metrics parsing."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from prometheus_client.parser import text_string_to_metric_families

from gateway import telemetry as T
from gateway.context import CTX_KEY, RequestContext
from gateway.dialects.stream import StreamStats
from gateway.endpoints import lookup
from gateway.types import Usage, Verdict

# ---------------------------------------------------------------------------- helpers


def traced() -> tuple[T.Telemetry, InMemorySpanExporter]:
    exp = InMemorySpanExporter()
    tp = TracerProvider()
    tp.add_span_processor(SimpleSpanProcessor(exp))
    return T.Telemetry(tracer_provider=tp), exp


def samples(tel: T.Telemetry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the /metrics text as {(name, sorted labels): value}, via the Prometheus parser."""
    from prometheus_client import generate_latest

    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for fam in text_string_to_metric_families(generate_latest(tel.registry).decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(tel: T.Telemetry, name: str, **labels: str) -> float:
    return samples(tel).get((name, tuple(sorted(labels.items()))), 0.0)


def audit_record(**over: Any) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "id": "r1", "policy": "p", "mode": "enforce", "status": 200, "action": "block",
        "blocked_stage": "stream", "leaked_tokens": 3, "released_tokens": 10, "flagged_at": 40,
        "steps": [
            {"stage": "input", "step": "input[0]:regex", "guard": "regex", "verdict": "pass", "score": 0.0,
             "categories": [], "latency_ms": 2.0, "checks": 1, "tokens_evaluated": 5},
            {"stage": "input", "step": "input[1]:slow", "guard": "slow", "verdict": "not run",
             "categories": [], "latency_ms": 0.0, "checks": 0, "tokens_evaluated": 0, "cancelled": 1},
            {"stage": "stream", "step": "stream[0]:llama_guard", "guard": "llama_guard", "verdict": "flagged",
             "score": 0.93, "categories": ["S1", "S9"], "latency_ms": 30.0, "checks": 3,
             "tokens_evaluated": 120},
            {"stage": "stream", "step": "stream[1]:code_shield", "guard": "code_shield", "verdict": "error",
             "categories": [], "latency_ms": 5.0, "checks": 1, "tokens_evaluated": 0,
             "error": "timeout after 2000 ms"},
        ],
    }
    rec.update(over)
    return rec


def request_with_ctx(tail: str = "/chat/completions", **ctx_kw: Any) -> tuple[web.Request, RequestContext]:
    req = make_mocked_request("POST", "/v1" + tail, headers={
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"})
    ctx = RequestContext(id="req-1", dialect="openai", prefix="/v1", tail=tail,
                         endpoint=lookup("openai", "POST", tail), **ctx_kw)
    return req, ctx


async def run_mw(tel: T.Telemetry, req: web.Request, ctx: RequestContext, body: Any) -> web.StreamResponse:
    """The middleware around a handler that stores `ctx` and runs `body(ctx)`."""

    async def handler(request: web.Request) -> web.StreamResponse:
        request[CTX_KEY] = ctx
        await body(ctx)
        ctx.status = ctx.status or 200
        return web.Response(status=ctx.status)

    return await tel.middleware()(req, handler)


# ---------------------------------------------------------------------------- tracer from env


def test_no_exporter_configured_means_no_tracer() -> None:
    assert T.tracer_provider_from_env({}) is None
    assert T.tracer_provider_from_env({"OTEL_TRACES_EXPORTER": "none"}) is None
    off = {"OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": "true"}
    assert T.tracer_provider_from_env(off) is None
    tel = T.Telemetry(tracer_provider=None)
    assert not tel.tracing


def test_console_and_otlp_exporters_from_env() -> None:
    tp = T.tracer_provider_from_env({"OTEL_TRACES_EXPORTER": "console"})
    procs = tp._active_span_processor._span_processors
    assert [type(p) for p in procs] == [SimpleSpanProcessor]
    assert tp.resource.attributes["service.name"] == "guardgate"
    tp.shutdown()
    # an endpoint alone selects OTLP (http/protobuf is installed); nothing is sent until a span ends
    tp = T.tracer_provider_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"})
    procs = tp._active_span_processor._span_processors
    assert [type(p) for p in procs] == [BatchSpanProcessor]
    assert type(procs[0].span_exporter).__name__ == "OTLPSpanExporter"
    tp.shutdown()


def test_otlp_grpc_without_its_package_turns_tracing_off(caplog: pytest.LogCaptureFixture) -> None:
    try:
        import opentelemetry.exporter.otlp.proto.grpc  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("the grpc exporter is installed here")
    env = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}
    assert T.tracer_provider_from_env(env) is None
    assert "opentelemetry-exporter-otlp-proto-grpc is not installed" in caplog.text


# ---------------------------------------------------------------------------- metrics from records


def test_record_audit_moves_guard_metrics_and_never_counts_not_run_as_pass() -> None:
    tel = T.Telemetry(tracer_provider=None)
    tel.record_audit(audit_record())
    assert value(tel, "guardgate_guard_verdicts_total", guard="regex", stage="input", verdict="pass",
                 category="none") == 1
    assert value(tel, "guardgate_guard_verdicts_total", guard="slow", stage="input", verdict="not_run",
                 category="none") == 1
    assert value(tel, "guardgate_guard_verdicts_total", guard="slow", stage="input", verdict="pass",
                 category="none") == 0
    for cat in ("S1", "S9"):
        assert value(tel, "guardgate_guard_verdicts_total", guard="llama_guard", stage="stream",
                     verdict="flagged", category=cat) == 1
    assert value(tel, "guardgate_guard_verdicts_total", guard="code_shield", stage="stream", verdict="error",
                 category="none") == 1
    assert value(tel, "guardgate_guard_tokens_evaluated_total", guard="llama_guard", stage="stream") == 120
    # three checks at the mean (10 ms each): all three in the 10 ms bucket
    assert value(tel, "guardgate_guard_check_seconds_count", guard="llama_guard", stage="stream") == 3
    assert value(tel, "guardgate_guard_check_seconds_bucket", guard="llama_guard", stage="stream",
                 le="0.005") == 0
    assert value(tel, "guardgate_guard_check_seconds_bucket", guard="llama_guard", stage="stream",
                 le="0.01") == 3
    assert value(tel, "guardgate_guard_check_seconds_count", guard="slow", stage="input") == 0
    assert value(tel, "guardgate_policy_actions_total", policy="p", action="block") == 1
    assert value(tel, "guardgate_stream_leaked_tokens_count", policy="p") == 1
    assert value(tel, "guardgate_stream_leaked_tokens_sum", policy="p") == 3
    # a request with no flag does not enter the leak histogram
    tel.record_audit(audit_record(action="allow", flagged_at=None, leaked_tokens=0, steps=[]))
    assert value(tel, "guardgate_stream_leaked_tokens_count", policy="p") == 1
    assert value(tel, "guardgate_policy_actions_total", policy="p", action="allow") == 1


def test_registries_are_private() -> None:
    a, b = T.Telemetry(tracer_provider=None), T.Telemetry(tracer_provider=None)
    a.record_audit(audit_record())
    assert value(a, "guardgate_policy_actions_total", policy="p", action="block") == 1
    assert value(b, "guardgate_policy_actions_total", policy="p", action="block") == 0


def test_sessions_and_cache_hits_come_from_callbacks() -> None:
    tel = T.Telemetry(tracer_provider=None)
    tel.add_sessions_source(lambda: {"llama-guard-3-1b.gguf": 3})

    guard = SimpleNamespace(stats={"cache_hits": 7})
    step = SimpleNamespace(guard_name="prompt_guard", guard=guard)
    policy = SimpleNamespace(steps=[step, step])  # the same guard instance twice: counted once
    store = SimpleNamespace(policies=lambda: [policy])
    tel.bind(SimpleNamespace(upstreams={}, policies=store))
    assert value(tel, "guardgate_guard_sessions_alive", model="llama-guard-3-1b.gguf") == 3
    assert value(tel, "guardgate_guard_cache_hits_total", guard="prompt_guard") == 7
    guard.stats["cache_hits"] = 9
    assert value(tel, "guardgate_guard_cache_hits_total", guard="prompt_guard") == 9


def test_route_labels_are_bounded() -> None:
    ctx = RequestContext(id="x", dialect="openai", prefix="/v1", tail="/chat/completions",
                         endpoint=lookup("openai", "POST", "/chat/completions"))
    assert T.route_label(ctx) == "/v1/chat/completions"
    ctx.tail = "/models/gpt-4o"
    ctx.endpoint = lookup("openai", "GET", ctx.tail)
    assert T.route_label(ctx) == "/v1/models/{model}"
    ctx.tail = "/files/file-abc123/content"
    ctx.endpoint = lookup("openai", "GET", ctx.tail)
    assert T.route_label(ctx) == "/v1/files/*"
    ctx.tail = "/anything/else-42"
    ctx.endpoint = lookup("openai", "GET", ctx.tail)
    assert T.route_label(ctx) == "/v1/other/*"
    assert T.route_label(None) == "unmatched"


# ---------------------------------------------------------------------------- spans through the middleware


async def test_request_span_continues_the_client_trace_and_guard_spans_come_from_the_record() -> None:
    tel, exp = traced()
    req, ctx = request_with_ctx(model="gpt-test", upstream="main", policy="p", stream=True)

    async def body(ctx: RequestContext) -> None:
        tel.record_audit(audit_record())

    resp = await run_mw(tel, req, ctx, body)
    assert resp.status == 200
    spans = {s.name: s for s in exp.get_finished_spans()}
    root = spans["guardgate.request"]
    assert root.kind == SpanKind.SERVER
    assert format(root.context.trace_id, "032x") == "0af7651916cd43dd8448eb211c80319c"
    assert format(root.parent.span_id, "016x") == "b7ad6b7169203331"
    a = root.attributes
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.request.model"] == "gpt-test"
    assert a["guardgate.policy"] == "p" and a["guardgate.action"] == "block"
    assert a["guardgate.leaked_tokens"] == 3 and a["guardgate.blocked_stage"] == "stream"
    assert a["http.response.status_code"] == 200 and a["guardgate.dialect"] == "openai"
    # steps that ran get a span each; the step that never ran gets none
    assert set(spans) == {"guardgate.request", "guardgate.guard regex", "guardgate.guard llama_guard",
                          "guardgate.guard code_shield"}
    lg = spans["guardgate.guard llama_guard"]
    assert lg.parent.span_id == root.context.span_id
    assert lg.attributes["guardgate.guard.verdict"] == "flagged"
    assert tuple(lg.attributes["guardgate.guard.categories"]) == ("S1", "S9")
    assert lg.attributes["guardgate.guard.score"] == pytest.approx(0.93)
    assert lg.attributes["guardgate.guard.synthetic"] is True
    assert lg.attributes["guardgate.guard.checks"] == 3
    cs = spans["guardgate.guard code_shield"]
    assert cs.status.is_ok is False and cs.attributes["guardgate.guard.error"].startswith("timeout")
    rx = spans["guardgate.guard regex"]
    assert rx.start_time == root.start_time and rx.end_time - rx.start_time == 2_000_000
    assert value(tel, "guardgate_requests_total", route="/v1/chat/completions", dialect="openai",
                 status="200") == 1


async def test_live_verdicts_give_one_span_per_check_and_the_record_does_not_repeat_them() -> None:
    tel, exp = traced()
    req, ctx = request_with_ctx(policy="p")
    rec = audit_record(steps=[audit_record()["steps"][2]])  # llama_guard, 3 checks

    async def body(ctx: RequestContext) -> None:
        await asyncio.sleep(0.03)  # spans never start before the request: leave room for 14 ms checks
        for lat in (4.0, 12.0, 14.0):
            flag = lat > 13
            T.observe_verdict("stream", "stream[0]:llama_guard",
                              Verdict(guard="llama_guard", flagged=flag, score=0.9 if flag else 0.1,
                                      categories=["S1"] if flag else [], latency_ms=lat, tokens_evaluated=40))
        tel.record_audit(rec)

    await run_mw(tel, req, ctx, body)
    guard_spans = [s for s in exp.get_finished_spans() if s.name == "guardgate.guard llama_guard"]
    assert len(guard_spans) == 3
    assert [s.attributes["guardgate.guard.verdict"] for s in guard_spans] == ["pass", "pass", "flagged"]
    assert [round((s.end_time - s.start_time) / 1e6) for s in guard_spans] == [4, 12, 14]
    assert all("guardgate.guard.synthetic" not in s.attributes for s in guard_spans)
    # latency observed per live check (exact), not again from the record's mean
    assert value(tel, "guardgate_guard_check_seconds_count", guard="llama_guard", stage="stream") == 3
    assert value(tel, "guardgate_guard_check_seconds_bucket", guard="llama_guard", stage="stream",
                 le="0.005") == 1
    # the verdict counter still counts the step once per request
    assert value(tel, "guardgate_guard_verdicts_total", guard="llama_guard", stage="stream",
                 verdict="flagged", category="S1") == 1


def test_observe_verdict_outside_a_request_is_a_no_op() -> None:
    T.observe_verdict("input", "x", Verdict(guard="regex", latency_ms=1.0))


async def test_upstream_span_is_a_client_child_and_its_context_is_injected() -> None:
    tel, exp = traced()
    req, ctx = request_with_ctx()
    headers: dict[str, str] = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}

    async def body(ctx: RequestContext) -> None:
        async with tel.upstream_span("main", headers, url="http://127.0.0.1:9999/v1/chat/completions",
                                     system="openai") as call:
            call.status = 200

    await run_mw(tel, req, ctx, body)
    spans = {s.name: s for s in exp.get_finished_spans()}
    up, root = spans["guardgate.upstream"], spans["guardgate.request"]
    assert up.kind == SpanKind.CLIENT and up.parent.span_id == root.context.span_id
    assert up.attributes["server.address"] == "127.0.0.1" and up.attributes["server.port"] == 9999
    assert up.attributes["http.response.status_code"] == 200
    _version, trace_id, parent_id, _flags = headers["traceparent"].split("-")
    assert trace_id == "0af7651916cd43dd8448eb211c80319c"
    assert parent_id == format(up.context.span_id, "016x")  # the upstream's parent is our CLIENT span
    assert value(tel, "guardgate_upstream_latency_seconds_count", upstream="main", status="200") == 1


async def test_without_tracing_headers_are_untouched_and_metrics_still_move() -> None:
    tel = T.Telemetry(tracer_provider=None)
    req, ctx = request_with_ctx()
    headers = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    before = dict(headers)

    async def body(ctx: RequestContext) -> None:
        async with tel.upstream_span("main", headers) as call:
            call.status = 502
        tel.inject(headers)

    await run_mw(tel, req, ctx, body)
    assert headers == before
    assert value(tel, "guardgate_upstream_latency_seconds_count", upstream="main", status="502") == 1
    assert value(tel, "guardgate_requests_total", route="/v1/chat/completions", dialect="openai",
                 status="200") == 1


async def test_a_stream_is_reported_once_at_its_end_with_added_ttft_and_usage() -> None:
    """Nothing wraps the events: the figures noted on the way (StreamStats) are reported at the end."""
    tel, exp = traced()
    req, ctx = request_with_ctx(policy="p")

    async def body(ctx: RequestContext) -> None:
        async with tel.upstream_span("main") as call:
            call.status = 200
        stats = StreamStats(first_in=time.perf_counter())
        await asyncio.sleep(0.05)  # a gate that holds the first token for 50 ms
        stats.first_out = time.perf_counter()
        stats.finish_reasons.append("stop")
        stats.usage = Usage(prompt_tokens=5, completion_tokens=2, total_tokens=7)
        tel.observe_stream(stats)

    await run_mw(tel, req, ctx, body)
    assert value(tel, "guardgate_added_ttft_seconds_count", policy="p") == 1
    # the 50 ms hold-back is in it (a lower bound: a loaded machine only adds), within a generous bound
    assert value(tel, "guardgate_added_ttft_seconds_bucket", policy="p", le="0.025") == 0
    assert value(tel, "guardgate_added_ttft_seconds_bucket", policy="p", le="10.0") == 1
    root = next(s for s in exp.get_finished_spans() if s.name == "guardgate.request")
    assert root.attributes["gen_ai.usage.input_tokens"] == 5
    assert root.attributes["gen_ai.usage.output_tokens"] == 2
    assert root.attributes["gen_ai.response.finish_reasons"] == ("stop",)


async def test_metrics_handler_serves_text_the_parser_reads() -> None:
    tel = T.Telemetry(tracer_provider=None)
    tel.record_audit(audit_record())
    resp = await tel.metrics_handler(make_mocked_request("GET", "/metrics"))
    assert resp.content_type == "text/plain"
    names = {f.name for f in text_string_to_metric_families(resp.body.decode())}
    assert {"guardgate_requests", "guardgate_guard_verdicts", "guardgate_guard_check_seconds",
            "guardgate_stream_leaked_tokens", "guardgate_guard_sessions_alive",
            "guardgate_guard_cache_hits", "guardgate_added_ttft_seconds",
            "guardgate_upstream_latency_seconds"} <= names
    om = await tel.metrics_handler(make_mocked_request("GET", "/metrics",
                                                       headers={"Accept": "application/openmetrics-text"}))
    assert om.headers["Content-Type"].startswith("application/openmetrics-text")
    assert om.body.decode().rstrip().endswith("# EOF")


# Every metric and span name users have today: dashboards and alerts are built on them.
METRIC_NAMES = {
    "guardgate_requests", "guardgate_request_duration_seconds", "guardgate_upstream_latency_seconds",
    "guardgate_rate_limited", "guardgate_rate_limit_store_errors", "guardgate_usage_tokens",
    "guardgate_usage_requests", "guardgate_added_ttft_seconds", "guardgate_guard_check_seconds",
    "guardgate_guard_verdicts", "guardgate_guard_tokens_evaluated", "guardgate_stream_leaked_tokens",
    "guardgate_policy_actions", "guardgate_guard_sessions_alive", "guardgate_guard_cache_hits",
}
SPAN_NAMES = {"guardgate.request", "guardgate.upstream", "guardgate.guard <name>"}


def test_every_metric_name_is_kept_and_is_a_prometheus_client_instrument() -> None:
    from prometheus_client import Counter, Gauge, Histogram

    tel = T.Telemetry(tracer_provider=None)
    names = {f.name for f in tel.registry.collect()}
    assert names == METRIC_NAMES
    instruments = [v for v in vars(tel.m).values() if isinstance(v, (T._Cached, Counter, Gauge, Histogram))]
    for inst in instruments:
        metric = inst.metric if isinstance(inst, T._Cached) else inst
        assert isinstance(metric, (Counter, Gauge, Histogram))
        if isinstance(metric, Gauge):  # `--workers N` sums gauges over processes: each says how
            assert metric._multiprocess_mode in ("livesum", "liveall", "max", "min", "sum", "all", "mostrecent")
    assert not any(n.startswith("_Loop") for n in dir(T))


async def test_every_span_name_is_kept() -> None:
    tel, exp = traced()
    req, ctx = request_with_ctx(policy="p")

    async def body(ctx: RequestContext) -> None:
        async with tel.upstream_span("main") as call:
            call.status = 200
        T.observe_verdict("input", "input[0]:regex", Verdict(guard="regex", flagged=False, latency_ms=1.0))

    await run_mw(tel, req, ctx, body)
    names = {s.name for s in exp.get_finished_spans()}
    assert names == {"guardgate.request", "guardgate.upstream", "guardgate.guard regex"}
    assert {n.replace("<name>", "regex") for n in SPAN_NAMES} == names



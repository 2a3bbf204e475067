"""Per-request state (arrival, the request span, a stream's figures, live guard spans) in a context
variable, and `observe_verdict`, the callback the policy code reports each verdict to."""

from __future__ import annotations

import contextvars
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from gateway.types import Completion, Verdict


@dataclass(slots=True, eq=False)
class _Request:
    tel: Any  # the Telemetry (gateway.telemetry) this request reports to
    request: web.Request
    t0: float  # perf_counter at arrival
    t0_ns: int  # wall clock at arrival (span timestamps)
    span: Any = None  # the request span (None: tracing off)
    system: str | None = None
    send_t: float | None = None  # first upstream send
    upstream_end_ns: int | None = None
    first_in: float | None = None  # first token from the upstream
    first_in_ns: int | None = None
    first_out: float | None = None  # first token to the client
    finish_reasons: list[str] = field(default_factory=list)
    usage: Any = None
    response_model: str | None = None
    response_id: str | None = None
    live: set[tuple[str, str]] = field(default_factory=set)  # (stage, step) with live guard spans
    audit: dict[str, Any] | None = None

    def ctx(self) -> Any:
        key = self.tel.ctx_key
        return self.request.get(key) if key is not None else None


_REQ: contextvars.ContextVar[_Request | None] = contextvars.ContextVar("guardgate_telemetry_request",
                                                                      default=None)


def observe_verdict(stage: str, step: str, verdict: Verdict) -> None:
    """Report one guard verdict as it arrives (called by the policy code for every check).

    Creates a live `guardgate.guard <name>` span (start = now - latency) under the current
    request's span and observes the check latency. No request in context (tests, `guardgate
    check`): does nothing.
    """
    st = _REQ.get()
    if st is not None:
        st.tel._live_verdict(st, stage, step, verdict)


class _StreamObservation:
    """`Telemetry`'s per-stream observation: a stream's figures (or a non-stream answer's) as it ended."""

    m: Any  # metrics._Metrics

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

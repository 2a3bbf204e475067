"""Per-request state (arrival, the request span, a stream's figures, live guard spans) in a context
variable, and `observe_verdict`, the callback the policy code reports each verdict to."""

from __future__ import annotations

import contextvars
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from gateway.types import Verdict


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

"""Per-request facts (and, re-exported, the gateway's own error): a module every layer may import.

At run time it imports only `gateway.errors`; the config and endpoint types it names are for type
checkers only. Nothing here imports the server, the pipeline, policies or telemetry, so those can all
depend on it without cycles.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

from gateway.errors import GatewayError

__all__ = ["CTX_KEY", "GatewayError", "RequestContext", "describe"]

if TYPE_CHECKING:
    from gateway.config import GatewayKey, Route
    from gateway.endpoints import Endpoint


@dataclass(slots=True)
class RequestContext:
    """Per-request facts every layer may read (never the body or keys)."""

    id: str
    dialect: str
    prefix: str = ""
    tail: str = ""  # the canonical path after the prefix, e.g. "/chat/completions"
    endpoint: Endpoint | None = None  # the table's entry for (dialect, method, tail)
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
    meter_tokens: bool = False  # a token budget applies: count the answer's tokens even without upstream usage
    usage: Any = None  # gateway.limits.usage.Counted: the tokens the answer used, once known

    @property
    def operation(self) -> str | None:
        """The telemetry operation name of this request's endpoint (GenAI conventions)."""
        return self.endpoint.operation if self.endpoint is not None else None


def describe(ctx: RequestContext, method: str) -> str:
    """`POST /v1/files` — how an endpoint is named in errors."""
    return f"{method} {ctx.prefix}{ctx.tail}"



CTX_KEY: web.RequestKey[RequestContext] = web.RequestKey("ctx")  # where the server keeps it on a request

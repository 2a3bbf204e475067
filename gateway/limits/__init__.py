"""Per-key rate limits and token budgets, shared by every replica through a store.

    limits = router.plan(...).rate            # the effective limits of this request (None: no limiter work)
    ticket = await limiter.acquire(ctx, limits)   # 429 / 503 GatewayError, or a ticket
    try:    ... carry the plan out ...
    finally: await limiter.finish(ticket, ctx.usage_tokens)   # charge tokens, release the stream slot

What is counted, per bucket (a gateway key, or a key on one route when the value is the route's
default; see `RateLimits.bucket`):
  - `requests_per_minute`: a sliding window log (each admitted request's time, the last 60 s);
    exact, so N replicas sharing a store admit exactly the limit between them;
  - `tokens_per_minute`, `tokens_per_day`: tokens charged after each answer (the upstream's usage, or
    the gateway's own count of what it relayed) into 60 sub-buckets of the window (1 s for a
    minute, 24 min for a day); a request is refused while the window's sum is at or over the limit,
    so the answer that crosses a budget completes and the next request is refused;
  - `max_concurrent_streams`: leases of the streaming requests in flight (released in a `finally`,
    and expiring after `LEASE_TTL_S` should a replica die holding one).

The check and the bookkeeping of one request are one atomic step in the store (a Lua script in
Redis), so the refusal decision never races between replicas. A store that fails (Redis down,
slow past `store_timeout_ms`) follows `on_store_error`: `allow` serves the request unlimited,
`deny` answers 503; either way it is counted in /metrics, never a 500.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gateway.context import GatewayError
from gateway.limits.store import (  # re-exported: the package's interface
    CONCURRENCY_RETRY_MS,
    DAY_MS,
    LEASE_TTL_S,
    LIMIT_NAMES,
    MINUTE_MS,
    SUB_BUCKETS,
    Decision,
    RateLimits,
    Store,
)

if TYPE_CHECKING:
    from gateway.context import RequestContext

__all__ = ["CONCURRENCY_RETRY_MS", "DAY_MS", "LEASE_TTL_S", "LIMIT_NAMES", "MINUTE_MS", "SUB_BUCKETS", "Decision",
           "Limiter", "RateLimited", "RateLimits", "Store", "Ticket", "duration", "make_store", "rate_headers"]

log = logging.getLogger("guardgate.limits")


@dataclass(slots=True)
class Ticket:
    """An admitted request's hold on its limits: what `finish` charges and releases."""

    limits: RateLimits
    lease: str
    stream: bool
    held: bool  # False when the store failed and on_store_error let the request through


def duration(ms: int) -> str:
    """A reset time as the OpenAI headers spell it (`x-ratelimit-reset-*`): `20ms`, `1.5s`, `6m0s`."""
    ms = max(0, int(ms))
    if ms < 1000:
        return f"{ms}ms"
    s = ms / 1000
    if s < 60:
        return f"{s:g}s"
    minutes, secs = divmod(round(s), 60)
    if minutes < 60:
        return f"{minutes}m{secs}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes}m{secs}s"


def rate_headers(limits: RateLimits, d: Decision) -> dict[str, str]:
    """The `x-ratelimit-*` headers the OpenAI SDKs read, plus `Retry-After` (seconds) and
    `retry-after-ms` (which the openai SDK prefers) when refused."""
    h: dict[str, str] = {}
    if limits.requests_per_minute:
        h["x-ratelimit-limit-requests"] = str(limits.requests_per_minute)
        h["x-ratelimit-remaining-requests"] = str(max(0, limits.requests_per_minute - d.requests_used))
        h["x-ratelimit-reset-requests"] = duration(d.requests_reset_ms)
    # the token headers show the window that refused, else the per-minute one when set
    day = limits.tokens_per_day and (d.refused == "tokens_per_day" or not limits.tokens_per_minute)
    if day:
        h["x-ratelimit-limit-tokens"] = str(limits.tokens_per_day)
        h["x-ratelimit-remaining-tokens"] = str(max(0, limits.tokens_per_day - d.tokens_day_used))
        h["x-ratelimit-reset-tokens"] = duration(d.tokens_day_reset_ms)
    elif limits.tokens_per_minute:
        h["x-ratelimit-limit-tokens"] = str(limits.tokens_per_minute)
        h["x-ratelimit-remaining-tokens"] = str(max(0, limits.tokens_per_minute - d.tokens_minute_used))
        h["x-ratelimit-reset-tokens"] = duration(d.tokens_minute_reset_ms)
    if not d.allowed:
        h["Retry-After"] = str(max(1, math.ceil(d.retry_ms / 1000)))
        h["retry-after-ms"] = str(max(1, d.retry_ms))
    return h


class RateLimited(GatewayError):
    """429 in the client's dialect; `headers` go out with it (server.error_headers)."""

    def __init__(self, limits: RateLimits, d: Decision, who: str) -> None:
        what = {"requests_per_minute": f"{limits.requests_per_minute} requests per minute",
                "tokens_per_minute": f"{limits.tokens_per_minute} tokens per minute",
                "tokens_per_day": f"{limits.tokens_per_day} tokens per day",
                "max_concurrent_streams": f"{limits.max_concurrent_streams} concurrent streams"}[d.refused]
        super().__init__(429, f"rate limit reached for {who}: {what}; retry after {duration(d.retry_ms)}",
                         "rate_limit_exceeded", type="rate_limit_error", retry=True, headers=rate_headers(limits, d))


class Limiter:
    """The gateway's one limiter: asks the store, renders refusals, counts what happened."""

    def __init__(self, store: Store, on_store_error: str = "allow", timeout_s: float = 0.25,
                 telemetry: Any = None) -> None:
        self.store = store
        self.on_store_error = on_store_error
        self.timeout_s = timeout_s
        self.telemetry = telemetry
        self._seq = 0
        self._prefix = os.urandom(6).hex()

    def _lease(self, ctx: RequestContext) -> str:
        """A member unique across replicas (the client may choose the request id)."""
        self._seq += 1
        return f"{self._prefix}:{self._seq}"

    def _store_error(self, op: str, e: BaseException) -> None:
        log.warning("rate-limit store %s failed on %s: %s: %s (on_store_error: %s)", self.store.name, op,
                    type(e).__name__, e, self.on_store_error)
        if self.telemetry is not None:
            self.telemetry.count_limit_store_error(self.store.name, op, self.on_store_error)

    async def acquire(self, ctx: RequestContext, limits: RateLimits) -> Ticket:
        """Admit the request or raise: 429 over a limit, 503 when the store failed and `deny` is set."""
        lease = self._lease(ctx)
        stream = ctx.stream
        try:
            async with asyncio.timeout(self.timeout_s):
                d = await self.store.acquire(limits, int(time.time() * 1000), lease, stream)
        except Exception as e:  # Redis down or slow: never a 500
            self._store_error("acquire", e)
            if self.on_store_error == "deny":
                raise GatewayError(503, "the rate-limit store is unavailable; the request is refused "
                                   "(on_store_error: deny)", "rate_limit_store_unavailable", type="api_error",
                                   retry=True) from None
            return Ticket(limits, lease, stream, held=False)
        if not d.allowed:
            if self.telemetry is not None:
                self.telemetry.count_limit_refused(ctx.key.name if ctx.key else "-", d.refused)
            raise RateLimited(limits, d, f"key {ctx.key.name!r}" if ctx.key else "this route")
        return Ticket(limits, lease, stream, held=True)

    @staticmethod
    def has_work(ticket: Ticket, tokens: int) -> bool:
        """Whether `finish` has anything to do (tokens to charge, a stream slot to release)."""
        return bool((tokens and ticket.limits.meters_tokens)
                    or (ticket.held and ticket.stream and ticket.limits.max_concurrent_streams))

    async def finish(self, ticket: Ticket, tokens: int) -> None:
        """Charge the tokens the answer used and release the stream slot. Errors are counted, never raised."""
        if not self.has_work(ticket, tokens):
            return
        stream = ticket.stream and ticket.held  # a lease that was never taken is not released
        try:
            async with asyncio.timeout(self.timeout_s):
                await self.store.finish(ticket.limits, int(time.time() * 1000), ticket.lease, stream,
                                        tokens if ticket.limits.meters_tokens else 0)
        except Exception as e:
            self._store_error("finish", e)

    async def aclose(self) -> None:
        await self.store.aclose()


def make_store(kind: str, url: str | None, timeout_s: float = 0.25) -> Store:
    if kind == "redis":
        from gateway.limits.redis_store import RedisStore

        assert url
        return RedisStore(url, timeout_s)
    from gateway.limits.memory import MemoryStore

    return MemoryStore()

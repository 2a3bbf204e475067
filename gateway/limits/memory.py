"""The in-process store: the same windows as the Redis script, in dicts. One replica only.

Runs on the event loop's thread with no await between check and update, so each call is atomic
without a lock.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from gateway.limits.store import (
    CONCURRENCY_RETRY_MS,
    DAY_MS,
    LEASE_TTL_S,
    MINUTE_MS,
    SUB_BUCKETS,
    Decision,
    RateLimits,
)


@dataclass(slots=True)
class _Buckets:
    """A token window as SUB_BUCKETS counters: sub-bucket index -> tokens."""

    window_ms: int
    counts: dict[int, int] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return self.window_ms // SUB_BUCKETS

    def used(self, now_ms: int) -> int:
        # a sub-bucket stays until its last millisecond is a whole window old (never under-counts)
        first = (now_ms - self.window_ms) // self.size
        for b in [b for b in self.counts if b < first]:
            del self.counts[b]
        return sum(self.counts.values())

    def reset_ms(self, now_ms: int, limit: int) -> int:
        """How long until the window's sum drops below `limit` (0 if it is below)."""
        total = sum(self.counts.values())
        for b in sorted(self.counts):
            if total < limit:
                break
            total -= self.counts[b]
            if total < limit:
                return (b + 1) * self.size + self.window_ms - now_ms
        return 0 if total < limit else self.window_ms

    def add(self, now_ms: int, tokens: int) -> None:
        b = now_ms // self.size
        self.counts[b] = self.counts.get(b, 0) + tokens


@dataclass(slots=True)
class _Bucket:
    requests: deque[int] = field(default_factory=deque)  # admission times (ms), oldest first
    minute: _Buckets = field(default_factory=lambda: _Buckets(MINUTE_MS))
    day: _Buckets = field(default_factory=lambda: _Buckets(DAY_MS))
    leases: dict[str, int] = field(default_factory=dict)  # lease -> expiry (ms)


class MemoryStore:
    name = "memory"

    def __init__(self) -> None:
        self.buckets: dict[str, _Bucket] = {}

    async def acquire(self, limits: RateLimits, now_ms: int, lease: str, stream: bool) -> Decision:
        b = self.buckets.get(limits.bucket)
        if b is None:
            b = self.buckets[limits.bucket] = _Bucket()
        while b.requests and b.requests[0] <= now_ms - MINUTE_MS:
            b.requests.popleft()
        d = Decision(allowed=True)
        if limits.requests_per_minute:
            d.requests_used = len(b.requests)
            if b.requests:
                d.requests_reset_ms = b.requests[0] + MINUTE_MS - now_ms
            if d.requests_used >= limits.requests_per_minute:
                d.allowed, d.refused, d.retry_ms = False, "requests_per_minute", d.requests_reset_ms
        if limits.tokens_per_minute:
            d.tokens_minute_used = b.minute.used(now_ms)
            d.tokens_minute_reset_ms = b.minute.reset_ms(now_ms, limits.tokens_per_minute)
            if d.allowed and d.tokens_minute_used >= limits.tokens_per_minute:
                d.allowed, d.refused, d.retry_ms = False, "tokens_per_minute", d.tokens_minute_reset_ms
        if limits.tokens_per_day:
            d.tokens_day_used = b.day.used(now_ms)
            d.tokens_day_reset_ms = b.day.reset_ms(now_ms, limits.tokens_per_day)
            if d.allowed and d.tokens_day_used >= limits.tokens_per_day:
                d.allowed, d.refused, d.retry_ms = False, "tokens_per_day", d.tokens_day_reset_ms
        if limits.max_concurrent_streams and stream:
            for k in [k for k, exp in b.leases.items() if exp <= now_ms]:
                del b.leases[k]
            if d.allowed and len(b.leases) >= limits.max_concurrent_streams:
                d.allowed, d.refused, d.retry_ms = False, "max_concurrent_streams", CONCURRENCY_RETRY_MS
        if not d.allowed:
            return d
        if limits.requests_per_minute:
            b.requests.append(now_ms)
            d.requests_used += 1
            if len(b.requests) == 1:
                d.requests_reset_ms = MINUTE_MS
        if limits.max_concurrent_streams and stream:
            b.leases[lease] = now_ms + int(LEASE_TTL_S * 1000)
        return d

    async def finish(self, limits: RateLimits, now_ms: int, lease: str, stream: bool, tokens: int) -> None:
        b = self.buckets.get(limits.bucket)
        if b is None:
            return
        if tokens > 0:
            if limits.tokens_per_minute:
                b.minute.add(now_ms, tokens)
            if limits.tokens_per_day:
                b.day.add(now_ms, tokens)
        if stream:
            b.leases.pop(lease, None)

    async def aclose(self) -> None:
        self.buckets.clear()

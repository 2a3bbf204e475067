"""What the limiter and its stores share: the limits of one request, a store's answer, the store
protocol and the window constants. A leaf of `gateway.limits`: the stores import it, never the
package, so the package can pick a store without an import cycle."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

MINUTE_MS = 60_000
DAY_MS = 86_400_000
SUB_BUCKETS = 60  # a token window is kept in this many sub-buckets
LEASE_TTL_S = 600.0  # a stream slot a dead replica never released frees itself after this long
CONCURRENCY_RETRY_MS = 1000  # what a refused stream is told to wait: streams end at no known time
LIMIT_NAMES = ("requests_per_minute", "tokens_per_minute", "tokens_per_day", "max_concurrent_streams")


@dataclass(frozen=True, slots=True)
class RateLimits:
    """The limits of one request: 0 means no limit of that kind."""

    requests_per_minute: int = 0
    tokens_per_minute: int = 0
    tokens_per_day: int = 0
    max_concurrent_streams: int = 0
    bucket: str = ""  # whose counters: "key:<name>" or "key:<name>@route<i>"

    @property
    def any(self) -> bool:
        return bool(
            self.requests_per_minute or self.tokens_per_minute or self.tokens_per_day or self.max_concurrent_streams
        )

    @property
    def meters_tokens(self) -> bool:
        return bool(self.tokens_per_minute or self.tokens_per_day)


@dataclass(slots=True)
class Decision:
    """What the store answered for one request (used values are as of the check, this request included)."""

    allowed: bool
    refused: str = ""  # the LIMIT_NAMES entry that refused
    retry_ms: int = 0
    requests_used: int = 0
    requests_reset_ms: int = 0
    tokens_minute_used: int = 0
    tokens_minute_reset_ms: int = 0
    tokens_day_used: int = 0
    tokens_day_reset_ms: int = 0


class Store(Protocol):
    """Where the counters live: `MemoryStore` (one process) or `RedisStore` (shared by replicas)."""

    name: str

    async def acquire(self, limits: RateLimits, now_ms: int, lease: str, stream: bool) -> Decision:
        """Check every limit and, when all pass, record the request (and its stream lease) atomically."""
        ...

    async def finish(self, limits: RateLimits, now_ms: int, lease: str, stream: bool, tokens: int) -> None:
        """Charge `tokens` to the token windows and release the stream lease."""
        ...

    async def aclose(self) -> None: ...

"""Adapters between event streams and lists of events (the stream path's unit: one list, one write).

Each closes its source when it is closed, so a client that hangs up ends the chain at once.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator

from gateway.dialects.stream import StreamStats
from gateway.types import Event, TextDelta, ToolCallDelta

MODEL_WRITTEN = (TextDelta, ToolCallDelta)  # the events whose text the model wrote


async def batched(events: AsyncIterator[Event], stats: StreamStats) -> AsyncGenerator[list[Event], None]:
    """A local model's events, one list each (each is its own write: a local model is slower than that)."""
    try:
        async for ev in events:
            stats.events_in += 1
            if stats.first_in is None and isinstance(ev, MODEL_WRITTEN):
                stats.first_in = time.perf_counter()
            yield [ev]
    finally:
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            await aclose()


async def flat(batches: AsyncGenerator[list[Event], None]) -> AsyncGenerator[Event, None]:
    try:
        async for batch in batches:
            for ev in batch:
                yield ev
    finally:
        await batches.aclose()


async def rebatched(events: AsyncIterator[Event]) -> AsyncGenerator[list[Event], None]:
    try:
        async for ev in events:
            yield [ev]
    finally:
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            await aclose()

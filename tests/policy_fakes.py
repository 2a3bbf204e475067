"""Small deterministic guards and a scripted neutral upstream for the policy tests.

The guards register under `t_*` names (never shipped): one that raises, one that sleeps, a
phrase detector with a configurable delay, and one that holds text from an open code fence.
Every StreamCheck they open is tracked so tests can assert that `close()` was called.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

from gateway.guards.base import Guard, GuardInput, StreamCheck, register
from gateway.policy.tokens import encoding
from gateway.types import (
    Event,
    Finish,
    Message,
    StreamStart,
    TextDelta,
    ToolCallDelta,
    Usage,
    UsageEvent,
    Verdict,
)

OPENED: list[TrackedCheck] = []


class TrackedCheck(StreamCheck):
    closed = False

    def __init__(self, guard: Guard, messages: list[Message], request_id: str) -> None:
        super().__init__(guard, messages, request_id)
        OPENED.append(self)

    async def close(self) -> None:
        self.closed = True


class _Tracked(Guard):
    def open_stream(self, messages: list[Message], request_id: str) -> StreamCheck:
        return TrackedCheck(self, messages, request_id)


@register("t_raise")
class RaiseGuard(_Tracked):
    name: ClassVar[str] = "t_raise"

    async def check(self, inp: GuardInput) -> Verdict:
        raise RuntimeError("guard exploded")


@register("t_sleep")
class SleepGuard(_Tracked):
    """Passes after `seconds` (default 10: past any test timeout)."""

    name: ClassVar[str] = "t_sleep"

    async def check(self, inp: GuardInput) -> Verdict:
        t0 = time.perf_counter()
        await asyncio.sleep(float(self.options.get("seconds", 10)))
        return self.verdict(t0)


@register("t_phrase")
class PhraseGuard(_Tracked):
    """Flags `phrase` anywhere in the text (span = first occurrence), after `delay` seconds."""

    name: ClassVar[str] = "t_phrase"

    def __init__(self, phrase: str = "forbidden", delay: float = 0.0, **options: Any) -> None:
        super().__init__(phrase=phrase, delay=delay, **options)
        self.phrase, self.delay = phrase, float(delay)
        self.windows: list[tuple[int, int, bool]] = []
        self.answered = 0  # checks that got past their delay

    async def check(self, inp: GuardInput) -> Verdict:
        t0 = time.perf_counter()
        self.windows.append((inp.window_start, len(inp.text), inp.final))
        if self.delay:
            await asyncio.sleep(self.delay)
        self.answered += 1
        text = inp.text if inp.stage != "input" else "\n".join(m.text for m in inp.messages)
        i = text.find(self.phrase)
        if i < 0:
            return self.verdict(t0, score=0.0)
        return self.verdict(t0, flagged=True, score=0.99, categories=["S1"], span=(i, i + len(self.phrase)),
                            reason="phrase")


@register("t_fence")
class FenceGuard(_Tracked):
    """Never flags; asks the gate to hold everything from an unclosed ``` fence on."""

    name: ClassVar[str] = "t_fence"

    async def check(self, inp: GuardInput) -> Verdict:
        t0 = time.perf_counter()
        hold = None
        if inp.text.count("```") % 2 == 1:
            hold = inp.text.rfind("```")
        return self.verdict(t0, hold_from=hold)


def tokens_of(text: str) -> list[str]:
    """`text` split into one string per cl100k token, the way a model streams it."""
    enc = encoding()
    return [enc.decode([t]) for t in enc.encode_ordinary(text)]


@dataclass
class FakeUpstream:
    """A neutral upstream: StreamStart, the deltas, Finish, UsageEvent; records how it ended."""

    deltas: list[Event | str]
    delay: float = 0.0
    finish: str = "stop"
    usage: Usage | None = field(default_factory=lambda: Usage(10, 99, 109))
    produced: int = 0  # events yielded so far
    closed: bool = False  # the generator's finally ran
    exhausted: bool = False  # it ran to the end
    fail_after: int | None = None  # raise after this many deltas

    async def events(self) -> AsyncIterator[Event]:
        try:
            yield StreamStart(id="chatcmpl-test", model="m")
            for i, d in enumerate(self.deltas):
                if self.fail_after is not None and i >= self.fail_after:
                    raise ConnectionError("upstream died")
                if self.delay:
                    await asyncio.sleep(self.delay)
                self.produced += 1
                yield TextDelta(d) if isinstance(d, str) else d
            yield Finish(self.finish)
            if self.usage is not None:
                yield UsageEvent(self.usage)
            self.exhausted = True
        finally:
            self.closed = True


def text_of(events: list[Event], index: int = 0) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta) and e.index == index)


def args_of(events: list[Event]) -> str:
    return "".join(e.arguments for e in events if isinstance(e, ToolCallDelta))


async def collect(agen: AsyncIterator[Event]) -> list[Event]:
    return [ev async for ev in agen]

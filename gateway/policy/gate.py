"""The stream gate: a hold-back buffer and a guard scheduler between the upstream and the client.

Neutral events in, neutral events out (the client's dialect renders them). Per choice, the text
deltas and the tool-call arguments form one *guarded text* (a tool call is introduced by a short
separator such as ``[tool_call get_weather]`` that guards see and the client does not). Every
`check_every_tokens` new tokens (cl100k), each stream step checks the window not yet checked,
in a background task, one check at a time per step; at the end of the choice a last check runs
with `final=True`.

With `check_every_tokens: auto` (0 here) the window is sized per check from the step's measured
check latency and the choice's token rate so that, in strict mode, no token waits longer than
`max_stall_ms` for its verdict where that is possible, with as few checks as that allows (`_window`).

Release rule (enforce mode): text is released up to `max_unchecked_tokens` tokens past the offset
every step has passed (0 = only text every step has passed), never past a step's `hold_from`
(e.g. an open code block), and never once a step blocked. So with 0 nothing reaches the client
unchecked, and with N > 0 at most N tokens run ahead of the verdicts: that is the leak bound, and
`leaked_tokens` measures what actually got out.

Actions when a step flags (or fails, with `on_error: block`):
  block   stop: cancel the upstream and the other checks, emit the Annotation, then a
          Finish(content_filter) for every choice and a UsageEvent (upstream's if it came, else
          our count), then end.
  redact  replace `Verdict.span` (all of `details["spans"]` when given; the window without a span)
          with the step's notice, where it is not released yet; continue.
  warn    continue; the annotation says so.  log: record only.
Shadow mode runs every check but releases everything at once and changes nothing.

Finish events are held until the choice's final checks are done, so the Annotation can go just
before them; StreamStart goes out at once. `StreamCheck.close()` is called for every check that
was opened, whether the stream ends, is blocked, or is closed by the client (generator aclose).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import math
import time
from collections.abc import AsyncGenerator, AsyncIterable, Callable, Sequence
from functools import partial
from typing import Any, cast

from gateway.guards.base import GuardInput, StreamCheck
from gateway.policy.choice import ChoiceText, StepState
from gateway.policy.record import StepRecord, merge_verdict
from gateway.policy.schema import Step, run_step, run_step_now
from gateway.policy.summary import GateResult, estimate_usage, fill_result
from gateway.types import (
    Annotation,
    Event,
    Finish,
    Message,
    StreamStart,
    TextDelta,
    ToolCall,
    ToolCallDelta,
    Usage,
    UsageEvent,
    Verdict,
    coalesced,
)

log = logging.getLogger("guardgate.gate")

_EV, _END, _ERR, _CHECK = range(4)
# check_every_tokens: auto. The first window (smaller on a slow stream); the bounds.
AUTO_FIRST, AUTO_MIN, AUTO_MAX = 16, 4, 1024


class OneShotCheck(StreamCheck):
    """A non-stream answer: one `guard.check` on the whole text (stage "output")."""

    def _input(self, text: str, window_start: int, final: bool) -> GuardInput:
        return GuardInput(stage="output", messages=self.messages, text=text, request_id=self.request_id,
                          tool_calls=list(self.calls))


class StreamGate:
    """Guards one stream. Build one per request and iterate `batches(upstream)` (or `run`) once."""

    def __init__(self, steps: Sequence[Step], records: dict[Step, StepRecord], *, messages: list[Message],
                 request_id: str = "", check_every_tokens: int = 32, max_unchecked_tokens: int = 0,
                 max_stall_ms: float = 500.0, shadow: bool = False, one_shot: bool = False,
                 annotate: Callable[[GateResult], dict[str, Any] | None] | None = None,
                 read_ahead: int = 64) -> None:
        self.steps = list(steps)
        self.records = records
        self.messages = messages
        self.request_id = request_id
        self.auto = not one_shot and check_every_tokens == 0  # check_every_tokens: auto
        self.every = math.inf if one_shot else max(1, check_every_tokens)
        self.max_stall = max_stall_ms / 1000.0
        self.max_unchecked = 0 if one_shot else max(0, max_unchecked_tokens)
        self.shadow = shadow
        self.one_shot = one_shot
        self.annotate = annotate
        self.read_ahead = read_ahead
        self.summary = GateResult()  # public, filled as the gate runs (the chain reads its actions)
        self._choices: dict[int, ChoiceText] = {}
        self._usage: UsageEvent | None = None
        self._trailers: list[Event] = []
        self._now: list[Event] = []  # events to release at the next drain, ahead of any text
        self._upstream: AsyncIterable[list[Event]] | None = None
        self._reader: asyncio.Task[None] | None = None
        # `_tasked` only: what the reader and the checks report, and the read-ahead bound, in
        # events (not lists: one network read may bring thousands), so a client that stops reading
        # holds the upstream back within about `read_ahead` events.
        self._q: asyncio.Queue[tuple[int, Any]]
        self._queued = 0
        self._room: asyncio.Event
        self._upstream_done = False
        self._error: BaseException | None = None
        self._block: tuple[ChoiceText, StepState, Verdict] | None = None
        self._started = False
        self._singles = False  # `run`: the upstream yields events, not lists
        # Every step immediate (regex, pii, ...): checks run inline and the gate reads the upstream
        # itself, with no reader task and no queue: an event goes out in the same turn it came in.
        self.direct = all(s.immediate for s in self.steps)

    # ------------------------------------------------------------------ public

    async def run(self, upstream: AsyncIterable[Event]) -> AsyncGenerator[Event, None]:
        """The guarded stream, event by event (`batches`, the upstream read one event at a time)."""
        self._singles = True
        batches = self.batches(cast("AsyncIterable[list[Event]]", upstream))  # `_read` wraps each event
        try:
            async for batch in batches:
                for ev in batch:
                    yield ev
        finally:
            await batches.aclose()

    async def batches(self, upstream: AsyncIterable[list[Event]]) -> AsyncGenerator[list[Event], None]:
        """The guarded stream: upstream events in lists (those that arrived together), and each
        release out as one list (what the client gets in one write). Closing it (aclose) cancels
        the upstream and every check."""
        if self._started:
            raise RuntimeError("a StreamGate runs once")
        self._started = True
        self._upstream = upstream
        releases = self._direct(upstream) if self.direct else self._tasked(upstream)
        try:
            async with contextlib.aclosing(releases):
                async for out in releases:
                    yield out
            if self._block is None:
                out = self._end_out()
                if out:
                    yield out
        finally:
            await self._cleanup()

    async def _direct(self, upstream: AsyncIterable[list[Event]]) -> AsyncGenerator[list[Event], None]:
        """When every check runs inline: read, check, release, in one loop."""
        it = aiter(upstream)
        while True:
            try:
                batch = await anext(it)
            except StopAsyncIteration:
                self._handle((_END, None))
            except Exception as e:
                self._upstream_done = True
                self.summary.error = f"upstream: {type(e).__name__}: {e}"
                raise
            else:
                self._on_batch([cast("Event", batch)] if self._singles else batch)
            self._schedule()
            if self._block is not None:
                yield await self._block_out()
                return
            if self._upstream_done:
                return
            out = self._drain()
            if out:
                yield out

    async def _tasked(self, upstream: AsyncIterable[list[Event]]) -> AsyncGenerator[list[Event], None]:
        """With checks that wait (a model, a remote service): a reader task feeds a queue, check tasks
        report to it, and the loop releases what their verdicts allow."""
        self._q = asyncio.Queue()
        self._room = asyncio.Event()
        self._room.set()
        if self.one_shot:  # a whole answer: read at once, no reader task
            async for batch in upstream:
                self._on_batch(batch)
            self._handle((_END, None))
            self._schedule()
            out = self._drain()  # nothing else arrives unless a check is in flight: release now
            if out:
                yield out
        else:
            self._reader = asyncio.create_task(self._read(upstream))
        while not self._done():
            self._handle(await self._q.get())
            while not self._q.empty() and self._block is None:
                self._handle(self._q.get_nowait())
            if self._block is not None:
                yield await self._block_out()
                return
            if self._error is not None:
                self.summary.error = f"upstream: {type(self._error).__name__}: {self._error}"
                raise self._error
            self._schedule()
            out = self._drain()
            if out:
                yield out

    def result(self) -> GateResult:
        """The summary so far, with the leak and release counts computed from what was emitted."""
        return fill_result(self.summary, self._choices.values())

    # ------------------------------------------------------------------ reading

    async def _read(self, upstream: AsyncIterable[list[Event]]) -> None:
        singles = self._singles
        try:
            n = self.read_ahead
            async for batch in upstream:
                items = [batch] if singles else batch
                # a large read goes in slices: checks are scheduled (windows) at most every `n` events
                for i in range(0, len(items), n):
                    if self._queued >= n:
                        self._room.clear()
                        await self._room.wait()
                    item = items if len(items) <= n else items[i:i + n]
                    self._queued += len(item)
                    self._q.put_nowait((_EV, item))
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self._q.put_nowait((_ERR, e))
            return
        self._q.put_nowait((_END, None))

    def _handle(self, item: tuple[int, Any]) -> None:
        kind, payload = item
        if kind == _EV:
            self._queued -= len(payload)
            if self._queued < self.read_ahead:
                self._room.set()
            self._on_batch(payload)
        elif kind == _CHECK:
            self._on_check(*payload)
        elif kind == _END:
            self._upstream_done = True
            for c in self._choices.values():
                c.ended = True
        else:
            self._upstream_done = True
            self._error = payload

    def _choice(self, index: int) -> ChoiceText:
        c = self._choices.get(index)
        if c is None:
            c = self._choices[index] = ChoiceText(index)
            c.steps = [StepState(s, self.records[s]) for s in self.steps]
        return c

    def _after_finish(self, c: ChoiceText, ev: TextDelta | ToolCallDelta | Finish) -> bool:
        """True (and recorded) when `ev` comes for a choice that already finished: it is ignored.
        A choice's answer ends at its finish; anything after it would skip the final checks."""
        if c.finish is None:
            return False
        n = len(ev.text) if isinstance(ev, TextDelta) else \
            len(ev.arguments) + len(ev.name or "") if isinstance(ev, ToolCallDelta) else 0
        if n:
            r = self.summary
            if c.index not in r.after_finish:
                log.warning("request %s: upstream sent text for choice %d after its finish; ignored",
                            self.request_id, c.index)
            r.after_finish[c.index] = r.after_finish.get(c.index, 0) + n
        return True

    def _on_batch(self, batch: list[Event]) -> None:
        for ev in coalesced(batch) if len(batch) > 2 else batch:
            self._on_event(ev)

    def _on_event(self, ev: Event) -> None:
        if isinstance(ev, TextDelta):
            c = self._choice(ev.index)
            if c.blocked or self._after_finish(c, ev):
                return
            if c.open_call is not None or c.channel != ev.channel:
                c.open_call = None
                c.close_call()
                label = "" if ev.channel == "text" else f"[{ev.channel}] "
                sep = ("\n" if c.length else "") + label
                if sep:
                    c.append(sep, "sep")
                c.channel = ev.channel
            if ev.text:
                c.append(ev.text, "text", channel=ev.channel)
        elif isinstance(ev, ToolCallDelta):
            c = self._choice(ev.index)
            if c.blocked or self._after_finish(c, ev):
                return
            if ev.call_index != c.open_call:
                c.open_call = ev.call_index
                c.close_call()
                c.calls.append([c.length, None])
                c.channel = None
                label = f"[tool_call {ev.name}] " if ev.name else "[tool_call] "
                if ev.id:  # the upstream wrote the id too: guards see it (it reaches the client)
                    label = f"[id {ev.id}] {label}"
                c.append(("\n" if c.length else "") + label, "header", ev.call_index, ev.id, ev.name)
                c.call_meta.append((ev.id, ev.name, c.length))
            if ev.arguments:
                c.append(ev.arguments, "args", ev.call_index)
        elif isinstance(ev, Finish):
            c = self._choice(ev.index)
            if c.blocked or self._after_finish(c, ev):
                return  # a second finish: the first one stands
            c.finish = ev
            c.ended = True
            c.close_call()
        elif isinstance(ev, StreamStart):
            self._now.append(ev)  # the identity every chunk needs: out at once
        elif isinstance(ev, UsageEvent):
            self._usage = ev
        else:
            self._trailers.append(ev)

    # ------------------------------------------------------------------ checking

    def _schedule(self) -> None:
        for c in self._choices.values():
            for st in c.steps:
                if self._block is not None:
                    return
                if st.task is not None or st.final_done:
                    continue
                if c.ended:
                    # a call completed by the finish adds no text, yet its step must see it whole
                    if (c.length > st.checked_to or st.hold_from is not None or st.ran == 0
                            or st.calls_seen < len(c.calls)):
                        self._start(c, st, final=True)
                    else:
                        st.final_done = True
                elif c.has_tokens(st.checked_to, self._window(c, st)):
                    self._start(c, st, final=False)

    def _window(self, c: ChoiceText, st: StepState) -> float:
        """Tokens per check: fixed, or (auto) as many as the stall target allows.

        In strict mode the oldest token of a window of W tokens waits for the window to fill
        (W / rate) and then for its check (L(W)): the fewest checks that keep this under
        `max_stall_ms` use the largest W with W / rate + L(W) <= max_stall. A check's latency grows
        with its window (an incremental guard evaluates the new tokens), so L(W) is taken as W x the
        latency per window token of the step's recent checks (the slowest of the last 8: a tail,
        not a mean), which gives W = max_stall / (1 / rate + that cost). Its fixed part makes this
        overstate larger windows, so windows grow check by check toward the target from below.
        """
        if not self.auto:
            return self.every
        rate = c.token_rate(time.monotonic())
        if rate is None:
            return AUTO_FIRST
        if not st.cost_per_token:  # no check measured yet: let filling take half the target at most
            return min(AUTO_FIRST, max(AUTO_MIN, self.max_stall * rate / 2))
        w = self.max_stall / (1.0 / rate + max(st.cost_per_token))
        return min(max(w, AUTO_MIN), AUTO_MAX)

    def _start(self, c: ChoiceText, st: StepState, final: bool) -> None:
        text = c.text()
        st.args = (st.checked_to, len(text), final)
        st.ran += 1
        st.started = time.monotonic()
        calls = c.complete_calls() if c.calls else []
        st.calls_pending = len(calls)
        if st.step.immediate:
            self._apply(c, st, run_step_now(st.step, lambda: self._checker(st, calls).check_now(
                text, st.checked_to, final)))
            return
        st.task = asyncio.create_task(self._check(st, text, st.checked_to, final, calls))
        st.task.add_done_callback(partial(self._check_done, c, st))

    def _check_done(self, c: ChoiceText, st: StepState, task: asyncio.Task[Verdict]) -> None:
        self._q.put_nowait((_CHECK, (c, st, task)))

    def _open(self, step: Step) -> StreamCheck:
        if self.one_shot and "output" in step.guard.stages:
            return OneShotCheck(step.guard, self.messages, self.request_id)
        return step.guard.open_stream(self.messages, self.request_id)

    def _checker(self, st: StepState, calls: list[ToolCall]) -> StreamCheck:
        if st.checker is None:
            st.checker = self._open(st.step)
        st.checker.calls = calls
        return st.checker

    async def _check(self, st: StepState, text: str, window_start: int, final: bool,
                     calls: list[ToolCall]) -> Verdict:
        return await run_step(st.step, lambda: self._checker(st, calls).check(text, window_start, final))

    def _on_check(self, c: ChoiceText, st: StepState, task: asyncio.Task[Verdict]) -> None:
        if st.task is not task:
            return
        st.task = None
        if not task.cancelled():
            self._apply(c, st, task.result())

    def _apply(self, c: ChoiceText, st: StepState, v: Verdict) -> None:
        """A step's verdict on its window: block, redact, hold, or let the window go."""
        window_start, end, final = st.args
        if self.auto:  # the auto window sizes itself from the cost per token
            st.cost_per_token.append((time.monotonic() - st.started) / max(1, c.tokens_between(window_start, end)))
        st.calls_seen = max(st.calls_seen, st.calls_pending)
        self.summary.checks += 1
        eff = merge_verdict(st.rec, st.step, v, self.summary, self.shadow)
        if eff == "block":
            start = window_start if v.span is None else min(window_start, max(0, v.span[0]))
            if c.flag_start is None:
                c.flag_start = start
            if not self.shadow:
                if self.one_shot:  # a non-stream answer: only this choice is blocked
                    self._block_choice(c, st)
                else:
                    self._block = (c, st, v)
                return
        elif eff == "redact":
            spans = v.details.get("spans") if isinstance(v.details, dict) else None
            targets = [tuple(s) for s in spans] if spans else [v.span] if v.span else [(window_start, end)]
            # A guard may name each span's replacement (pii: `<EMAIL>`); else the step's notice.
            reps = v.details.get("replacements") if spans and isinstance(v.details, dict) else None
            for k, (a, b) in enumerate(targets):
                notice = reps[k] if isinstance(reps, list) and k < len(reps) else st.step.notice
                if c.redact(max(0, int(a)), min(end, int(b)), str(notice), self.shadow):
                    self.summary.redactions += 1
        st.checked_to = max(st.checked_to, end)
        hold = v.hold_from if (not final and v.error is None) else None
        st.hold_from = hold if hold is None else max(0, min(int(hold), end))
        if final:
            st.final_done = True

    def _block_choice(self, c: ChoiceText, st: StepState) -> None:
        """One-shot block of one choice: nothing of it is released, it finishes `content_filter`,
        its other checks are cancelled; the other choices of the answer are judged on their own."""
        self.summary.blocked = True
        if self.summary.block_step is None:
            self.summary.block_step = st.step.label
        c.blocked = True
        c.pieces.clear()
        c.finish = Finish("content_filter", c.index)
        c.ended = True
        for other in c.steps:
            if other.task is not None and not other.task.done():
                other.task.cancel()
                other.rec.cancelled += 1
            other.task = None
            other.final_done = True

    # ------------------------------------------------------------------ releasing

    def _limit(self, c: ChoiceText) -> int:
        if self.shadow or not c.steps or all(st.final_done for st in c.steps):
            return c.length
        checked = min(st.checked_to for st in c.steps)
        if self.max_unchecked:
            starts = c.tokenize()
            i = bisect.bisect_left(starts, checked) + self.max_unchecked
            limit = starts[i] if i < len(starts) else c.length
        else:
            limit = checked
        for st in c.steps:
            if st.hold_from is not None:
                limit = min(limit, st.hold_from)
            if st.calls_seen < len(c.calls) and not st.final_done:
                # a call this step has not yet been handed whole (its finish came after the last check)
                start = c.calls[st.calls_seen][0]
                assert start is not None
                limit = min(limit, start)
        for start, end in c.calls:  # never part of a call: back to its header
            assert start is not None
            if start < limit and (end is None or limit < end):
                limit = start
                break
        return max(limit, c.released)

    def _drain(self) -> list[Event]:
        out: list[Event] = self._now
        self._now = []
        for c in self._choices.values():
            limit = self._limit(c)
            while c.pieces and c.pieces[0].start < limit:
                p = c.pieces[0]
                if p.kind == "header":
                    if p.end > limit:
                        break
                    if p.id is not None or p.name is not None:
                        out.append(ToolCallDelta(call_index=p.call_index, id=p.id, name=p.name,
                                                 index=c.index))
                    c.emitted.append((p.start, p.end, "", False))
                    cut = p.end
                elif p.kind == "sep":
                    cut = min(p.end, limit)
                else:
                    cut = min(p.end, limit)
                    s, verbatim = c.client_text(p, p.start, cut)
                    if s:
                        out.append(TextDelta(s, c.index, p.channel) if p.kind == "text"
                                   else ToolCallDelta(call_index=p.call_index, arguments=s, index=c.index))
                    c.emitted.append((p.start, cut, s, verbatim))
                if cut >= p.end:
                    c.pieces.popleft()
                else:
                    p.text = p.text[cut - p.start:]
                    p.start = cut
                c.released = cut
        return coalesced(out) if len(out) > 2 else out

    def _done(self) -> bool:
        if not self._upstream_done:
            return False
        return all(not c.pieces and all(st.final_done and st.task is None for st in c.steps)
                   for c in self._choices.values())

    def _annotation(self) -> list[Event]:
        data = self.annotate(self.summary) if self.annotate is not None else None
        return [Annotation(data)] if data is not None else []

    def _end_out(self) -> list[Event]:
        out = self._drain() + self._annotation()
        out += [c.finish for _, c in sorted(self._choices.items()) if c.finish is not None]
        if self._usage is not None:
            out.append(self._usage)
        return out + self._trailers

    async def _block_out(self) -> list[Event]:
        assert self._block is not None
        _, st, _ = self._block
        self.summary.blocked = True
        self.summary.block_step = st.step.label
        await self._stop_upstream()
        self._cancel_checks()
        out = self._now + self._annotation()
        self._now = []
        out += [Finish("content_filter", i) for i in (sorted(self._choices) or [0])]
        out.append(self._usage or UsageEvent(self._estimate_usage()))
        return out

    def _estimate_usage(self) -> Usage:
        return estimate_usage(self.messages, self._choices.values())

    # ------------------------------------------------------------------ teardown

    async def _stop_upstream(self) -> None:
        if self._reader is not None and not self._reader.done():
            self._reader.cancel()
            await asyncio.wait([self._reader])
        aclose = getattr(self._upstream, "aclose", None)
        if aclose is not None:
            try:
                await aclose()
            except Exception:
                log.debug("closing the upstream stream", exc_info=True)

    def _cancel_checks(self) -> list[asyncio.Task[Verdict]]:
        tasks = []
        for c in self._choices.values():
            for st in c.steps:
                if st.task is not None and not st.task.done():
                    st.task.cancel()
                    st.rec.cancelled += 1
                    tasks.append(st.task)
                st.task = None
        return tasks

    async def _cleanup(self) -> None:
        # Each phase runs even if the one before it was cancelled (a client that vanishes can get
        # the request task cancelled again while it is already cleaning up): checks are always
        # cancelled and every StreamCheck is always closed; the cancellation is re-raised at the end.
        cancelled = False
        try:
            await self._stop_upstream()
        except asyncio.CancelledError:
            cancelled = True
        tasks = self._cancel_checks()
        if tasks:
            try:
                await asyncio.wait(tasks)
            except asyncio.CancelledError:
                cancelled = True
        for c in self._choices.values():
            for st in c.steps:
                if st.checker is not None:
                    checker, st.checker = st.checker, None
                    try:
                        await checker.close()
                    except asyncio.CancelledError:
                        cancelled = True
                    except Exception:
                        log.exception("closing the stream check of %s", st.step.label)
        if cancelled:
            raise asyncio.CancelledError

"""The Llama API stream codec (`LlamaStreamDecoder`, `LlamaStreamEncoder`) and what `llama_api.py` shares
with it (stop reasons, metrics, errors); `llama_api.py` re-exports these names, this module never imports it."""

from __future__ import annotations

from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from gateway.dialects import _common as _c
from gateway.dialects.base import DialectError, UpstreamStreamError
from gateway.dialects.stream import HOLES, StreamEncoder, Template, frame
from gateway.types import Finish, StreamStart, TextDelta, ToolCallDelta, Usage, UsageEvent, new_id

if TYPE_CHECKING:  # annotations only
    from gateway.types import Event, Exchange

STOP_REASONS = frozenset(("stop", "tool_calls", "length", "content_filter"))
_STOP_IN = {"end_of_turn": "stop", "end_of_message": "stop", "out_of_tokens": "length"}
METRIC_NAMES = ("num_completion_tokens", "num_prompt_tokens", "num_total_tokens")


def stop_reason_in(v: Any) -> str:
    if not isinstance(v, str) or not v:
        return "stop"
    return _STOP_IN.get(v, v)


def stop_reason_out(v: str) -> str:
    if v in STOP_REASONS:
        return v
    return "tool_calls" if v == "function_call" else "stop"


# Answer text channels the Llama API can carry: content, and a refusal as content (it has no refusal
# field). Reasoning and audio transcripts have no Llama counterpart and are dropped (never sent raw).
_TEXT_OUT = frozenset(("text", "refusal"))


def _usage_from_metrics(metrics: Any, r: _c.Reader, param: str) -> Usage | None:
    vals: dict[str, int] = {}
    for i, m in enumerate(r.list_(metrics, param)):
        m = r.obj(m, f"{param}[{i}]")
        name = m.get("metric")
        if name in METRIC_NAMES:
            vals[name] = r.count(m.get("value"), f"{param}[{i}].value")
    if not vals:
        return None
    prompt = vals.get("num_prompt_tokens", 0)
    completion = vals.get("num_completion_tokens", 0)
    return Usage(prompt, completion, vals.get("num_total_tokens", prompt + completion))


def _metrics(u: Usage) -> list[dict[str, Any]]:
    return [
        {"metric": "num_completion_tokens", "value": u.completion_tokens, "unit": "tokens"},
        {"metric": "num_prompt_tokens", "value": u.prompt_tokens, "unit": "tokens"},
        {"metric": "num_total_tokens", "value": u.total_tokens, "unit": "tokens"},
    ]


def error_body(status: int, message: str, *, type: str = "invalid_request_error", code: str | None = None,
               param: str | None = None) -> dict[str, Any]:
    """OpenAI-shaped `error` plus problem-JSON `title`/`detail` copies (§3.6)."""
    try:
        title = HTTPStatus(status).phrase
    except ValueError:
        title = "Error"
    return {**_c.error_body(status, message, type=type, code=code, param=param), "title": title, "detail": message}


# --------------------------------------------------------------------------- streams


class LlamaStreamDecoder:
    """Llama stream chunks → neutral events. Tool-call fragments carry no index: a fragment with a
    new `id` starts a call, a known `id` continues that call, no `id` continues the current one."""

    __slots__ = ("_call_ids", "_clean", "_cur", "_done", "_ncalls", "_started")

    def __init__(self) -> None:
        self._done = False
        self._clean = False
        self._started = False
        self._call_ids: dict[str, int] = {}
        self._ncalls = 0
        self._cur: int | None = None

    def done(self) -> bool:
        return self._done

    def ended_cleanly(self) -> bool:
        return self._clean

    def feed(self, event: str | None, data: str) -> list[Event]:
        try:
            obj = _c.loads(data)
        except (ValueError, RecursionError):
            if event == "error":
                raise UpstreamStreamError(data[:500] or "upstream error during streaming") from None
            raise UpstreamStreamError(
                "upstream sent a stream chunk that is not JSON", code="bad_upstream_response"
            ) from None
        if event == "error" or not isinstance(obj, dict) or not isinstance(obj.get("event"), dict):
            msg, code = _c.error_fields(obj)
            if event == "error" or msg:
                raise UpstreamStreamError(
                    msg or "upstream error during streaming", code=code or "upstream_error"
                )
            raise UpstreamStreamError(
                "upstream sent a stream chunk without an event object", code="bad_upstream_response"
            )
        try:
            return self._events(obj, obj["event"])
        except DialectError as e:
            raise UpstreamStreamError(
                f"upstream stream chunk: {e.message}", code="bad_upstream_response"
            ) from None

    def _events(self, obj: dict[str, Any], ev: dict[str, Any]) -> list[Event]:
        # Fast path, most events: progress with a text delta.
        if self._started and ev.get("event_type") == "progress" and len(ev) == 2:
            delta = ev.get("delta")
            if type(delta) is dict and delta.get("type") == "text":
                text = delta.get("text")
                if type(text) is str:
                    return [TextDelta(text)] if text else []
        r = _c.UP
        out: list[Event] = []
        if not self._started:
            self._started = True
            out.append(StreamStart(id=r.opt_str(obj.get("id"), "id") or new_id("chatcmpl-"), model=""))
        delta = ev.get("delta")
        if delta is not None:
            delta = r.obj(delta, "event.delta")
            typ = delta.get("type")
            if typ == "text":
                text = delta.get("text")
                if text:
                    out.append(TextDelta(r.str_(text, "event.delta.text")))
            elif typ == "tool_call":
                self._tool(delta, out)
        et = ev.get("event_type")
        if et == "complete":
            out.append(Finish(stop_reason_in(ev.get("stop_reason"))))
            self._clean = True
        if ev.get("metrics") is not None:
            usage = _usage_from_metrics(ev["metrics"], r, "event.metrics")
            if usage is not None:
                out.append(UsageEvent(usage))
        if et == "metrics":
            self._done = self._clean = True
        return out

    def _tool(self, delta: dict[str, Any], out: list[Event]) -> None:
        r = _c.UP
        cid = r.opt_str(delta.get("id"), "event.delta.id")
        fn = delta.get("function")
        fn = r.obj(fn, "event.delta.function") if fn is not None else {}
        args = _c.arguments_str(fn.get("arguments"), r, "event.delta.function.arguments")
        if cid is not None and cid in self._call_ids:
            k, first = self._call_ids[cid], False
        elif cid is not None or self._cur is None:
            k, first = self._ncalls, True
            self._ncalls += 1
            if cid is not None:
                self._call_ids[cid] = k
        else:
            k, first = self._cur, False
        self._cur = k
        if first:
            out.append(
                ToolCallDelta(k, args, id=cid, name=r.opt_str(fn.get("name"), "event.delta.function.name"))
            )
        elif args:
            out.append(ToolCallDelta(k, args))


_EMPTY = {"type": "text", "text": ""}


class LlamaStreamEncoder(StreamEncoder):
    """Neutral events → `data: {"id","event":{...}}\\n\\n` frames: start (on StreamStart), progress
    (text and tool-call deltas), complete (stop_reason), metrics (usage); no terminator.

    The complete event is held until the next event or `end()` so an `Annotation` can ride inside
    its `event` object as `"guardgate"`; usage that arrives before the finish is emitted after it,
    so the order is always start → progress* → complete → metrics.
    """

    def __init__(self, ex: Exchange) -> None:
        super().__init__(ex)
        self._id = ""
        self._usage: Usage | None = None  # usage seen before the finish
        self._call_ids: dict[int, str] = {}
        self._cur: int | None = None
        self._progress: Template | None = None  # the text progress event, serialized once

    def _event(self, event: dict[str, Any]) -> dict[str, Any]:
        return {"id": self._id, "event": event}

    def start(self, ev: StreamStart | None) -> None:
        self._id = ev.id if ev is not None else new_id("chatcmpl-")
        self._progress = Template(self._event({"event_type": "progress",
                                               "delta": {"type": "text", "text": HOLES[0]}}))
        self.emit(self._event({"event_type": "start", "delta": _EMPTY}))

    def text(self, ev: TextDelta) -> None:
        if ev.index or ev.channel not in _TEXT_OUT:
            return
        self.begin()
        assert self._progress is not None
        self.emit_text(self._progress.fill(_c.qstr(ev.text)))

    def tool(self, ev: ToolCallDelta) -> None:
        if ev.index:
            return
        self.begin()
        k = ev.call_index
        delta: dict[str, Any] = {"type": "tool_call"}
        if k not in self._call_ids:
            delta["id"] = self._call_ids[k] = ev.id or new_id("call_")
            delta["function"] = {"name": ev.name or "", "arguments": ev.arguments}
        elif k != self._cur:  # back to an earlier call: say which
            delta["id"] = self._call_ids[k]
            delta["function"] = {"arguments": ev.arguments}
        elif ev.arguments:
            delta["function"] = {"arguments": ev.arguments}
        else:
            self.flush()
            return
        self._cur = k
        self.emit(self._event({"event_type": "progress", "delta": delta}))

    def finish(self, ev: Finish) -> None:
        if ev.index:
            return
        self.begin()
        event = {"event_type": "complete", "delta": _EMPTY, "stop_reason": stop_reason_out(ev.reason)}
        self.hold(self._event(event), event)
        if self._usage is not None:
            self._metrics(self._usage)
            self._usage = None

    def _metrics(self, u: Usage) -> None:
        event = {"event_type": "metrics", "delta": _EMPTY, "metrics": _metrics(u)}
        self.hold(self._event(event), event)

    def usage(self, ev: UsageEvent) -> None:
        if self.holding:
            self._metrics(ev.usage)
        else:  # no finish yet: emit after it
            self._usage = ev.usage

    def close(self) -> None:
        if self._usage is not None:  # usage but never a finish
            self.begin()
            self._metrics(self._usage)
            self._usage = None

    def error_frame(self, message: str, code: str, type: str) -> str:
        """`event: error` + the error body: llama-api-client raises `APIError` (§4.3)."""
        return frame(error_body(400 if type == "invalid_request_error" else 502, message, type=type, code=code),
                     "error")

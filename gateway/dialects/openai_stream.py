"""The OpenAI chat stream codec (`OpenAIStreamDecoder`, `OpenAIStreamEncoder`) and the pieces `openai.py`
shares with it; `openai.py` re-exports these names, this module never imports it."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from gateway.dialects._common import BAD, UP, Reader, arguments_str, error_body, error_fields, loads, qstr
from gateway.dialects.base import DialectError, UpstreamStreamError
from gateway.dialects.stream import HOLES, StreamEncoder, Template, frame
from gateway.types import Finish, StreamStart, TextDelta, ToolCallDelta, Usage, UsageEvent, new_id

if TYPE_CHECKING:  # annotations only
    from gateway.types import Event, Exchange

NAME = "openai"
FINISH_REASONS = frozenset(("stop", "length", "tool_calls", "content_filter", "function_call"))
_REASONING_KEYS = ("reasoning_content", "reasoning")
# Stream delta key per text channel (a reasoning stream is written as reasoning_content, the name
# vLLM, llama.cpp and DeepSeek use; a `reasoning` delta is read as the same channel).
_DELTA_KEYS = {"text": "content", "refusal": "refusal", "reasoning": "reasoning_content"}
_DELTA_CHANNELS = (("content", "text"), ("refusal", "refusal"), ("reasoning_content", "reasoning"),
                   ("reasoning", "reasoning"))  # read: both reasoning names, `reasoning_content` first


def _usage_dict(u: Usage, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.total_tokens, **(extra or {})}


def decode_usage(u: Any, r: Reader) -> Usage:
    """`usage` (chat and completions, answers and stream chunks) → neutral usage (a missing total: the sum)."""
    u = r.obj(u, "usage")
    p = r.count(u.get("prompt_tokens"), "usage.prompt_tokens")
    c = r.count(u.get("completion_tokens"), "usage.completion_tokens")
    return Usage(p, c, p + c if u.get("total_tokens") is None else r.count(u["total_tokens"], "usage.total_tokens"))


def legacy_functions(ex: Exchange) -> bool:
    """The client asked with legacy `functions` (and no `tools`): calls go back as `function_call`."""
    ox = ex.extra.get(NAME) or {}
    return bool(ox.get("functions")) and not ex.params.get("tools") and not ox.get("tools_other")


class OpenAIStreamDecoder:
    """OpenAI chunks → neutral events. Role chunks, `obfuscation`, `logprobs`, `audio` and `annotations`
    are dropped; a chunk before the first one with choices or usage (Azure's prompt-filter chunk) is skipped."""

    __slots__ = ("_done", "_started", "_tools")

    def __init__(self) -> None:
        self._done = False
        self._started = False
        self._tools: set[tuple[int, int]] = set()

    def done(self) -> bool:
        return self._done

    def ended_cleanly(self) -> bool:
        return self._done

    def feed(self, event: str | None, data: str) -> list[Event]:
        if data.startswith("[DONE]"):
            self._done = True
            return []
        try:
            obj = loads(data)
        except (ValueError, RecursionError):
            raise UpstreamStreamError("upstream sent a stream chunk that is not JSON", code=BAD) from None
        if not isinstance(obj, dict):
            raise UpstreamStreamError("upstream sent a stream chunk that is not a JSON object", code=BAD)
        if obj.get("error"):
            msg, code = error_fields(obj)
            raise UpstreamStreamError(msg or "upstream error during streaming", code=code or "upstream_error")
        try:
            return self._events(obj)
        except DialectError as e:
            raise UpstreamStreamError(f"upstream stream chunk: {e.message}", code=BAD) from None

    def _events(self, obj: dict[str, Any]) -> list[Event]:
        choices = obj.get("choices")
        # Fast path, most chunks: one choice whose delta is just a content string.
        if self._started and type(choices) is list and len(choices) == 1 and not obj.get("usage"):
            ch = choices[0]
            if type(ch) is dict and ch.get("finish_reason") is None:
                delta = ch.get("delta")
                if type(delta) is dict and len(delta) == 1:
                    text = delta.get("content")
                    idx = ch.get("index", 0)
                    if type(text) is str and type(idx) is int:
                        return [TextDelta(text, idx)] if text else []
        r = UP
        out: list[Event] = []
        usage = obj.get("usage")
        if not self._started:
            if not choices and not usage:
                return out
            self._started = True
            created = obj.get("created")
            sx = {k: obj[k] for k in ("system_fingerprint", "service_tier") if obj.get(k) is not None}
            out.append(StreamStart(id=r.opt_str(obj.get("id"), "id") or new_id("chatcmpl-"),
                                   model=r.opt_str(obj.get("model"), "model") or "",
                                   created=r.int_(created, "created") if created is not None else int(time.time()),
                                   extra={NAME: sx} if sx else {}))
        if choices:
            for ch in r.list_(choices, "choices"):
                ch = r.obj(ch, "choices[]")
                idx = 0 if ch.get("index") is None else r.int_(ch["index"], "choices[].index")
                if ch.get("delta"):
                    delta = r.obj(ch["delta"], "choices[].delta")
                    for key, channel in _DELTA_CHANNELS:
                        text = delta.get(key)
                        if text and not (key == "reasoning" and delta.get("reasoning_content")):
                            out.append(TextDelta(r.str_(text, f"delta.{key}"), idx, channel))
                    if delta.get("tool_calls"):
                        self._tool_deltas(delta["tool_calls"], idx, out)
                    if delta.get("function_call"):
                        self._function_call(delta["function_call"], idx, out)
                if ch.get("finish_reason"):
                    out.append(Finish(r.str_(ch["finish_reason"], "finish_reason"), idx))
        if usage:
            out.append(UsageEvent(decode_usage(usage, r)))
        return out

    def _function_call(self, fc: Any, idx: int, out: list[Event]) -> None:
        """A legacy `function_call` fragment: call 0 of the choice (the legacy API has one call)."""
        r = UP
        fc = r.obj(fc, "delta.function_call")
        args = arguments_str(fc.get("arguments"), r, "delta.function_call.arguments")
        key = (idx, -1)
        if key not in self._tools:
            self._tools.add(key)
            out.append(ToolCallDelta(0, args, id="", name=r.opt_str(fc.get("name"), "function_call.name") or "",
                                     index=idx))
        elif args:
            out.append(ToolCallDelta(0, args, index=idx))

    def _tool_deltas(self, tcs: Any, idx: int, out: list[Event]) -> None:
        r = UP
        for pos, tc in enumerate(r.list_(tcs, "delta.tool_calls")):
            tc = r.obj(tc, "delta.tool_calls[]")
            k = pos if tc.get("index") is None else r.int_(tc["index"], "tool_calls[].index")
            fn = {} if tc.get("function") is None else r.obj(tc["function"], "tool_calls[].function")
            args = arguments_str(fn.get("arguments"), r, "tool_calls[].function.arguments")
            key = (idx, k)
            if key not in self._tools:
                self._tools.add(key)
                out.append(ToolCallDelta(k, args, id=r.opt_str(tc.get("id"), "tool_calls[].id"),
                                         name=r.opt_str(fn.get("name"), "tool_calls[].function.name"), index=idx))
            elif args:
                out.append(ToolCallDelta(k, args, index=idx))


class OpenAIStreamEncoder(StreamEncoder):
    """Neutral events → `data: <chunk>\\n\\n` frames, then `data: [DONE]\\n\\n`.

    Every chunk has the same id/created/model; each choice opens with
    `delta:{"role":"assistant","content":"","refusal":null}`; a finish is `delta:{}` with its
    reason; with include_usage every chunk has `"usage":null` and a usage chunk with `choices:[]`
    follows, else usage is dropped. The last finish/usage chunk is held until the next event or
    `end()`, so an `Annotation` can ride on it as a top-level `"guardgate"` object.
    """

    END = "data: [DONE]\n\n"

    def __init__(self, ex: Exchange) -> None:
        super().__init__(ex)
        self._legacy = legacy_functions(ex)
        self._with_usage = ex.include_usage
        self._opened: set[int] = set()
        self._tools: set[tuple[int, int]] = set()
        self._head: dict[str, Any] = {}
        self._texts: dict[tuple[int, str], Template] = {}  # per (choice, delta key): its text chunk

    def _new(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        d = {**self._head, "choices": choices}
        if self._with_usage:
            d["usage"] = None
        return d

    def _choice(self, index: int, delta: dict[str, Any]) -> dict[str, Any]:
        return self._new([{"index": index, "delta": delta, "logprobs": None, "finish_reason": None}])

    def start(self, ev: StreamStart | None) -> None:
        s = ev or StreamStart(id=new_id("chatcmpl-"), model=self.ex.model)
        self._head = {"id": s.id, "object": "chat.completion.chunk", "created": int(s.created),
                      "model": s.model or self.ex.model, **(s.extra.get(NAME) or {})}
        if ev is not None:  # the upstream's start opens choice 0 at once
            self._delta(0, {})

    def _delta(self, index: int, delta: dict[str, Any]) -> None:
        self.begin()
        if index not in self._opened:
            self._opened.add(index)
            self.emit(self._choice(index, {"role": "assistant", "content": "", "refusal": None}))
        if delta:
            self.emit(self._choice(index, delta))

    def text(self, ev: TextDelta) -> None:
        key = _DELTA_KEYS.get(ev.channel)
        if key is None:  # transcript (audio is not streamed) or a one-shot Attached text
            self.flush()
            return
        tpl = self._texts.get((ev.index, key))
        if tpl is None or ev.index not in self._opened:
            self._delta(ev.index, {})
            tpl = self._texts[(ev.index, key)] = Template(self._choice(ev.index, {key: HOLES[0]}))
        self.emit_text(tpl.fill(qstr(ev.text)))

    def tool(self, ev: ToolCallDelta) -> None:
        key = (ev.index, ev.call_index)
        legacy = self._legacy and ev.call_index == 0  # the client sent `functions`: legacy deltas
        if key not in self._tools:
            self._tools.add(key)
            fn: dict[str, Any] = {"name": ev.name or "", "arguments": ev.arguments}
            call = fn if legacy else {"index": ev.call_index, "id": ev.id or new_id("call_"), "type": "function",
                                      "function": fn}
        elif ev.arguments:
            fn = {"arguments": ev.arguments}
            call = fn if legacy else {"index": ev.call_index, "function": fn}
        else:
            return
        self._delta(ev.index, {"function_call": call} if legacy else {"tool_calls": [call]})

    def finish(self, ev: Finish) -> None:
        self._delta(ev.index, {})
        fr = ev.reason if ev.reason in FINISH_REASONS else "stop"
        self.hold(self._new([{"index": ev.index, "delta": {}, "logprobs": None, "finish_reason": fr}]))

    def usage(self, ev: UsageEvent) -> None:
        if self._with_usage:
            self.begin()
            self.hold({**self._head, "choices": [], "usage": _usage_dict(ev.usage)})

    def error_frame(self, message: str, code: str, type: str) -> str:
        return frame(error_body(0, message, type=type, code=code))

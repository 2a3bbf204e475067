"""The Meta Llama API native dialect (`/llama/v1`, SDK `llama-api-client`): wire_formats.md §3, §4.3.
What is carried, mapped, dropped and refused, field by field: docs/dialects.md."""

from __future__ import annotations

import time
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from gateway.dialects import _common as _c
from gateway.dialects._common import decode_error as decode_error
from gateway.dialects._common import decode_models as decode_models
from gateway.dialects._common import encode_models as encode_models
from gateway.dialects.base import DialectError, ModerationRequest, ModerationResult, UpstreamStreamError
from gateway.dialects.media import encode_llama_part, llama_media_part, text_only
from gateway.dialects.stream import HOLES, StreamEncoder, Template, frame
from gateway.types import Completion, Finish, Message, StreamStart, TextDelta, ToolCallDelta, Usage, UsageEvent, new_id

if TYPE_CHECKING:  # annotations only
    from gateway.types import Event, Exchange

NAME = "llama"
name = NAME  # the module itself is the `Dialect` (see gateway/dialects/__init__.py)
STOP_REASONS = frozenset(("stop", "tool_calls", "length", "content_filter"))
_STOP_IN = {"end_of_turn": "stop", "end_of_message": "stop", "out_of_tokens": "length"}
METRIC_NAMES = ("num_completion_tokens", "num_prompt_tokens", "num_total_tokens")


def stop_reason_in(v: Any) -> str:
    return _STOP_IN.get(v, v) if isinstance(v, str) and v else "stop"


def stop_reason_out(v: str) -> str:
    return v if v in STOP_REASONS else "tool_calls" if v == "function_call" else "stop"


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
    prompt, completion = vals.get("num_prompt_tokens", 0), vals.get("num_completion_tokens", 0)
    return Usage(prompt, completion, vals.get("num_total_tokens", prompt + completion))


def _metrics(u: Usage) -> list[dict[str, Any]]:
    return [{"metric": name, "value": v, "unit": "tokens"}
            for name, v in zip(METRIC_NAMES, (u.completion_tokens, u.prompt_tokens, u.total_tokens), strict=True)]


def error_body(status: int, message: str, *, type: str = "invalid_request_error", code: str | None = None,
               param: str | None = None) -> dict[str, Any]:
    """OpenAI-shaped `error` plus problem-JSON `title`/`detail` copies (§3.6)."""
    try:
        title = HTTPStatus(status).phrase
    except ValueError:
        title = "Error"
    return {**_c.error_body(status, message, type=type, code=code, param=param), "title": title, "detail": message}


_KNOWN_REQ = frozenset(("model", "messages", "stream", "max_completion_tokens", "repetition_penalty", "response_format",
                        "temperature", "tool_choice", "tools", "top_k", "top_p", "user"))
MESSAGES = _c.MessageRules(
    roles={"system": "system", "user": "user", "assistant": "assistant", "tool": "tool"}, texts={"text": "text"},
    image_roles=frozenset(("user",)), media=llama_media_part,  # image_url (dialects/media.py)
    object_content=True, stop_reason=True)  # an assistant's content is one object, with its stop reason


def decode_payload(obj: dict[str, Any]) -> Exchange:
    """A request already parsed as a JSON object (the router parses each body once) → the exchange."""
    r = _c.REQ
    ex, extra = _c.decode_chat(obj, MESSAGES, ("temperature", "top_p", "repetition_penalty"), ("top_k",))
    ex.include_usage = ex.stream
    if obj.get("max_completion_tokens") is not None:
        ex.params["max_tokens"] = r.int_(obj["max_completion_tokens"], "max_completion_tokens")
    if obj.get("tools") is not None:
        ex.params["tools"], other = _c.decode_tool_defs(obj["tools"], r, "tools")
        if other:
            extra["tools"] = obj["tools"]
    return _c.keep_extra(ex, NAME, extra, obj, _KNOWN_REQ)


decode_request = _c.request_decoder(decode_payload)


def encode_messages(messages: list[Message]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for m in messages:
        role = "system" if m.role == "developer" else m.role
        d: dict[str, Any] = {"role": role}
        if role != "user":
            text_only(m.parts, role, "Llama API")
        if role != "assistant":  # a string, or text and (user messages only) image items
            parts = m.parts if role == "user" else [p for p in m.parts if p.type == "text"]
            if not parts or (len(parts) == 1 and parts[0].type == "text"):
                d["content"] = parts[0].text if parts else ""
            else:
                d["content"] = [{"type": "text", "text": p.text} if p.type == "text" else encode_llama_part(p)
                                for p in parts]
            if role == "tool":
                d["tool_call_id"] = m.tool_call_id or ""
        else:
            texts = [p.text for p in m.parts if p.type == "text"]
            if texts:
                d["content"] = {"type": "text", "text": "".join(texts)}
            if m.stop_reason is not None:
                d["stop_reason"] = stop_reason_out(m.stop_reason)
            if m.tool_calls:
                d["tool_calls"] = _c.encode_tool_calls(m.tool_calls, typed=False)
        out.append(d)
    return out


def _encode_response_format(rf: dict[str, Any]) -> dict[str, Any] | None:
    typ = rf.get("type")
    if typ == "text":
        return {"type": "text"}
    if typ == "json_schema" and isinstance(rf.get("json_schema"), dict):
        js = rf["json_schema"]
        return {"type": "json_schema", "json_schema": {k: js[k] for k in ("name", "schema") if k in js}}
    return None  # json_object and unknown types: no Llama counterpart


def encode_request(ex: Exchange) -> dict[str, Any]:
    body: dict[str, Any] = {"model": ex.model, "messages": encode_messages(ex.messages)}
    p = ex.params
    extra: dict[str, Any] = ex.extra.get(NAME) or {}
    if p.get("max_tokens") is not None:
        body["max_completion_tokens"] = p["max_tokens"]
    for k in ("temperature", "top_p", "top_k", "repetition_penalty", "user"):
        if p.get(k) is not None:
            body[k] = p[k]
    if p.get("response_format") is not None and (rf := _encode_response_format(p["response_format"])) is not None:
        body["response_format"] = rf
    if p.get("tools"):
        body["tools"] = _c.encode_tool_defs(p["tools"])
    if p.get("tool_choice") is not None:
        body["tool_choice"] = _c.encode_tool_choice(p["tool_choice"])
    if ex.stream:
        body["stream"] = True
    for k, v in extra.items():
        if k == "tools" or k not in body:
            body[k] = v
    return body


def decode_response(body: bytes) -> Completion:
    obj = _c.load_object(body, status=502, what="upstream response")
    r = _c.UP
    cm = r.obj(obj.get("completion_message"), "completion_message")
    msg = Message(role="assistant")
    content = cm.get("content")
    if content:
        parts = _c.decode_parts(content, r, "completion_message.content", MESSAGES, "assistant")
        msg.parts = [p for p in parts if p.text]
    if cm.get("tool_calls") is not None:
        msg.tool_calls = _c.decode_tool_calls(cm["tool_calls"], r, "completion_message.tool_calls")
    usage = _usage_from_metrics(obj["metrics"], r, "metrics") if obj.get("metrics") is not None else None
    c = Completion(id=r.opt_str(obj.get("id"), "id") or new_id("chatcmpl-"), model="", message=msg,
                   finish_reason=stop_reason_in(cm.get("stop_reason")), usage=usage, created=int(time.time()))
    top = {k: v for k, v in obj.items() if k not in ("id", "completion_message", "metrics", "guardgate")}
    if top:
        c.extra[NAME] = {"top": top}
    return c


def encode_response(c: Completion, ex: Exchange) -> dict[str, Any]:
    m = c.message
    cm: dict[str, Any] = {"role": "assistant",
                          "content": {"type": "text", "text": "".join(p.text for p in m.parts if p.type in _TEXT_OUT)},
                          "stop_reason": stop_reason_out(c.finish_reason)}
    if m.tool_calls:
        cm["tool_calls"] = _c.encode_tool_calls(m.tool_calls, typed=False)
    out: dict[str, Any] = {"id": c.id, "completion_message": cm}
    if c.usage is not None:
        out["metrics"] = _metrics(c.usage)
    for k, v in ((c.extra.get(NAME) or {}).get("top") or {}).items():
        out.setdefault(k, v)
    if c.extra.get("guardgate") is not None:
        out["guardgate"] = c.extra["guardgate"]
    return out


# --------------------------------------------------------------------------- moderations


def decode_moderation_request(body: bytes | dict[str, Any]) -> ModerationRequest:
    """`{"messages":[...], "model"?}`: one conversation, one result."""
    obj = body if isinstance(body, dict) else _c.load_object(body)  # the router's payload, or raw bytes
    r = _c.REQ
    model = r.opt_str(obj.get("model"), "model")
    if "messages" not in obj:
        r.fail("'messages' is required", "messages")
    return ModerationRequest(model, [_c.decode_messages(obj["messages"], r, "messages", MESSAGES)])


def encode_moderation_request(req: ModerationRequest) -> dict[str, Any]:
    """The Llama API moderates one conversation per request: several inputs (an OpenAI `input`
    list) are sent as one user message each in one conversation, and answered by one result."""
    msgs = req.inputs[0] if len(req.inputs) == 1 else [Message.of("user", "\n".join(m.text for m in conv))
                                                       for conv in req.inputs]
    body: dict[str, Any] = {"messages": encode_messages(msgs)}
    if req.model:
        body["model"] = req.model
    return body


def encode_moderation_response(results: list[ModerationResult], *, model: str, id: str | None = None) -> dict[str, Any]:
    return {"model": model, "results": [
        {"flagged": bool(res.get("flagged")),
         "flagged_categories": sorted({_c.category_code(c) for c in res.get("categories") or []}, key=_c.code_order)}
        for res in results]}


def decode_moderation_response(body: bytes) -> list[ModerationResult]:
    obj = _c.load_object(body, status=502, what="upstream moderation response")
    r = _c.UP
    out: list[ModerationResult] = []
    for i, res in enumerate(r.list_(obj.get("results"), "results")):
        p = f"results[{i}]"
        res = r.obj(res, p)
        cats = {_c.category_code(r.str_(c, f"{p}.flagged_categories[]"))
                for c in r.list_(res.get("flagged_categories") or [], f"{p}.flagged_categories")}
        out.append({"flagged": r.bool_(res.get("flagged", bool(cats)), f"{p}.flagged"),
                    "categories": sorted(cats, key=_c.code_order), "scores": {}})
    return out


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
            raise UpstreamStreamError("upstream sent a stream chunk that is not JSON", code=_c.BAD) from None
        if event == "error" or not isinstance(obj, dict) or not isinstance(obj.get("event"), dict):
            msg, code = _c.error_fields(obj)
            if event == "error" or msg:
                raise UpstreamStreamError(msg or "upstream error during streaming", code=code or "upstream_error")
            raise UpstreamStreamError("upstream sent a stream chunk without an event object", code=_c.BAD)
        try:
            return self._events(obj, obj["event"])
        except DialectError as e:
            raise UpstreamStreamError(f"upstream stream chunk: {e.message}", code=_c.BAD) from None

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
        if ev.get("delta") is not None:
            delta = r.obj(ev["delta"], "event.delta")
            if delta.get("type") == "text" and delta.get("text"):
                out.append(TextDelta(r.str_(delta["text"], "event.delta.text")))
            elif delta.get("type") == "tool_call":
                self._tool(delta, out)
        et = ev.get("event_type")
        if et == "complete":
            out.append(Finish(stop_reason_in(ev.get("stop_reason"))))
            self._clean = True
        usage = None if ev.get("metrics") is None else _usage_from_metrics(ev["metrics"], r, "event.metrics")
        if usage is not None:
            out.append(UsageEvent(usage))
        if et == "metrics":
            self._done = self._clean = True
        return out

    def _tool(self, delta: dict[str, Any], out: list[Event]) -> None:
        r = _c.UP
        cid = r.opt_str(delta.get("id"), "event.delta.id")
        fn = {} if delta.get("function") is None else r.obj(delta["function"], "event.delta.function")
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
            out.append(ToolCallDelta(k, args, id=cid, name=r.opt_str(fn.get("name"), "event.delta.function.name")))
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
        self._metrics()

    def _metrics(self) -> None:
        """The metrics event of usage kept for after the finish (held: an Annotation may ride on it)."""
        if self._usage is not None:
            event = {"event_type": "metrics", "delta": _EMPTY, "metrics": _metrics(self._usage)}
            self._usage = None
            self.begin()
            self.hold(self._event(event), event)

    def usage(self, ev: UsageEvent) -> None:
        self._usage = ev.usage
        if self.holding:  # else no finish yet: written after it
            self._metrics()

    def close(self) -> None:
        self._metrics()  # usage but never a finish

    def error_frame(self, message: str, code: str, type: str) -> str:
        """`event: error` + the error body: llama-api-client raises `APIError` (§4.3)."""
        return frame(error_body(400 if type == "invalid_request_error" else 502, message, type=type, code=code),
                     "error")


stream_decoder = LlamaStreamDecoder
stream_encoder = LlamaStreamEncoder

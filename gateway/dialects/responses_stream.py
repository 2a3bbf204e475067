"""The Responses API answer: the Response object for a `Completion` (`encode_response`), `error_frame` and
`ResponsesStreamEncoder`; `responses.py` (the request side) re-exports them, this module never imports it."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from gateway.dialects._common import qstr, to_bytes
from gateway.dialects.stream import HOLES, StreamEncoder, Template, frame
from gateway.types import Choice, Message, new_id

if TYPE_CHECKING:  # the events the encoder's hooks take
    from gateway.types import Completion, Exchange, Finish, StreamStart, TextDelta, ToolCallDelta, Usage, UsageEvent

# Finish reasons that end a Response as `incomplete`, with the reason the Responses API names.
INCOMPLETE = {"content_filter": "content_filter", "length": "max_output_tokens"}


def _echo(ex: Exchange) -> dict[str, Any]:
    """The request fields a Response repeats (the SDK's Response model requires tools,
    tool_choice and parallel_tool_calls, so an exchange decoded elsewhere gets defaults)."""
    echo = ex.client.get("echo")
    if echo is None:
        echo = {"tools": [], "tool_choice": "auto", "parallel_tool_calls": True}
    return echo


def response_id(ex: Exchange) -> str:
    """The Response id of this exchange (fixed at decode; a new one when decoded elsewhere)."""
    rid = ex.client.get("response_id")
    if not isinstance(rid, str):
        rid = ex.client["response_id"] = new_id("resp_")
    return rid


def _usage(u: Usage | None, details: dict[str, Any] | None = None) -> dict[str, Any] | None:
    if u is None:
        return None
    details = details or {}
    ptd = details.get("prompt_tokens_details")
    ctd = details.get("completion_tokens_details")
    cached = ptd.get("cached_tokens") if isinstance(ptd, dict) else None
    reasoning = ctd.get("reasoning_tokens") if isinstance(ctd, dict) else None
    return {"input_tokens": u.prompt_tokens,
            "input_tokens_details": {"cached_tokens": cached if isinstance(cached, int) else 0,
                                     "cache_write_tokens": 0},
            "output_tokens": u.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": reasoning if isinstance(reasoning, int) else 0},
            "total_tokens": u.total_tokens}


def _status(finish: str | None) -> tuple[str, dict[str, str] | None]:
    reason = INCOMPLETE.get(finish or "")
    return ("incomplete", {"reason": reason}) if reason else ("completed", None)


def _response(ex: Exchange, *, model: str, created: int, status: str, incomplete: dict[str, str] | None,
              output: list[dict[str, Any]], usage: dict[str, Any] | None) -> dict[str, Any]:
    return {"id": response_id(ex), "object": "response", "created_at": created, "status": status,
            "completed_at": int(time.time()) if status == "completed" else None, "error": None,
            "incomplete_details": incomplete, "model": model, "output": output, "usage": usage, **_echo(ex)}


def _url_citations(att: Any) -> list[dict[str, Any]]:
    """Chat `annotations` (url_citation nested) → Responses annotations (flat)."""
    out: list[dict[str, Any]] = []
    if isinstance(att, list):
        for a in att:
            uc = a.get("url_citation") if isinstance(a, dict) else None
            if isinstance(uc, dict):
                out.append({"type": "url_citation", **uc})
    return out


def _text_part(text: str, annotations: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": annotations or [], "logprobs": []}


def _part(kind: str, text: str) -> dict[str, Any]:
    """A message content part: `output_text` or `refusal`."""
    return _text_part(text) if kind == "output_text" else {"type": "refusal", "refusal": text}


def _reasoning_item(rid: str, text: str) -> dict[str, Any]:
    return {"id": rid, "type": "reasoning", "summary": [{"type": "summary_text", "text": text}]}


def _call_item(fid: str, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    return {"id": fid, "type": "function_call", "status": status, "arguments": arguments, "call_id": call_id,
            "name": name}


def _output(ch: Choice) -> list[dict[str, Any]]:
    m = ch.message
    status = "incomplete" if ch.finish_reason in INCOMPLETE else "completed"
    out: list[dict[str, Any]] = []
    by: dict[str, str] = {}
    for p in m.parts:
        if p.type in ("text", "refusal", "reasoning"):
            by[p.type] = by.get(p.type, "") + p.text
    if by.get("reasoning"):
        out.append(_reasoning_item(new_id("rs_"), by["reasoning"]))
    content: list[dict[str, Any]] = []
    text = by.get("text", "")
    # An empty answer is still a message with an empty output_text, unless it has a refusal or
    # tool calls instead, or was blocked (a blocked answer keeps nothing: an empty output_text would
    # make `responses.parse` fail validating "" against the schema).
    if text or not ("refusal" in by or m.tool_calls or ch.finish_reason == "content_filter"):
        att = [a.value for a in ch.attached if a.dialect == "openai" and a.key == "annotations"]
        content.append(_text_part(text, _url_citations(att[0]) if att else None))
    if "refusal" in by:
        content.append(_part("refusal", by["refusal"]))
    if content:
        out.append({"id": new_id("msg_"), "type": "message", "status": status, "role": "assistant", "content": content})
    for tc in m.tool_calls:
        out.append(_call_item(new_id("fc_"), tc.id or new_id("call_"), tc.name, tc.arguments, status))
    return out


def encode_response(c: Completion, ex: Exchange) -> dict[str, Any]:
    """A Response object (choice 0: the Responses API has one answer per request)."""
    ch = next((x for x in c.choices if x.index == 0), c.choices[0] if c.choices else Choice(Message("assistant")))
    status, incomplete = _status(ch.finish_reason)
    ox: dict[str, Any] = c.extra.get("openai") or {}
    out = _response(ex, model=c.model or ex.model, created=c.created, status=status, incomplete=incomplete,
                    output=_output(ch), usage=_usage(c.usage, ox.get("usage")))
    if c.extra.get("guardgate") is not None:
        out["guardgate"] = c.extra["guardgate"]
    return out


# --------------------------------------------------------------------------- streams


def error_frame(message: str, code: str, sequence_number: int = 0, *, param: str | None = None) -> bytes:
    """A bare Responses `error` event, for a relayed stream whose lifecycle events came from
    the upstream (a `response.created` of our own would change the response identity)."""
    return to_bytes(frame({"type": "error", "code": code, "message": message, "param": param,
                           "sequence_number": sequence_number}, "error"))


class _Item:
    """One output item being streamed: its final shape is built from what was released."""

    __slots__ = ("call_id", "done", "id", "index", "kind", "name", "parts")

    def __init__(self, kind: str, index: int, id: str) -> None:
        self.kind = kind  # message | reasoning | function_call
        self.index = index
        self.id = id
        self.parts: list[tuple[str, list[str]]] = []  # message: (output_text | refusal, texts); others: one
        self.call_id = ""
        self.name = ""
        self.done: dict[str, Any] | None = None  # the final item, once closed


class ResponsesStreamEncoder(StreamEncoder):
    """Neutral events → Responses SSE events (`event: <type>\\ndata: <json>\\n\\n`), no `[DONE]`.

    `response.created` and `response.in_progress` open the stream; text opens a `message` item
    with an `output_text` part (a `refusal` part for the refusal channel), reasoning a `reasoning`
    item with a summary part, each tool call a `function_call` item. A new kind of text closes the
    current part or item (a tool call closes the current message or reasoning item; calls stay
    open, since a chat stream may add to any of them). `Finish` closes every open part and item
    (status `incomplete` for content_filter and length); usage and a guard `Annotation` are kept
    for the terminal event, which `end()` writes: `response.completed`, or `response.incomplete`
    with `incomplete_details.reason` content_filter / max_output_tokens. Every `.done` event and the
    terminal Response carry exactly the concatenated deltas. `sequence_number` counts every event
    from 0. Events of another choice index than 0 are ignored (Responses has one answer), as is
    anything after the finish.

    One exception to "every part gets its done events": after a content_filter cut of structured
    output (a json_schema / json_object format), `response.output_text.done` is left out (the
    content part and item are still closed): the SDK parses that event's text with the client's
    `text_format`, and a cut JSON text would raise inside its stream iterator.
    """

    def __init__(self, ex: Exchange) -> None:
        super().__init__(ex)
        self._seq = 0
        response_id(ex)  # fixed now: every lifecycle event carries the same id
        self._model = ex.model
        self._created = int(time.time())
        self._items: list[_Item] = []
        self._current: _Item | None = None  # the open message or reasoning item
        self._calls: dict[int, _Item] = {}  # call_index → open function_call item
        self._finish: str | None = None
        self._usage: Usage | None = None
        rf = ex.params.get("response_format")
        self._structured = isinstance(rf, dict) and rf.get("type") in ("json_schema", "json_object")
        # While an output_text part is open: its delta event (serialized once) and the part's texts.
        self._text_ev: Template | None = None
        self._texts: list[str] = []

    # ---------------------------------------------------------------- frames

    def _ev(self, typ: str, **fields: Any) -> None:
        fields["sequence_number"] = self._seq
        self._seq += 1
        self.emit({"type": typ, **fields}, typ)

    def _response(self, status: str, output: list[dict[str, Any]], incomplete: dict[str, str] | None = None,
                  usage: dict[str, Any] | None = None) -> dict[str, Any]:
        return _response(self.ex, model=self._model, created=self._created, status=status, incomplete=incomplete,
                         output=output, usage=usage)

    def start(self, ev: StreamStart | None) -> None:
        if ev is not None:
            self._model = ev.model or self.ex.model
            self._created = int(ev.created)
        snap = self._response("in_progress", [])
        self._ev("response.created", response=snap)
        self._ev("response.in_progress", response=snap)

    # ---------------------------------------------------------------- items

    def _open(self, kind: str, prefix: str, **fields: Any) -> _Item:
        """A new output item; the open message or reasoning item is closed first (calls stay open)."""
        if self._current is not None:
            self._close(self._current, "completed")
            self._current = None
        item = _Item(kind, len(self._items), new_id(prefix))
        self._items.append(item)
        self._ev("response.output_item.added", output_index=item.index, item={"id": item.id, "type": kind, **fields})
        return item

    def _open_part(self, item: _Item, kind: str) -> None:
        item.parts.append((kind, []))
        self._ev("response.content_part.added", item_id=item.id, output_index=item.index,
                 content_index=len(item.parts) - 1, part=_part(kind, ""))

    def _close_part(self, item: _Item, incomplete_cut: bool) -> None:
        self._text_ev = None
        kind, texts = item.parts[-1]
        text = "".join(texts)
        loc = {"item_id": item.id, "output_index": item.index, "content_index": len(item.parts) - 1}
        if kind == "refusal":
            self._ev("response.refusal.done", **loc, refusal=text)
        elif not (incomplete_cut and self._structured):
            self._ev("response.output_text.done", **loc, text=text, logprobs=[])
        self._ev("response.content_part.done", **loc, part=_part(kind, text))

    def _close(self, item: _Item, status: str) -> None:
        """The done events of an open item, and its final shape."""
        loc = {"item_id": item.id, "output_index": item.index}
        if item.kind == "message":
            if item.parts:
                self._close_part(item, self._finish == "content_filter")
            content = [_part(k, "".join(t)) for k, t in item.parts]
            item.done = {"id": item.id, "type": "message", "status": status, "role": "assistant", "content": content}
        elif item.kind == "reasoning":
            text = "".join(item.parts[0][1])
            self._ev("response.reasoning_summary_text.done", **loc, summary_index=0, text=text)
            self._ev("response.reasoning_summary_part.done", **loc, summary_index=0,
                     part={"type": "summary_text", "text": text})
            item.done = _reasoning_item(item.id, text)
        else:
            args = "".join(item.parts[0][1])
            self._ev("response.function_call_arguments.done", **loc, name=item.name, arguments=args)
            item.done = _call_item(item.id, item.call_id, item.name, args, status)
        self._ev("response.output_item.done", output_index=item.index, item=item.done)

    def _close_all(self, status: str) -> None:
        if self._current is not None:
            self._close(self._current, status)
            self._current = None
        for item in self._calls.values():
            self._close(item, status)
        self._calls.clear()

    # ---------------------------------------------------------------- events

    def text(self, ev: TextDelta) -> None:
        if ev.index != 0 or self._finish is not None or ev.channel not in ("text", "refusal", "reasoning"):
            return  # another choice, after the finish, or a transcript / one-shot Attached text: never sent
        t = self._text_ev
        if t is not None and ev.channel == "text":  # hot path: the open output_text part goes on
            self._texts.append(ev.text)
            self.emit_text(t.fill(qstr(ev.text), str(self._seq)))
            self._seq += 1
            return
        self.begin()
        cur = self._current
        if ev.channel == "reasoning":
            if cur is None or cur.kind != "reasoning":
                cur = self._current = self._open("reasoning", "rs_", summary=[])
                cur.parts.append(("summary_text", []))
                self._ev("response.reasoning_summary_part.added", item_id=cur.id, output_index=cur.index,
                         summary_index=0, part={"type": "summary_text", "text": ""})
            cur.parts[0][1].append(ev.text)
            self._ev("response.reasoning_summary_text.delta", item_id=cur.id, output_index=cur.index,
                     summary_index=0, delta=ev.text)
            return
        kind = "output_text" if ev.channel == "text" else "refusal"
        if cur is None or cur.kind != "message":
            cur = self._current = self._open("message", "msg_", status="in_progress", role="assistant", content=[])
        if not cur.parts or cur.parts[-1][0] != kind:
            if cur.parts:
                self._close_part(cur, False)
            self._open_part(cur, kind)
        cur.parts[-1][1].append(ev.text)
        loc = {"item_id": cur.id, "output_index": cur.index, "content_index": len(cur.parts) - 1}
        if kind == "output_text":
            self._ev("response.output_text.delta", **loc, delta=ev.text, logprobs=[])
            self._text_ev = Template({"type": "response.output_text.delta", **loc, "delta": HOLES[0],
                                      "logprobs": [], "sequence_number": HOLES[1]},
                                     "response.output_text.delta", holes=2)
            self._texts = cur.parts[-1][1]
        else:
            self._ev("response.refusal.delta", **loc, delta=ev.text)

    def tool(self, ev: ToolCallDelta) -> None:
        if ev.index != 0 or self._finish is not None:
            return
        self.begin()
        item = self._calls.get(ev.call_index)
        if item is None:
            call_id, name = ev.id or new_id("call_"), ev.name or ""
            item = self._calls[ev.call_index] = self._open("function_call", "fc_", status="in_progress", arguments="",
                                                           call_id=call_id, name=name)
            item.call_id, item.name = call_id, name
            item.parts.append(("arguments", []))
        if ev.arguments:
            item.parts[0][1].append(ev.arguments)
            self._ev("response.function_call_arguments.delta", item_id=item.id, output_index=item.index,
                     delta=ev.arguments)

    def finish(self, ev: Finish) -> None:
        if ev.index != 0 or self._finish is not None:
            return
        self.begin()
        self._finish = ev.reason
        self._close_all("incomplete" if self._finish in INCOMPLETE else "completed")

    def usage(self, ev: UsageEvent) -> None:
        self._usage = ev.usage

    def close(self) -> None:
        """Close what is open and write the terminal event with the whole Response."""
        self.begin()
        status, incomplete = _status(self._finish)
        self._close_all("incomplete" if incomplete else "completed")
        output = [it.done for it in self._items if it.done is not None]
        typ = "response.completed" if status == "completed" else "response.incomplete"
        terminal = self._response(status, output, incomplete, _usage(self._usage))
        self.hold({"type": typ, "response": terminal, "sequence_number": self._seq}, terminal, typ)
        self._seq += 1

    def error_frame(self, message: str, code: str, type: str) -> str:
        """The Responses `error` event. The SDK yields it as an event (it has no top-level `error`
        key), and agent frameworks treat it as the stream's failure."""
        self.begin()  # the SDK's stream helper wants response.created first
        seq = self._seq
        self._seq += 1
        return frame({"type": "error", "code": code, "message": message, "param": None, "sequence_number": seq},
                     "error")

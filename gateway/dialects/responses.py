"""The OpenAI Responses API (`POST /v1/responses`) as a client-facing codec over chat upstreams.

Guardgate serves a Responses request by translating it into the neutral `Exchange`, which any chat
upstream (OpenAI chat, Llama API, the local llama.cpp model) can be asked; the answer (a
`Completion` or neutral stream events) is rendered back as a Response object or as Responses SSE
events. This module has the client-side functions of `base.Dialect` (`decode_request`,
`encode_response`, `stream_encoder`, `error_body`, `decode_error`, models); it has no
`encode_request` / `decode_response` / `stream_decoder`: no upstream is asked in this dialect.
Wire shapes: wire_formats.md §2 ("Responses API"), checked against the `openai` SDK's types and its
stream accumulator (`openai/lib/streaming/responses/_responses.py`).

Where a decoded request keeps what is not a chat field (`Exchange.client`, never sent upstream, not
shown to guards; `Exchange.extra["openai"]`, sent to an OpenAI-chat upstream only):
- `client["response_id"]`: the `resp_...` id of the answer, fixed at decode (stream and non-stream
  answers use it, so a gateway store can key on it before the answer is written).
- `client["previous_response_id"]` (str | None) and `client["conversation"]` (conversation id,
  str | None): conversation state kept by the upstream, which no input guard can see. The codec
  only decodes them; the pipeline refuses them or resolves them from its own store. With either set
  the request may carry no input at all (`Exchange.messages` may then be empty).
- `client["input"]`: the request's input items as sent (a string becomes one user message item),
  for a gateway conversation store; `client["echo"]`: the Response fields echoed back (below);
  `client["ignored"]`: request keys that were dropped (for logging).
- `extra["openai"]`: `reasoning_effort` (from `reasoning.effort`), `parallel_tool_calls` (only with
  tools: chat refuses it otherwise), `verbosity` (from `text.verbosity`), `safety_identifier`,
  `prompt_cache_key`, `prompt_cache_retention`, `service_tier`, and an `allowed_tools` tool choice.

Request mapping: `instructions` → a leading system message; `input` string → one user message;
`message` items (user/assistant/system/developer; parts `input_text`, `output_text`, `refusal` as
text; `input_image` by URL, `input_audio`, `input_file` by file_data or file_id on user messages, as
chat `image_url` / `input_audio` / `file` parts: `dialects/media.py`); `function_call` items → assistant `tool_calls`
(`call_id` is the call id; consecutive calls join the assistant turn before them, as chat needs);
`function_call_output` items → `tool` messages (untrusted input for the input stage, like chat
tool messages); function `tools` → `params["tools"]`; `tool_choice`; `text.format` →
`params["response_format"]` in the chat shape; `max_output_tokens` → `params["max_tokens"]`;
`temperature`, `top_p`, `user`; `stream` (usage is always requested from the upstream, since the
final Response carries it).

Dropped on purpose: `reasoning` input items (a previous turn's reasoning: chat upstreams have no
input slot for it, and it is the model's own text, not input), `reasoning.summary`, `include`,
`stream_options`, `top_logprobs`, `max_tool_calls`, `truncation` (echoed only), `store` and
`metadata` (echoed; sending them to a chat upstream would store a chat completion instead).

Refused (400): built-in tools (`unsupported_tool`: a chat upstream cannot run them), input items
other than messages and function calls/outputs (`unsupported_item`: `item_reference` points at
stored items no guard can read), `input_image` by `file_id` and `input_file` by `file_url`
(`unsupported_content`: no chat counterpart, and no guard could read them), media parts outside
user messages, `background: true` and `prompt` templates (an object: `unsupported_parameter`; a
`prompt` of another shape is not the API's and is dropped like an unknown key).

Answer mapping: channel `reasoning` → a `reasoning` item with its text as the summary (the
reasoning text a Responses client reads); `text` → an `output_text` part; `refusal` → a `refusal`
part; tool calls → `function_call` items. `finish_reason` content_filter → `status: incomplete`,
`incomplete_details.reason: content_filter`; length → `max_output_tokens`.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from gateway.dialects import openai as _openai
from gateway.dialects._common import REQ, Reader, arguments_str, function_def, qstr, request_decoder, to_bytes
from gateway.dialects.base import DialectError, ModelInfo
from gateway.dialects.media import decode_responses_part
from gateway.dialects.stream import HOLES, StreamEncoder, Template, frame
from gateway.types import Choice, Completion, Exchange, Message, Part, Role, ToolCall, new_id

if TYPE_CHECKING:  # the events the encoder's hooks take
    from gateway.types import Finish, StreamStart, TextDelta, ToolCallDelta, Usage, UsageEvent

NAME = "responses"
name = NAME  # the module itself is the dialect, as gateway/dialects/openai.py

INPUT_ROLES: dict[str, Role] = {"user": "user", "assistant": "assistant", "system": "system", "developer": "developer"}
TOOL_CHOICES = frozenset(("none", "auto", "required"))
_TEXT_PARTS = {"input_text": "text", "output_text": "text", "refusal": "refusal"}
# Top-level request keys read by `decode_request`; any other key is dropped (a chat upstream
# would reject a Responses-only key) and listed in `client["ignored"]`.
_CHAT_PASSTHROUGH = ("safety_identifier", "prompt_cache_key", "prompt_cache_retention", "service_tier")
_KNOWN = frozenset(
    (
        "model", "input", "instructions", "tools", "tool_choice", "parallel_tool_calls", "text",
        "max_output_tokens", "temperature", "top_p", "reasoning", "store", "metadata", "user", "stream",
        "previous_response_id", "conversation", "truncation", "include", "stream_options", "top_logprobs",
        "max_tool_calls", "background", "prompt", *_CHAT_PASSTHROUGH,
    )
)
# Finish reasons that end a Response as `incomplete`, with the reason the Responses API names.
INCOMPLETE = {"content_filter": "content_filter", "length": "max_output_tokens"}


def _fail(message: str, param: str | None, code: str) -> DialectError:
    return DialectError(message, status=400, param=param, code=code)


# --------------------------------------------------------------------------- requests


def _text_of(part: dict[str, Any], key: str, r: Reader, param: str) -> str:
    return r.str_(part.get(key), f"{param}.{key}")


def _decode_content(content: Any, r: Reader, param: str, *, role: str) -> list[Part]:
    """A message's content: a string or a list of parts (text-like parts become text parts: a
    guard must see an assistant refusal in the history like any other text). A function_call_output's
    output (role "tool"): text only (a chat upstream's tool message is text)."""
    if isinstance(content, str):
        return [Part("text", content)]
    parts: list[Part] = []
    for j, item in enumerate(r.list_(content, param)):
        p = f"{param}[{j}]"
        item = r.obj(item, p)
        typ = item.get("type")
        if role == "tool" and typ != "input_text":
            raise _fail(f"'{p}': a function_call_output can carry text only (a chat upstream's tool message is "
                        f"text), not {typ!r}", f"{p}.type", "unsupported_content")
        if typ in ("input_text", "output_text"):
            parts.append(Part("text", _text_of(item, "text", r, p)))
        elif typ == "refusal":
            parts.append(Part("text", _text_of(item, "refusal", r, p)))
        elif isinstance(typ, str) and (media := decode_responses_part(item, typ, r, p, role=role)) is not None:
            parts.append(media)  # input_image, input_audio, input_file: the policy's `content:` rule decides
        else:
            raise _fail(f"'{p}': unsupported content part type {typ!r}", f"{p}.type", "unsupported_content")
    return parts


def _decode_items(items: list[Any], r: Reader, out: list[Message]) -> None:
    for i, item in enumerate(items):
        p = f"input[{i}]"
        item = r.obj(item, p)
        typ = item.get("type")
        if typ is None or typ == "message":
            role = item.get("role")
            if not isinstance(role, str) or role not in INPUT_ROLES:
                r.fail(f"'{p}.role' must be one of {sorted(INPUT_ROLES)}", f"{p}.role")
            role = INPUT_ROLES[role]
            if "content" not in item:
                r.fail(f"'{p}.content' is required", f"{p}.content")
            out.append(Message(role, _decode_content(item["content"], r, f"{p}.content", role=role)))
        elif typ == "function_call":
            tc = ToolCall(
                r.str_(item.get("call_id"), f"{p}.call_id"),
                r.str_(item.get("name"), f"{p}.name"),
                arguments_str(item.get("arguments"), r, f"{p}.arguments"),
            )
            # Chat wants every call of a turn on one assistant message, answered by the tool
            # messages after it: a call joins the assistant turn right before it.
            if out and out[-1].role == "assistant":
                out[-1].tool_calls.append(tc)
            else:
                out.append(Message("assistant", tool_calls=[tc]))
        elif typ == "function_call_output":
            out.append(
                Message(
                    "tool",
                    _decode_content(item.get("output"), r, f"{p}.output", role="tool"),
                    tool_call_id=r.str_(item.get("call_id"), f"{p}.call_id"),
                )
            )
        elif typ == "reasoning":
            continue  # a previous turn's reasoning: no chat input slot, and not input (module doc)
        elif typ == "item_reference":
            raise _fail(
                f"'{p}': item_reference points at an item stored upstream, which no guard can read; "
                "send the item itself",
                f"{p}.type",
                "unsupported_item",
            )
        else:
            raise _fail(
                f"'{p}': input items of type {typ!r} are not supported (only message, function_call, "
                "function_call_output and reasoning)",
                f"{p}.type",
                "unsupported_item",
            )


def _decode_tools(v: Any, r: Reader) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(neutral function defs, the tools as echoed in the Response); built-in tools refused."""
    neutral: list[dict[str, Any]] = []
    echo: list[dict[str, Any]] = []
    unsupported: list[str] = []
    for i, t in enumerate(r.list_(v, "tools")):
        p = f"tools[{i}]"
        t = r.obj(t, p)
        typ = t.get("type")
        if typ != "function":
            unsupported.append(typ if isinstance(typ, str) else repr(typ))
            continue
        d = function_def(t, r, p)  # flat: the function's fields sit on the tool itself
        neutral.append(d)
        echo.append({"type": "function", "name": d["name"], "description": d.get("description"),
                     "parameters": d.get("parameters"), "strict": d.get("strict")})
    if unsupported:
        raise _fail(
            f"tools of type {', '.join(sorted(set(unsupported)))} are not supported: Guardgate answers the "
            "Responses API through a chat upstream, which runs no built-in tools; use function tools",
            "tools",
            "unsupported_tool",
        )
    return neutral, echo


def _decode_tool_choice(v: Any, r: Reader, extra: dict[str, Any]) -> str | dict[str, str] | None:
    """A neutral tool choice; `allowed_tools` goes to an OpenAI-chat upstream in its chat shape."""
    if isinstance(v, str):
        if v not in TOOL_CHOICES:
            r.fail(f"'tool_choice' must be one of {sorted(TOOL_CHOICES)} or an object", "tool_choice")
        return v
    d = r.obj(v, "tool_choice")
    typ = d.get("type")
    if typ == "function":
        return {"name": r.str_(d.get("name"), "tool_choice.name")}
    if typ == "allowed_tools":
        mode = r.str_(d.get("mode"), "tool_choice.mode")
        names = []
        for j, t in enumerate(r.list_(d.get("tools"), "tool_choice.tools")):
            t = r.obj(t, f"tool_choice.tools[{j}]")
            if t.get("type") != "function":
                raise _fail("'tool_choice.tools' may name function tools only", f"tool_choice.tools[{j}]",
                            "unsupported_tool")
            fn = r.str_(t.get("name"), f"tool_choice.tools[{j}].name")
            names.append({"type": "function", "function": {"name": fn}})
        extra["tool_choice"] = {"type": "allowed_tools", "allowed_tools": {"mode": mode, "tools": names}}
        return None
    raise _fail(f"tool_choice of type {typ!r} is not supported (built-in tools are not)", "tool_choice.type",
                "unsupported_tool")


def _decode_format(fmt: Any, r: Reader) -> dict[str, Any]:
    """`text.format` → the chat `response_format` (json_schema nests under `json_schema`)."""
    fmt = r.obj(fmt, "text.format")
    typ = r.str_(fmt.get("type"), "text.format.type")
    if typ in ("text", "json_object"):
        return {"type": typ}
    if typ != "json_schema":
        r.fail("'text.format.type' must be text, json_object or json_schema", "text.format.type")
    js: dict[str, Any] = {
        "name": r.str_(fmt.get("name"), "text.format.name"),
        "schema": r.obj(fmt.get("schema"), "text.format.schema"),
    }
    if fmt.get("description") is not None:
        js["description"] = r.str_(fmt["description"], "text.format.description")
    if fmt.get("strict") is not None:
        js["strict"] = r.bool_(fmt["strict"], "text.format.strict")
    return {"type": "json_schema", "json_schema": js}


def _conversation_id(v: Any, r: Reader) -> str:
    if isinstance(v, str):
        return v
    return r.str_(r.obj(v, "conversation").get("id"), "conversation.id")


def decode_payload(obj: dict[str, Any]) -> Exchange:
    """A Responses request, parsed as a JSON object → the neutral exchange (see the module doc for
    every field)."""
    r = REQ
    model = obj.get("model")
    if not isinstance(model, str) or not model:
        r.fail("'model' is required and must be a non-empty string", "model")
    if obj.get("background"):
        raise _fail("'background' responses are not supported by the gateway", "background", "unsupported_parameter")
    if isinstance(obj.get("prompt"), dict):  # a template reference; any other `prompt` is not the API's
        raise _fail(
            "'prompt' templates are stored upstream, where no guard can read them; send the instructions "
            "and input themselves",
            "prompt",
            "unsupported_parameter",
        )
    client: dict[str, Any] = {"response_id": new_id("resp_")}
    extra: dict[str, Any] = {}
    params: dict[str, Any] = {}
    messages: list[Message] = []

    prev = r.opt_str(obj.get("previous_response_id"), "previous_response_id")
    conv = _conversation_id(obj["conversation"], r) if obj.get("conversation") is not None else None
    if prev is not None and conv is not None:
        r.fail("'previous_response_id' and 'conversation' cannot both be set", "conversation")
    client["previous_response_id"], client["conversation"] = prev, conv

    instructions = r.opt_str(obj.get("instructions"), "instructions")
    if instructions:
        messages.append(Message.of("system", instructions))
    inp = obj.get("input")
    if isinstance(inp, str):
        messages.append(Message.of("user", inp))
        client["input"] = [{"type": "message", "role": "user", "content": inp}]
    elif inp is not None:
        items = r.list_(inp, "input")
        _decode_items(items, r, messages)
        client["input"] = items
    else:
        client["input"] = []
    if not messages and prev is None and conv is None:
        r.fail("'input' is required", "input")

    echo_tools: list[dict[str, Any]] = []
    if obj.get("tools") is not None:
        tools, echo_tools = _decode_tools(obj["tools"], r)
        if tools:
            params["tools"] = tools
    tool_choice = obj.get("tool_choice")
    if tool_choice is not None:
        tc = _decode_tool_choice(tool_choice, r, extra)
        if not params.get("tools"):  # chat refuses a tool choice without tools
            extra.pop("tool_choice", None)
        elif tc is not None:
            params["tool_choice"] = tc
    ptc = obj.get("parallel_tool_calls")
    if ptc is not None:
        r.bool_(ptc, "parallel_tool_calls")
        if params.get("tools"):  # chat refuses parallel_tool_calls without tools
            extra["parallel_tool_calls"] = ptc

    text = obj.get("text")
    if text is not None:
        text = r.obj(text, "text")
        if text.get("format") is not None:
            params["response_format"] = _decode_format(text["format"], r)
        if text.get("verbosity") is not None:
            extra["verbosity"] = r.str_(text["verbosity"], "text.verbosity")
    for k in ("temperature", "top_p"):
        if obj.get(k) is not None:
            params[k] = r.num(obj[k], k)
    if obj.get("max_output_tokens") is not None:
        params["max_tokens"] = r.int_(obj["max_output_tokens"], "max_output_tokens")
    user = r.opt_str(obj.get("user"), "user")
    if user is not None:
        params["user"] = user
    reasoning = obj.get("reasoning")
    echo_reasoning: dict[str, Any] = {"effort": None, "summary": None}
    if reasoning is not None:
        reasoning = r.obj(reasoning, "reasoning")
        effort = r.opt_str(reasoning.get("effort"), "reasoning.effort")
        if effort is not None:
            extra["reasoning_effort"] = effort
        summary = reasoning.get("summary", reasoning.get("generate_summary"))
        echo_reasoning = {"effort": effort, "summary": r.opt_str(summary, "reasoning.summary")}
    for k in _CHAT_PASSTHROUGH:
        if obj.get(k) is not None:
            extra[k] = r.str_(obj[k], k)
    store = obj.get("store")
    if store is not None:
        r.bool_(store, "store")
    metadata = obj.get("metadata")
    if metadata is not None:
        metadata = r.obj(metadata, "metadata")
        for k, v in metadata.items():
            r.str_(v, f"metadata.{k}")
    truncation = r.opt_str(obj.get("truncation"), "truncation")
    for k in ("top_logprobs", "max_tool_calls"):
        if obj.get(k) is not None:
            r.int_(obj[k], k)
    if obj.get("include") is not None:
        r.list_(obj["include"], "include")

    echo_text = dict(text or {})
    if echo_text.get("format") is None:
        echo_text["format"] = {"type": "text"}
    stream = obj.get("stream")
    ex = Exchange(model=model, messages=messages, params=params)
    if stream is not None:
        ex.stream = r.bool_(stream, "stream")
    ex.include_usage = ex.stream  # the final Response carries usage: always ask for it
    if extra:
        ex.extra["openai"] = extra
    client["echo"] = {
        "instructions": instructions,
        "tools": echo_tools,
        "tool_choice": tool_choice if tool_choice is not None else "auto",
        "parallel_tool_calls": ptc if ptc is not None else True,
        "temperature": params.get("temperature"),
        "top_p": params.get("top_p"),
        "max_output_tokens": params.get("max_tokens"),
        "max_tool_calls": obj.get("max_tool_calls"),
        "top_logprobs": obj.get("top_logprobs"),
        "metadata": metadata if metadata is not None else {},
        "store": store if store is not None else True,
        "previous_response_id": prev,
        "conversation": {"id": conv} if conv is not None else None,
        "reasoning": echo_reasoning,
        "text": echo_text,
        "truncation": truncation or "disabled",
        "user": user,
        "background": False,
        **{k: extra.get(k) for k in _CHAT_PASSTHROUGH},
    }
    client["ignored"] = sorted(k for k in obj if k not in _KNOWN or (k == "prompt" and obj[k] is not None))
    ex.client = client
    return ex


decode_request = request_decoder(decode_payload)


# --------------------------------------------------------------------------- non-stream answers


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
    return {
        "input_tokens": u.prompt_tokens,
        "input_tokens_details": {
            "cached_tokens": cached if isinstance(cached, int) else 0,
            "cache_write_tokens": 0,
        },
        "output_tokens": u.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": reasoning if isinstance(reasoning, int) else 0},
        "total_tokens": u.total_tokens,
    }


def _status(finish: str | None) -> tuple[str, dict[str, str] | None]:
    reason = INCOMPLETE.get(finish or "")
    return ("incomplete", {"reason": reason}) if reason else ("completed", None)


def _response(ex: Exchange, *, model: str, created: int, status: str, incomplete: dict[str, str] | None,
              output: list[dict[str, Any]], usage: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "id": response_id(ex),
        "object": "response",
        "created_at": created,
        "status": status,
        "completed_at": int(time.time()) if status == "completed" else None,
        "error": None,
        "incomplete_details": incomplete,
        "model": model,
        "output": output,
        "usage": usage,
        **_echo(ex),
    }


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
        content.append({"type": "refusal", "refusal": by["refusal"]})
    if content:
        out.append({"id": new_id("msg_"), "type": "message", "status": status, "role": "assistant",
                    "content": content})
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

    START_ON_ERROR = True  # the SDK's stream helper wants response.created first

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
        self._final: dict[str, Any] | None = None  # the annotation, kept for the terminal event
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

    def _add(self, kind: str, prefix: str) -> _Item:
        item = _Item(kind, len(self._items), new_id(prefix))
        self._items.append(item)
        return item

    def _open_message(self) -> _Item:
        item = self._current = self._add("message", "msg_")
        self._ev("response.output_item.added", output_index=item.index,
                 item={"id": item.id, "type": "message", "status": "in_progress", "role": "assistant", "content": []})
        return item

    def _open_part(self, item: _Item, kind: str) -> None:
        item.parts.append((kind, []))
        part = _text_part("") if kind == "output_text" else {"type": "refusal", "refusal": ""}
        self._ev("response.content_part.added", item_id=item.id, output_index=item.index,
                 content_index=len(item.parts) - 1, part=part)

    def _close_part(self, item: _Item, incomplete_cut: bool) -> None:
        self._text_ev = None
        kind, texts = item.parts[-1]
        text = "".join(texts)
        loc = {"item_id": item.id, "output_index": item.index, "content_index": len(item.parts) - 1}
        if kind == "output_text":
            part = _text_part(text)
            if not (incomplete_cut and self._structured):
                self._ev("response.output_text.done", **loc, text=text, logprobs=[])
        else:
            part = {"type": "refusal", "refusal": text}
            self._ev("response.refusal.done", **loc, refusal=text)
        self._ev("response.content_part.done", **loc, part=part)

    def _close(self, item: _Item, status: str) -> None:
        """The done events of an open item, and its final shape."""
        loc = {"item_id": item.id, "output_index": item.index}
        if item.kind == "message":
            if item.parts:
                self._close_part(item, self._finish == "content_filter")
            content = [_text_part("".join(t)) if k == "output_text" else {"type": "refusal", "refusal": "".join(t)}
                       for k, t in item.parts]
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
                if cur is not None:
                    self._close(cur, "completed")
                cur = self._current = self._add("reasoning", "rs_")
                cur.parts.append(("summary_text", []))
                self._ev("response.output_item.added", output_index=cur.index,
                         item={"id": cur.id, "type": "reasoning", "summary": []})
                self._ev("response.reasoning_summary_part.added", item_id=cur.id, output_index=cur.index,
                         summary_index=0, part={"type": "summary_text", "text": ""})
            cur.parts[0][1].append(ev.text)
            self._ev("response.reasoning_summary_text.delta", item_id=cur.id, output_index=cur.index,
                     summary_index=0, delta=ev.text)
            return
        kind = "output_text" if ev.channel == "text" else "refusal"
        if cur is None or cur.kind != "message":
            if cur is not None:
                self._close(cur, "completed")
            cur = self._open_message()
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
            if self._current is not None:
                self._close(self._current, "completed")
                self._current = None
            self._text_ev = None
            item = self._add("function_call", "fc_")
            item.call_id = ev.id or new_id("call_")
            item.name = ev.name or ""
            item.parts.append(("arguments", []))
            self._calls[ev.call_index] = item
            self._ev("response.output_item.added", output_index=item.index,
                     item=_call_item(item.id, item.call_id, item.name, "", "in_progress"))
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
        seq = self._seq
        self._seq += 1
        return frame({"type": "error", "code": code, "message": message, "param": None, "sequence_number": seq},
                     "error")


def stream_encoder(ex: Exchange) -> ResponsesStreamEncoder:
    return ResponsesStreamEncoder(ex)


# --------------------------------------------------------------------------- errors and models

# Errors are the OpenAI shape (`{"error": {message, type, param, code}}`), the same on every OpenAI
# endpoint; upstream errors are decoded by the upstream's dialect, so these only delegate.
error_body = _openai.error_body
decode_error = _openai.decode_error


def encode_models(models: list[ModelInfo]) -> dict[str, Any]:
    return _openai.encode_models(models)


def encode_model(m: ModelInfo) -> dict[str, Any]:
    return _openai.encode_model(m)


def decode_models(body: bytes) -> list[ModelInfo]:
    return _openai.decode_models(body)

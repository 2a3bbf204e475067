"""The OpenAI Responses API (`POST /v1/responses`) as a client-facing codec over chat upstreams (the
client half only: no upstream is asked in this dialect). Wire shapes: wire_formats.md §8, checked against
the `openai` SDK's types and stream accumulator. The request and answer mapping, what a decoded request
keeps in `Exchange.client` / `extra["openai"]`, and what is dropped or refused: docs/dialects.md."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gateway.dialects import _common as _c
from gateway.dialects._common import REQ, MessageRules, Reader
from gateway.dialects._common import decode_error as decode_error  # errors: the OpenAI shape
from gateway.dialects._common import error_body as error_body
from gateway.dialects.base import DialectError
from gateway.dialects.media import decode_responses_part
from gateway.dialects.responses_stream import ResponsesStreamEncoder
from gateway.dialects.responses_stream import encode_response as encode_response  # the answer side
from gateway.dialects.responses_stream import error_frame as error_frame
from gateway.dialects.responses_stream import response_id as response_id
from gateway.types import Exchange, Message, Part, Role, ToolCall, new_id

NAME = "responses"
name = NAME  # the module itself is the dialect, as gateway/dialects/openai.py

INPUT_ROLES: dict[str, Role] = {"user": "user", "assistant": "assistant", "system": "system", "developer": "developer"}
TOOL_CHOICES = frozenset(("none", "auto", "required"))
_CHAT_PASSTHROUGH = ("safety_identifier", "prompt_cache_key", "prompt_cache_retention", "service_tier")
# Chat parameters: (Responses key, neutral key, reader); each is echoed back in the Response.
_PARAMS = (("temperature", "temperature", Reader.num), ("top_p", "top_p", Reader.num),
           ("max_output_tokens", "max_tokens", Reader.int_), ("user", "user", Reader.str_))
# Keys only checked and echoed back in the Response (no chat counterpart): (reader, the echo's default).
_ECHOED: dict[str, tuple[Callable[[Reader, Any, str], Any], Any]] = {
    "store": (Reader.bool_, True), "metadata": (Reader.obj, None), "truncation": (Reader.str_, "disabled"),
    "top_logprobs": (Reader.int_, None), "max_tool_calls": (Reader.int_, None)}
# Top-level request keys read by `decode_request`; any other key is dropped (a chat upstream
# would reject a Responses-only key) and listed in `client["ignored"]`.
_KNOWN = frozenset(("model", "input", "instructions", "tools", "tool_choice", "parallel_tool_calls", "text",
                    "reasoning", "stream", "previous_response_id", "conversation", "include", "stream_options",
                    "background", "prompt", *_CHAT_PASSTHROUGH, *_ECHOED, *(key for key, _, _ in _PARAMS)))


def _fail(message: str, param: str | None, code: str) -> DialectError:
    return DialectError(message, status=400, param=param, code=code)


# Message parts: text-like parts become text (a guard must see an assistant refusal in the history like
# any other text); media by `media.py`. A function_call_output's output is text only (a chat tool message is).
_PARTS = MessageRules(roles=INPUT_ROLES, texts={"input_text": "text", "output_text": "text", "refusal": "refusal"},
                      image_roles=frozenset(INPUT_ROLES), media=decode_responses_part,
                      unknown_code="unsupported_content")
_OUTPUT_PARTS = MessageRules(roles={}, texts={"input_text": "text"}, image_roles=frozenset(),
                             unknown_code="unsupported_content")


def _content(v: Any, r: Reader, p: str, rules: MessageRules, role: str) -> list[Part]:
    if v is None:
        r.fail(f"'{p}' is required", p)
    return _c.decode_parts(v, r, p, rules, role)


def _decode_items(items: list[Any], r: Reader, out: list[Message]) -> None:
    for i, item in enumerate(items):
        p = f"input[{i}]"
        item = r.obj(item, p)
        typ = item.get("type")
        if typ is None or typ == "message":
            role = item.get("role")
            if not isinstance(role, str) or role not in INPUT_ROLES:
                r.fail(f"'{p}.role' must be one of {sorted(INPUT_ROLES)}", f"{p}.role")
            out.append(Message(INPUT_ROLES[role], _content(item.get("content"), r, f"{p}.content", _PARTS, role)))
        elif typ == "function_call":
            tc = ToolCall(r.str_(item.get("call_id"), f"{p}.call_id"), r.str_(item.get("name"), f"{p}.name"),
                          _c.arguments_str(item.get("arguments"), r, f"{p}.arguments"))
            # Chat wants every call of a turn on one assistant message, answered by the tool
            # messages after it: a call joins the assistant turn right before it.
            if out and out[-1].role == "assistant":
                out[-1].tool_calls.append(tc)
            else:
                out.append(Message("assistant", tool_calls=[tc]))
        elif typ == "function_call_output":
            out.append(Message("tool", _content(item.get("output"), r, f"{p}.output", _OUTPUT_PARTS, "tool"),
                               tool_call_id=r.str_(item.get("call_id"), f"{p}.call_id")))
        elif typ == "item_reference":
            raise _fail(f"'{p}': item_reference points at an item stored upstream, which no guard can read; "
                        "send the item itself", f"{p}.type", "unsupported_item")
        elif typ != "reasoning":  # a previous turn's reasoning: no chat input slot, and not input
            raise _fail(f"'{p}': input items of type {typ!r} are not supported (only message, function_call, "
                        "function_call_output and reasoning)", f"{p}.type", "unsupported_item")


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
        d = _c.function_def(t, r, p)  # flat: the function's fields sit on the tool itself
        neutral.append(d)
        echo.append({"type": "function", "name": d["name"], **{k: d.get(k) for k in ("description", "parameters",
                                                                                         "strict")}})
    if unsupported:
        raise _fail(f"tools of type {', '.join(sorted(set(unsupported)))} are not supported: Guardgate answers the "
                    "Responses API through a chat upstream, which runs no built-in tools; use function tools", "tools",
                    "unsupported_tool")
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
    js = {"name": r.str_(fmt.get("name"), "text.format.name"), "schema": r.obj(fmt.get("schema"), "text.format.schema")}
    for k, read in (("description", r.str_), ("strict", r.bool_)):
        if fmt.get(k) is not None:
            js[k] = read(fmt[k], f"text.format.{k}")
    return {"type": "json_schema", "json_schema": js}


def _conversation_id(v: Any, r: Reader) -> str:
    if isinstance(v, str):
        return v
    return r.str_(r.obj(v, "conversation").get("id"), "conversation.id")


def decode_payload(obj: dict[str, Any]) -> Exchange:
    """A Responses request, parsed as a JSON object → the neutral exchange (docs/dialects.md, every field)."""
    r, model = REQ, _c.model_of(obj)
    if obj.get("background"):
        raise _fail("'background' responses are not supported by the gateway", "background", "unsupported_parameter")
    if isinstance(obj.get("prompt"), dict):  # a template reference; any other `prompt` is not the API's
        raise _fail("'prompt' templates are stored upstream, where no guard can read them; send the instructions "
                    "and input themselves", "prompt", "unsupported_parameter")
    prev = r.opt_str(obj.get("previous_response_id"), "previous_response_id")
    conv = _conversation_id(obj["conversation"], r) if obj.get("conversation") is not None else None
    if prev is not None and conv is not None:
        r.fail("'previous_response_id' and 'conversation' cannot both be set", "conversation")
    instructions = r.opt_str(obj.get("instructions"), "instructions")
    messages = [Message.of("system", instructions)] if instructions else []
    inp = obj.get("input")
    items = [{"type": "message", "role": "user", "content": inp}] if isinstance(inp, str) \
        else [] if inp is None else r.list_(inp, "input")
    _decode_items(items, r, messages)
    if not messages and prev is None and conv is None:
        r.fail("'input' is required", "input")

    params: dict[str, Any] = {}
    extra: dict[str, Any] = {}
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
    ptc = None if obj.get("parallel_tool_calls") is None else r.bool_(obj["parallel_tool_calls"], "parallel_tool_calls")
    if ptc is not None and params.get("tools"):  # chat refuses parallel_tool_calls without tools
        extra["parallel_tool_calls"] = ptc
    text = r.obj(obj["text"], "text") if obj.get("text") is not None else {}
    if text.get("format") is not None:
        params["response_format"] = _decode_format(text["format"], r)
    if text.get("verbosity") is not None:
        extra["verbosity"] = r.str_(text["verbosity"], "text.verbosity")
    for key, neutral, read in _PARAMS:
        if obj.get(key) is not None:
            params[neutral] = read(r, obj[key], key)
    reasoning = r.obj(obj["reasoning"], "reasoning") if obj.get("reasoning") is not None else {}
    effort = r.opt_str(reasoning.get("effort"), "reasoning.effort")
    if effort is not None:
        extra["reasoning_effort"] = effort
    summary = r.opt_str(reasoning.get("summary", reasoning.get("generate_summary")), "reasoning.summary")
    for k in _CHAT_PASSTHROUGH:
        if obj.get(k) is not None:
            extra[k] = r.str_(obj[k], k)
    echo = {k: default if obj.get(k) is None else read(r, obj[k], k) for k, (read, default) in _ECHOED.items()}
    for k, v in (echo["metadata"] or {}).items():
        r.str_(v, f"metadata.{k}")
    if obj.get("include") is not None:
        r.list_(obj["include"], "include")

    ex = Exchange(model=model, messages=messages, params=params)
    if obj.get("stream") is not None:
        ex.stream = r.bool_(obj["stream"], "stream")
    ex.include_usage = ex.stream  # the final Response carries usage: always ask for it
    if extra:
        ex.extra["openai"] = extra
    echo.update(instructions=instructions, tools=echo_tools, tool_choice="auto" if tool_choice is None else tool_choice,
                parallel_tool_calls=True if ptc is None else ptc, previous_response_id=prev,
                conversation=None if conv is None else {"id": conv}, reasoning={"effort": effort, "summary": summary},
                text={**text, "format": text.get("format") or {"type": "text"}}, background=False,
                metadata=echo["metadata"] or {}, **{key: params.get(neutral) for key, neutral, _ in _PARAMS},
                **{k: extra.get(k) for k in _CHAT_PASSTHROUGH})
    ignored = sorted(k for k in obj if k not in _KNOWN or (k == "prompt" and obj[k] is not None))
    ex.client = {"response_id": new_id("resp_"), "previous_response_id": prev, "conversation": conv, "input": items,
                 "echo": echo, "ignored": ignored}
    return ex


decode_request = _c.request_decoder(decode_payload)


stream_encoder = ResponsesStreamEncoder  # in `responses_stream.py`

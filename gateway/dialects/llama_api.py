"""The Meta Llama API native dialect (`/llama/v1`, SDK `llama-api-client`): wire_formats.md §3, §4.3.
What is carried, mapped, dropped and refused, field by field: docs/dialects.md."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from gateway.dialects import _common as _c
from gateway.dialects._common import decode_error as decode_error
from gateway.dialects._common import decode_models as decode_models
from gateway.dialects._common import encode_model as encode_model
from gateway.dialects._common import encode_models as encode_models
from gateway.dialects.base import ModerationRequest, ModerationResult
from gateway.dialects.llama_stream import (  # re-exported: importers find them here
    _TEXT_OUT,
    LlamaStreamDecoder,
    LlamaStreamEncoder,
    _metrics,
    _usage_from_metrics,
    error_body,  # noqa: F401  (the dialect's error_body; beside the encoder that writes it)
    stop_reason_in,
    stop_reason_out,
)
from gateway.dialects.media import encode_llama_part, llama_media_part, text_only
from gateway.types import (
    Completion,
    Message,
    new_id,
)

NAME = "llama"
name = NAME  # the module itself is the `Dialect` (see gateway/dialects/__init__.py)
if TYPE_CHECKING:  # annotations only
    from gateway.types import Exchange, Part

_KNOWN_REQ = frozenset(
    (
        "model", "messages", "stream", "max_completion_tokens", "repetition_penalty", "response_format",
        "temperature", "tool_choice", "tools", "top_k", "top_p", "user",
    )
)


# --------------------------------------------------------------------------- requests


MESSAGES = _c.MessageRules(
    roles={"system": "system", "user": "user", "assistant": "assistant", "tool": "tool"},
    texts={"text": "text"},
    image_roles=frozenset(("user",)),
    media=llama_media_part,  # image_url (dialects/media.py)
    object_content=True,  # an assistant's content is one object
    stop_reason=True,
)


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


def _text_items(parts: list[Part]) -> str | list[dict[str, Any]]:
    texts = [p.text for p in parts if p.type == "text"]
    if len(texts) == 1:
        return texts[0]
    if not texts:
        return ""
    return [{"type": "text", "text": t} for t in texts]


def encode_messages(messages: list[Message]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for m in messages:
        role = "system" if m.role == "developer" else m.role
        d: dict[str, Any] = {"role": role}
        if role != "user":
            text_only(m.parts, role, "Llama API")
        if role == "user":
            if len(m.parts) == 1 and m.parts[0].type == "text":
                d["content"] = m.parts[0].text
            elif not m.parts:
                d["content"] = ""
            else:
                d["content"] = [
                    {"type": "text", "text": p.text} if p.type == "text" else encode_llama_part(p) for p in m.parts
                ]
        elif role == "assistant":
            texts = [p.text for p in m.parts if p.type == "text"]
            if texts:
                d["content"] = {"type": "text", "text": "".join(texts)}
            if m.stop_reason is not None:
                d["stop_reason"] = stop_reason_out(m.stop_reason)
            if m.tool_calls:
                d["tool_calls"] = [
                    {"id": tc.id, "function": {"name": tc.name, "arguments": tc.arguments}}
                    for tc in m.tool_calls
                ]
        else:  # system, tool
            d["content"] = _text_items(m.parts)
            if role == "tool":
                d["tool_call_id"] = m.tool_call_id or ""
        out.append(d)
    return out


def _encode_response_format(rf: dict[str, Any]) -> dict[str, Any] | None:
    typ = rf.get("type")
    if typ == "text":
        return {"type": "text"}
    if typ == "json_schema" and isinstance(rf.get("json_schema"), dict):
        js = rf["json_schema"]
        out: dict[str, Any] = {}
        if "name" in js:
            out["name"] = js["name"]
        if "schema" in js:
            out["schema"] = js["schema"]
        return {"type": "json_schema", "json_schema": out}
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
    if p.get("response_format") is not None:
        rf = _encode_response_format(p["response_format"])
        if rf is not None:
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


# --------------------------------------------------------------------------- non-stream responses

def decode_response(body: bytes) -> Completion:
    obj = _c.load_object(body, status=502, what="upstream response")
    r = _c.UP
    cm = r.obj(obj.get("completion_message"), "completion_message")
    msg = Message(role="assistant")
    content = cm.get("content")
    if content:
        msg.parts = [
            p for p in _c.decode_parts(content, r, "completion_message.content", MESSAGES, "assistant") if p.text
        ]
    if cm.get("tool_calls") is not None:
        msg.tool_calls = _c.decode_tool_calls(cm["tool_calls"], r, "completion_message.tool_calls")
    usage = _usage_from_metrics(obj["metrics"], r, "metrics") if obj.get("metrics") is not None else None
    c = Completion(
        id=r.opt_str(obj.get("id"), "id") or new_id("chatcmpl-"),
        model="",
        message=msg,
        finish_reason=stop_reason_in(cm.get("stop_reason")),
        usage=usage,
        created=int(time.time()),
    )
    top = {k: v for k, v in obj.items() if k not in ("id", "completion_message", "metrics", "guardgate")}
    if top:
        c.extra[NAME] = {"top": top}
    return c


def encode_response(c: Completion, ex: Exchange) -> dict[str, Any]:
    m = c.message
    cm: dict[str, Any] = {
        "role": "assistant",
        "content": {"type": "text", "text": "".join(p.text for p in m.parts if p.type in _TEXT_OUT)},
        "stop_reason": stop_reason_out(c.finish_reason),
    }
    if m.tool_calls:
        cm["tool_calls"] = [
            {"id": tc.id, "function": {"name": tc.name, "arguments": tc.arguments}} for tc in m.tool_calls
        ]
    out: dict[str, Any] = {"id": c.id, "completion_message": cm}
    if c.usage is not None:
        out["metrics"] = _metrics(c.usage)
    for k, v in ((c.extra.get(NAME) or {}).get("top") or {}).items():
        out.setdefault(k, v)
    if c.extra.get("guardgate") is not None:
        out["guardgate"] = c.extra["guardgate"]
    return out


# --------------------------------------------------------------------------- streams
# The decoder and encoder classes live in `llama_stream.py`.


def stream_decoder() -> LlamaStreamDecoder:
    return LlamaStreamDecoder()


def stream_encoder(ex: Exchange) -> LlamaStreamEncoder:
    return LlamaStreamEncoder(ex)


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
    if len(req.inputs) == 1:
        messages = encode_messages(req.inputs[0])
    else:
        messages = encode_messages(
            [Message.of("user", "\n".join(m.text for m in conv)) for conv in req.inputs]
        )
    body: dict[str, Any] = {"messages": messages}
    if req.model:
        body["model"] = req.model
    return body


def encode_moderation_response(
    results: list[ModerationResult], *, model: str, id: str | None = None
) -> dict[str, Any]:
    return {
        "model": model,
        "results": [
            {
                "flagged": bool(res.get("flagged")),
                "flagged_categories": sorted(
                    {_c.category_code(c) for c in res.get("categories") or []}, key=_c.code_order
                ),
            }
            for res in results
        ],
    }


def decode_moderation_response(body: bytes) -> list[ModerationResult]:
    obj = _c.load_object(body, status=502, what="upstream moderation response")
    r = _c.UP
    out: list[ModerationResult] = []
    for i, res in enumerate(r.list_(obj.get("results"), "results")):
        p = f"results[{i}]"
        res = r.obj(res, p)
        cats = [
            _c.category_code(r.str_(c, f"{p}.flagged_categories[]"))
            for c in r.list_(res.get("flagged_categories") or [], f"{p}.flagged_categories")
        ]
        out.append(
            {
                "flagged": r.bool_(res.get("flagged", bool(cats)), f"{p}.flagged"),
                "categories": sorted(set(cats), key=_c.code_order),
                "scores": {},
            }
        )
    return out

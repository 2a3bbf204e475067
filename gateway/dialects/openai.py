"""The OpenAI Chat Completions dialect (also the Llama API's `/compat/v1` surface): wire_formats.md §1,
§2, §4.2. What is carried, mapped, dropped and refused, field by field: docs/dialects.md."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from gateway.dialects import _common as _c
from gateway.dialects._common import REQ, UP, MessageRules, Reader, arguments_str, decode_parts, decode_tool_calls
from gateway.dialects._common import decode_error as decode_error
from gateway.dialects._common import decode_models as decode_models
from gateway.dialects._common import encode_models as encode_models
from gateway.dialects._common import error_body as error_body
from gateway.dialects.base import ModerationRequest, ModerationResult
from gateway.dialects.media import decode_chat_part, encode_chat_part, text_only
from gateway.dialects.openai_stream import (  # re-exported: importers find them here
    _REASONING_KEYS,
    FINISH_REASONS,
    NAME,
    OpenAIStreamDecoder,
    OpenAIStreamEncoder,
    _usage_dict,
    decode_usage,
    legacy_functions,
)
from gateway.types import Attached, Choice, Completion, Message, Part, ToolCall, new_id

if TYPE_CHECKING:  # annotations only
    from gateway.types import Exchange

name = NAME  # the module itself is the `Dialect` (see gateway/dialects/__init__.py)
# Field a translated request uses for the token limit: the one every OpenAI-compatible server
# (vLLM, llama.cpp, TGI, Ollama) and the OpenAI service for non-reasoning models accept.
DEFAULT_MAX_TOKENS_FIELD = "max_tokens"

_FLOAT_PARAMS = ("temperature", "top_p", "frequency_penalty", "presence_penalty", "repetition_penalty")
_INT_PARAMS = ("top_k", "n", "seed")
_KNOWN_REQ = frozenset(("model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens", "stop",
                        "user", "tools", "tool_choice", "response_format", *_FLOAT_PARAMS, *_INT_PARAMS))

MESSAGES = MessageRules(
    roles={"system": "system", "developer": "developer", "user": "user", "assistant": "assistant", "tool": "tool",
           "function": "tool"},  # a legacy function result: a tool message without tool_call_id
    texts={"text": "text", "refusal": "refusal"},
    image_roles=frozenset(("system", "developer", "user", "assistant", "tool", "function")),
    names=True, assistant_refusal=True, media=decode_chat_part)  # media: image_url, input_audio, file
ANSWER_PARTS = replace(MESSAGES, channels={"refusal": "refusal"})  # an answer's refusal parts stay refusals


def decode_payload(obj: dict[str, Any]) -> Exchange:
    """A request already parsed as a JSON object (the router parses each body once) → the exchange."""
    r = REQ
    ex, extra = _c.decode_chat(obj, MESSAGES, _FLOAT_PARAMS, _INT_PARAMS)
    params = ex.params
    so = obj.get("stream_options")
    if so is not None:
        so = r.obj(so, "stream_options")
        if so.get("include_usage") is not None:
            ex.include_usage = r.bool_(so["include_usage"], "stream_options.include_usage") and ex.stream
        rest = {k: v for k, v in so.items() if k != "include_usage"}
        if rest:
            extra["stream_options"] = rest
    if obj.get("max_completion_tokens") is not None:
        params["max_tokens"] = r.int_(obj["max_completion_tokens"], "max_completion_tokens")
        ex.extra["openai_max_tokens_field"] = "max_completion_tokens"
    elif obj.get("max_tokens") is not None:
        params["max_tokens"] = r.int_(obj["max_tokens"], "max_tokens")
    stop = obj.get("stop")
    if stop is not None:
        params["stop"] = stop if isinstance(stop, str) else [r.str_(s, f"stop[{i}]") for i, s in
                                                               enumerate(r.list_(stop, "stop"))]
    if obj.get("tools") is not None:
        params["tools"], other = _c.decode_tool_defs(obj["tools"], r, "tools")
        if other:
            extra["tools_other"] = other
    return _c.keep_extra(ex, NAME, extra, obj, _KNOWN_REQ)


decode_request = _c.request_decoder(decode_payload)


def _encode_content(parts: list[Part], *, assistant: bool) -> Any:
    if len(parts) == 1 and parts[0].type == "text":
        return parts[0].text
    if not parts:
        return None if assistant else ""
    if assistant:  # assistant content parts are text only
        text_only(parts, "assistant", "OpenAI chat")
        return "".join(p.text for p in parts if p.type == "text")
    return [{"type": "text", "text": p.text} if p.type == "text" else encode_chat_part(p) for p in parts]


def encode_messages(messages: list[Message]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for m in messages:
        if m.role == "tool" and m.tool_call_id is None and m.name is not None:  # legacy function result
            out.append({"role": "function", "name": m.name, "content": m.text})
            continue
        d: dict[str, Any] = {"role": m.role, "content": _encode_content(m.parts, assistant=m.role == "assistant")}
        if m.name is not None:
            d["name"] = m.name
        if m.role == "assistant" and m.tool_calls:
            d["tool_calls"] = _c.encode_tool_calls(m.tool_calls)
        if m.role == "tool":
            d["tool_call_id"] = m.tool_call_id or ""
        out.append(d)
    return out


def encode_request(ex: Exchange) -> dict[str, Any]:
    body: dict[str, Any] = {"model": ex.model, "messages": encode_messages(ex.messages)}
    p = ex.params
    extra: dict[str, Any] = ex.extra.get(NAME) or {}
    for k in (*_FLOAT_PARAMS, *_INT_PARAMS, "stop", "user", "response_format"):
        if p.get(k) is not None:
            body[k] = p[k]
    if p.get("max_tokens") is not None:
        body[ex.extra.get("openai_max_tokens_field", DEFAULT_MAX_TOKENS_FIELD)] = p["max_tokens"]
    if p.get("tools") or extra.get("tools_other"):
        body["tools"] = _c.encode_tool_defs(p.get("tools") or []) + list(extra.get("tools_other") or [])
    if p.get("tool_choice") is not None:
        body["tool_choice"] = _c.encode_tool_choice(p["tool_choice"])
    if ex.stream:
        body["stream"] = True
        so = dict(extra.get("stream_options") or {})
        if ex.include_usage:
            so["include_usage"] = True
        if so:
            body["stream_options"] = so
    for k, v in extra.items():
        if k not in ("stream_options", "tools_other") and k not in body:
            body[k] = v
    return body


def _map_finish(v: Any) -> str:
    return v if isinstance(v, str) and v else "stop"


# The keys of an answer's `choices[i].message` / `choices[i]` that have a rule (docs/configuration.md,
# "What the output and stream stages see", gives each one's); any other key is dropped: nothing
# model-written reaches the client without a rule.
MESSAGE_FIELDS = ("role", "content", "refusal", "reasoning_content", "reasoning", "tool_calls", "function_call",
                  "audio", "annotations")
CHOICE_FIELDS = ("index", "message", "finish_reason", "logprobs")


def _strings(v: Any, out: list[str]) -> None:
    """Every string inside a JSON value (dict keys excluded, `type` tags skipped)."""
    if isinstance(v, str):
        if v:
            out.append(v)
    elif isinstance(v, dict):
        for k, x in v.items():
            if k != "type":
                _strings(x, out)
    elif isinstance(v, list):
        for x in v:
            _strings(x, out)


def _spelled(items: list[dict[str, Any]]) -> str | None:
    """The text a logprobs list spells. A token that is part of a UTF-8 character (an emoji, an
    accented letter) has no text of its own: its `bytes` are the truth, its `token` an escape."""
    try:
        return b"".join(bytes(t["bytes"]) if isinstance(t.get("bytes"), list) else t["token"].encode()
                        for t in items).decode()
    except (ValueError, TypeError):  # not bytes, or not UTF-8 (UnicodeDecodeError is a ValueError)
        return None


def _logprobs(v: Any, parts: list[Part]) -> Attached | None:
    """A choice's `logprobs`, kept only if each list's tokens spell exactly that channel's text."""
    if not isinstance(v, dict):
        return None
    kept: dict[str, Any] = {}
    for key, channel in (("content", "text"), ("refusal", "refusal")):
        items = v.get(key)
        if items is None:
            continue
        if not isinstance(items, list) or not all(isinstance(t, dict) and isinstance(t.get("token"), str)
                                                  for t in items):
            return None
        if _spelled(items) != "".join(p.text for p in parts if p.type == channel):
            return None
        kept[key] = [{**t, "top_logprobs": []} if "top_logprobs" in t else t for t in items]
    return Attached(NAME, "logprobs", kept, channels=("text", "refusal")) if kept else None


def _decode_choice(ch: Any, i: int, r: Reader) -> Choice:
    p = f"choices[{i}]"
    ch = r.obj(ch, p)
    m = r.obj(ch.get("message"), f"{p}.message")
    msg = Message(role="assistant")
    choice = Choice(msg, _map_finish(ch.get("finish_reason")))
    idx = ch.get("index")
    choice.index = r.int_(idx, f"{p}.index") if idx is not None else i
    if m.get("content"):  # "" / null: no text part
        msg.parts = decode_parts(m["content"], r, f"{p}.message.content", ANSWER_PARTS, "assistant")
    if m.get("refusal"):
        msg.parts.append(Part("refusal", r.str_(m["refusal"], f"{p}.message.refusal")))
    for key in _REASONING_KEYS:
        if m.get(key):
            msg.parts.append(Part("reasoning", r.str_(m[key], f"{p}.message.{key}")))
            if key != "reasoning_content":
                choice.attached.append(Attached(NAME, "reasoning_field", key, channels=("reasoning",)))
            break
    if m.get("tool_calls") is not None:
        msg.tool_calls = decode_tool_calls(m["tool_calls"], r, f"{p}.message.tool_calls")
    if m.get("function_call") is not None:
        fc = r.obj(m["function_call"], f"{p}.message.function_call")
        msg.tool_calls.append(ToolCall("", r.str_(fc.get("name"), f"{p}.message.function_call.name"),
                                       arguments_str(fc.get("arguments"), r, f"{p}.message.function_call.arguments")))
    audio = m.get("audio")
    if audio is not None:
        audio = r.obj(audio, f"{p}.message.audio")
        transcript = audio.get("transcript")
        if transcript:
            msg.parts.append(Part("transcript", r.str_(transcript, f"{p}.message.audio.transcript")))
        rest = {k: v for k, v in audio.items() if k != "transcript"}
        if rest:
            choice.attached.append(Attached(NAME, "audio", rest, channels=("transcript",)))
    ann = m.get("annotations")
    if ann is not None:
        texts: list[str] = []
        _strings(ann, texts)
        choice.attached.append(Attached(NAME, "annotations", ann, text="\n".join(texts), channels=("text",)))
    lp = _logprobs(ch.get("logprobs"), msg.parts)
    if lp is not None:
        choice.attached.append(lp)
    return choice


def decode_response(body: bytes) -> Completion:
    obj = _c.load_object(body, status=502, what="upstream response")
    r = UP
    choices = [_decode_choice(ch, i, r) for i, ch in enumerate(r.list_(obj.get("choices"), "choices"))]
    if len({ch.index for ch in choices}) != len(choices):  # each choice is guarded by its index
        for i, ch in enumerate(choices):
            ch.index = i
    extra: dict[str, Any] = {}
    u = obj.get("usage")
    usage = None if u is None else decode_usage(u, r)
    ux = {k: v for k, v in u.items() if k not in ("prompt_tokens", "completion_tokens", "total_tokens")} if u else None
    if ux:
        extra["usage"] = ux
    top = {k: v for k, v in obj.items()
           if k not in ("id", "object", "created", "model", "choices", "usage", "guardgate") and v is not None}
    if top:
        extra["top"] = top
    created = obj.get("created")
    c = Completion(id=r.opt_str(obj.get("id"), "id") or new_id("chatcmpl-"), model=r.opt_str(obj.get("model"), "model")
                   or "", usage=usage, created=r.int_(created, "created") if created is not None else int(time.time()),
                   choices=choices or [Choice(Message("assistant"))])
    if extra:
        c.extra[NAME] = extra
    return c


def _encode_choice(ch: Choice, legacy: bool) -> dict[str, Any]:
    m = ch.message
    by: dict[str, list[str]] = {}
    for p in m.parts:
        if p.type != "image":
            by.setdefault(p.type, []).append(p.text)
    att = {a.key: a.value for a in ch.attached if a.dialect == NAME}
    texts = by.get("text")
    content: str | None = "".join(texts) if texts else (None if m.tool_calls or "refusal" in by else "")
    msg: dict[str, Any] = {"role": "assistant", "content": content,
                           "refusal": "".join(by["refusal"]) if "refusal" in by else None}
    if "reasoning" in by:
        msg[att.get("reasoning_field", "reasoning_content")] = "".join(by["reasoning"])
    if m.tool_calls:
        if legacy and len(m.tool_calls) == 1:
            tc = m.tool_calls[0]
            msg["function_call"] = {"name": tc.name, "arguments": tc.arguments}
        else:
            msg["tool_calls"] = _c.encode_tool_calls(m.tool_calls)
    if "transcript" in by or "audio" in att:
        msg["audio"] = {**(att.get("audio") or {}), "transcript": "".join(by.get("transcript", ()))}
    if "annotations" in att:
        msg["annotations"] = att["annotations"]
    fr = ch.finish_reason if ch.finish_reason in FINISH_REASONS else "stop"
    return {"index": ch.index, "message": msg, "logprobs": att.get("logprobs"), "finish_reason": fr}


def encode_response(c: Completion, ex: Exchange) -> dict[str, Any]:
    ox: dict[str, Any] = c.extra.get(NAME) or {}
    legacy = legacy_functions(ex)
    out: dict[str, Any] = {"id": c.id, "object": "chat.completion", "created": c.created, "model": c.model or ex.model,
                           "choices": [_encode_choice(ch, legacy) for ch in c.choices]}
    if c.usage is not None:
        out["usage"] = _usage_dict(c.usage, ox.get("usage"))
    for k, v in (ox.get("top") or {}).items():
        out.setdefault(k, v)
    if c.extra.get("guardgate") is not None:
        out["guardgate"] = c.extra["guardgate"]
    return out


# --------------------------------------------------------------------------- moderations

# Llama Guard code → OpenAI categories it implies. S6 (specialized advice), S7 (privacy), S8 (IP)
# and S13 (elections) have no OpenAI counterpart: they set `flagged` and appear only in the
# `guardgate.categories` extra of each result.
CODE_TO_OPENAI: dict[str, tuple[str, ...]] = {
    "S1": ("violence", "illicit/violent"), "S2": ("illicit",), "S3": ("sexual", "illicit"), "S4": ("sexual/minors",),
    "S5": ("harassment",), "S9": ("illicit/violent", "violence"), "S10": ("hate",), "S11": ("self-harm",),
    "S12": ("sexual",), "S14": ("illicit",),
}
OPENAI_TO_CODE: dict[str, str] = {
    "harassment": "S5", "harassment/threatening": "S1", "hate": "S10", "hate/threatening": "S10", "illicit": "S2",
    "illicit/violent": "S1", "self-harm": "S11", "self-harm/instructions": "S11", "self-harm/intent": "S11",
    "sexual": "S12", "sexual/minors": "S4", "violence": "S1", "violence/graphic": "S1",
}
OPENAI_CATEGORIES = tuple(OPENAI_TO_CODE)  # every OpenAI moderation category, with its Llama Guard code
assert set(CODE_TO_OPENAI) <= set(_c.LLAMA_GUARD_CATEGORIES)


def decode_moderation_request(body: bytes | dict[str, Any]) -> ModerationRequest:
    """`input`: a string (one input), a list of strings (one input each) or a list of
    text/image_url parts (one multimodal input). Each input becomes one user message."""
    obj = body if isinstance(body, dict) else _c.load_object(body)  # the router's payload, or raw bytes
    r = REQ
    model = r.opt_str(obj.get("model"), "model")
    inp = obj.get("input")
    if inp is None:
        r.fail("'input' is required", "input")
    if isinstance(inp, str):
        return ModerationRequest(model, [[Message.of("user", inp)]])
    items = r.list_(inp, "input")
    if not items:
        r.fail("'input' must not be empty", "input")
    if all(isinstance(x, str) for x in items):
        return ModerationRequest(model, [[Message.of("user", x)] for x in items])
    if all(isinstance(x, dict) for x in items):
        return ModerationRequest(model, [[Message("user", decode_parts(items, r, "input", MESSAGES, "user"))]])
    r.fail("'input' must be a string, a list of strings or a list of content parts", "input")


def encode_moderation_request(req: ModerationRequest) -> dict[str, Any]:
    """One string per text-only input; a single input with images becomes a list of parts."""
    body: dict[str, Any] = {}
    if req.model:
        body["model"] = req.model
    if len(req.inputs) == 1 and any(p.type == "image" for m in req.inputs[0] for p in m.parts):
        body["input"] = [{"type": "text", "text": p.text} if p.type == "text" else
                         {"type": "image_url", "image_url": {"url": p.image_url or ""}}
                         for m in req.inputs[0] for p in m.parts]
    else:
        texts = ["\n".join(m.text for m in conv) for conv in req.inputs]
        body["input"] = texts[0] if len(texts) == 1 else texts
    return body


def encode_moderation_response(results: list[ModerationResult], *, model: str, id: str | None = None) -> dict[str, Any]:
    out = []
    for res in results:
        codes = [_c.category_code(c) for c in res.get("categories") or []]
        scores = {_c.category_code(k): float(v) for k, v in (res.get("scores") or {}).items()}
        cats = dict.fromkeys(OPENAI_CATEGORIES, False)
        cscores = dict.fromkeys(OPENAI_CATEGORIES, 0.0)
        for code in set(codes) | set(scores):
            s = scores.get(code, 1.0 if code in codes else 0.0)
            for key in CODE_TO_OPENAI.get(code, ()):
                cscores[key] = max(cscores[key], s)
                if code in codes:
                    cats[key] = True
        out.append({"flagged": bool(res.get("flagged")), "categories": cats, "category_scores": cscores,
                    "category_applied_input_types": {k: ["text"] for k in OPENAI_CATEGORIES},
                    "guardgate": {"categories": sorted(set(codes), key=_c.code_order)}})
    return {"id": id or new_id("modr-"), "model": model, "results": out}


def decode_moderation_response(body: bytes) -> list[ModerationResult]:
    obj = _c.load_object(body, status=502, what="upstream moderation response")
    r = UP
    out: list[ModerationResult] = []
    for i, res in enumerate(r.list_(obj.get("results"), "results")):
        p = f"results[{i}]"
        res = r.obj(res, p)
        cats = r.obj(res.get("categories") or {}, f"{p}.categories")
        raw_scores = r.obj(res.get("category_scores") or {}, f"{p}.category_scores")
        codes = {OPENAI_TO_CODE[k] for k, on in cats.items() if on is True and k in OPENAI_TO_CODE}
        scores: dict[str, float] = {}
        for key, s in raw_scores.items():
            code = OPENAI_TO_CODE.get(key)
            if code:
                scores[code] = max(scores.get(code, 0.0), float(r.num(s, f"{p}.category_scores.{key}")))
        out.append({"flagged": r.bool_(res.get("flagged", bool(codes)), f"{p}.flagged"),
                    "categories": sorted(codes, key=_c.code_order), "scores": scores})
    return out


stream_decoder = OpenAIStreamDecoder  # the stream codec classes live in `openai_stream.py`
stream_encoder = OpenAIStreamEncoder

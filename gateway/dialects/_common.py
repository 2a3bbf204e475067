"""Helpers shared by the dialect modules: the errors they raise, strict JSON in, compact JSON out, typed
field access (a leaf: it imports nothing of ours but `gateway.types`).

Every reader here raises `DialectError` (never TypeError/KeyError/...), carrying the JSON path of
the offending field as `param`, so a decoder fed arbitrary bytes fails cleanly.
"""

from __future__ import annotations

import json
import json.encoder
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from json.encoder import encode_basestring
from math import isfinite
from typing import Any, NoReturn, TypedDict

from gateway.types import Exchange, Message, Part, Role, ToolCall


class DialectError(ValueError):
    """A body that does not decode: becomes an error response in the client's dialect."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None,
                 code: str | None = "invalid_request", type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code
        self.type = type


class UpstreamStreamError(DialectError):
    """The upstream stream carried an error event or an undecodable event (mid-stream: a 502).

    Raised by `StreamDecoder.feed`; the server ends the client's stream with `StreamEncoder.error`.
    """

    def __init__(self, message: str, *, code: str | None = "upstream_error", type: str = "upstream_error",
                 status: int = 502) -> None:
        super().__init__(message, status=status, code=code, type=type)


class ModelInfo(TypedDict):
    """One entry of a models list, in neutral form."""

    id: str
    created: int
    owned_by: str


# A JSON string literal for a str, in C, no encoder object per call (hot path).
qstr = encode_basestring

_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), check_circular=False)
# JSONEncoder.encode builds a C encoder on every call; one made once writes the same text, faster.
_C_ENCODE = (json.encoder.c_make_encoder(None, _ENCODER.default, qstr, None, ":", ",", False, False, True)
             if json.encoder.c_make_encoder is not None else None)


def dumps(obj: Any) -> str:
    """Compact JSON text (non-ASCII kept as is; `to_bytes` makes the wire bytes)."""
    if _C_ENCODE is None:
        return _ENCODER.encode(obj)
    return "".join(_C_ENCODE(obj, 0))


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not valid JSON")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)
_loads = _DECODER.decode


def json_bytes(obj: Any) -> bytes:
    """A JSON body (compact, UTF-8): what the gateway sends upstream and answers with."""
    return to_bytes(dumps(obj))


def to_bytes(text: str) -> bytes:
    """UTF-8 bytes of JSON text. A lone surrogate (from a `\\ud800` escape upstream) cannot be
    UTF-8 encoded; it can only sit inside a JSON string, so it is written back as its escape."""
    return text.encode("utf-8", "backslashreplace")


_scan = _DECODER.scan_once


def loads(text: str) -> Any:
    """Strict JSON (no NaN/Infinity); ValueError/RecursionError on anything else.

    Hot path (one call per stream event): the C scanner straight from offset 0, falling back to
    the full decoder (leading whitespace, errors with a message) when that does not fit."""
    try:
        obj, end = _scan(text, 0)
    except StopIteration:
        return _loads(text)
    if end != len(text) and text[end:].strip(" \t\n\r"):
        raise ValueError("extra data after the JSON value")
    return obj


def load_json(body: bytes | str, *, status: int = 400, what: str = "request body") -> Any:
    """Parse any JSON value from raw bytes; DialectError for anything else."""
    if isinstance(body, (bytes, bytearray, memoryview)):
        try:
            text = bytes(body).decode("utf-8")
        except UnicodeDecodeError:
            raise DialectError(f"{what} is not valid UTF-8", status=status, code=_code(status)) from None
    else:
        text = body
    try:
        obj = _loads(text)
    except (ValueError, RecursionError):
        raise DialectError(f"{what} is not valid JSON", status=status, code=_code(status)) from None
    return obj


def load_object(body: bytes | str, *, status: int = 400, what: str = "request body") -> dict[str, Any]:
    """Parse a JSON object from raw bytes; DialectError for anything else."""
    obj = load_json(body, status=status, what=what)
    if not isinstance(obj, dict):
        raise DialectError(f"{what} must be a JSON object", status=status, code=_code(status))
    return obj


BAD = "bad_upstream_response"  # the code of an upstream answer or event that does not decode


def _code(status: int) -> str:
    return "invalid_request" if status < 500 else BAD


class Reader:
    """Typed access to decoded JSON with errors that name the field (`param`)."""

    __slots__ = ("code", "status")

    def __init__(self, status: int = 400) -> None:
        self.status = status
        self.code = _code(status)

    def fail(self, message: str, param: str | None) -> NoReturn:
        raise DialectError(message, status=self.status, param=param, code=self.code)

    def str_(self, v: Any, param: str) -> str:
        if not isinstance(v, str):
            self.fail(f"'{param}' must be a string", param)
        return v

    def opt_str(self, v: Any, param: str) -> str | None:
        return None if v is None else self.str_(v, param)

    def obj(self, v: Any, param: str) -> dict[str, Any]:
        if not isinstance(v, dict):
            self.fail(f"'{param}' must be an object", param)
        return v

    def list_(self, v: Any, param: str) -> list[Any]:
        if not isinstance(v, list):
            self.fail(f"'{param}' must be an array", param)
        return v

    def bool_(self, v: Any, param: str) -> bool:
        if not isinstance(v, bool):
            self.fail(f"'{param}' must be a boolean", param)
        return v

    def num(self, v: Any, param: str) -> float | int:
        # 1e999 parses to inf: neither dialect can carry it (and int(inf) would raise)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not isfinite(v)):
            self.fail(f"'{param}' must be a finite number", param)
        return v

    def int_(self, v: Any, param: str) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            # 1.0 is an integer in JSON Schema terms; accept it
            if isinstance(v, float) and v.is_integer():
                return int(v)
            self.fail(f"'{param}' must be an integer", param)
        return v

    def count(self, v: Any, param: str) -> int:
        """A token count: non-negative number (floats allowed, as Llama metrics are floats)."""
        if v is None:
            return 0
        n = self.num(v, param)
        if n < 0:
            self.fail(f"'{param}' must be >= 0", param)
        return int(n)


REQ = Reader(400)
UP = Reader(502)


def arguments_str(v: Any, r: Reader, param: str) -> str:
    """Tool-call arguments: a JSON string on the wire; some clients send the object itself."""
    if v is None:
        return ""
    if isinstance(v, str):
        return v
    if isinstance(v, (dict, list)):
        return dumps(v)
    r.fail(f"'{param}' must be a string", param)


@dataclass(frozen=True, slots=True)
class MessageRules:
    """One dialect's request messages, as data (`decode_messages` reads them all the same way)."""

    roles: Mapping[str, Role]  # wire role → neutral role
    texts: Mapping[str, str]  # content part type → the key its text is under
    image_roles: frozenset[str]  # roles whose media parts are read by `media` (elsewhere: refused)
    channels: Mapping[str, str] = field(default_factory=dict)  # part type → its text's channel when not "text"
    object_content: bool = False  # content may be one part object instead of a list (Llama assistant)
    names: bool = False  # `name` is read
    assistant_refusal: bool = False  # an assistant's `refusal` is read as text (a guard must see it)
    stop_reason: bool = False  # an assistant's `stop_reason` is read
    # Media parts (image_url, input_audio, file, ...) of roles in `image_roles`: the dialect's decoder
    # from `dialects/media.py` (item, type, reader, param, role) → a Part, or None for a type it does not know.
    media: Callable[[dict[str, Any], str, Reader, str, str], Part | None] | None = None
    unknown_code: str | None = None  # the error code of an unknown part type (default: the reader's)


def decode_parts(content: Any, r: Reader, param: str, rules: MessageRules, role: str) -> list[Part]:
    """A message's content: a string or parts (text-like parts by `rules.texts`, media by `rules.media`)."""
    if content is None:
        return []
    if isinstance(content, str):
        return [Part("text", content)]
    if rules.object_content and isinstance(content, dict):
        content = [content]
    parts: list[Part] = []
    for j, item in enumerate(r.list_(content, param)):
        p = f"{param}[{j}]"
        item = r.obj(item, p)
        typ = item.get("type")
        key = rules.texts.get(typ) if isinstance(typ, str) else None
        if key is not None:
            parts.append(Part(rules.channels.get(typ, "text"), r.str_(item.get(key), f"{p}.{key}")))
        elif rules.media is not None and role in rules.image_roles and isinstance(typ, str) \
                and (media := rules.media(item, typ, r, p, role)) is not None:
            parts.append(media)  # the policy's `content:` rule decides it
        else:
            msg = f"unsupported content part type {typ!r} in a {role} message"
            if rules.unknown_code:
                raise DialectError(msg, param=f"{p}.type", code=rules.unknown_code)
            r.fail(msg, f"{p}.type")
    return parts


def decode_tool_calls(v: Any, r: Reader, param: str) -> list[ToolCall]:
    """`[{"id", "function": {name, arguments}}]` (both dialects; OpenAI custom tools: `custom.input`)."""
    calls = []
    for k, tc in enumerate(r.list_(v, param)):
        p = f"{param}[{k}]"
        tc = r.obj(tc, p)
        kind, args = ("custom", "input") if tc.get("type") == "custom" and isinstance(tc.get("custom"), dict) \
            else ("function", "arguments")
        fn = r.obj(tc.get(kind), f"{p}.{kind}")
        calls.append(ToolCall(r.str_(tc.get("id"), f"{p}.id"), r.str_(fn.get("name"), f"{p}.{kind}.name"),
                              arguments_str(fn.get(args), r, f"{p}.{kind}.{args}")))
    return calls


def decode_messages(v: Any, r: Reader, param: str, rules: MessageRules) -> list[Message]:
    """A request's messages by `rules`: every role checked, every part read or refused."""
    msgs = r.list_(v, param)
    if not msgs:
        r.fail(f"'{param}' must contain at least one message", param)
    out: list[Message] = []
    for i, m in enumerate(msgs):
        p = f"{param}[{i}]"
        m = r.obj(m, p)
        role = m.get("role")
        if not isinstance(role, str) or role not in rules.roles:
            r.fail(f"'{p}.role' must be one of {sorted(rules.roles)}", f"{p}.role")
        msg = Message(rules.roles[role], decode_parts(m.get("content"), r, f"{p}.content", rules, role))
        if rules.names:
            msg.name = r.opt_str(m.get("name"), f"{p}.name")
        if role == "assistant":
            if rules.assistant_refusal and isinstance(m.get("refusal"), str) and m["refusal"]:
                msg.parts.append(Part("text", m["refusal"]))
            if m.get("tool_calls") is not None:
                msg.tool_calls = decode_tool_calls(m["tool_calls"], r, f"{p}.tool_calls")
            if rules.stop_reason and m.get("stop_reason") is not None:
                msg.stop_reason = r.str_(m["stop_reason"], f"{p}.stop_reason")
        elif role == "tool":
            msg.tool_call_id = r.str_(m.get("tool_call_id"), f"{p}.tool_call_id")
        out.append(msg)
    return out


def request_decoder(decode_payload: Callable[[dict[str, Any]], Exchange]) -> Callable[[bytes], Exchange]:
    """A codec's `decode_request`: its `decode_payload` of the body parsed as a JSON object."""

    def decode_request(body: bytes) -> Exchange:
        return decode_payload(load_object(body))

    return decode_request


def model_of(obj: dict[str, Any]) -> str:
    """A request's `model`: a non-empty string."""
    model = obj.get("model")
    if not isinstance(model, str) or not model:
        REQ.fail("'model' is required and must be a non-empty string", "model")
    return model


def decode_chat(obj: dict[str, Any], rules: MessageRules, nums: tuple[str, ...],
                ints: tuple[str, ...]) -> tuple[Exchange, dict[str, Any]]:
    """What a chat request says the same way in both dialects: model, messages, stream, these
    numeric parameters, user, tool choice and response format → (the exchange, the dialect's extras
    so far: a tool choice the other dialect has no shape for)."""
    r = REQ
    model = model_of(obj)
    if "messages" not in obj:
        r.fail("'messages' is required", "messages")
    ex = Exchange(model=model, messages=decode_messages(obj["messages"], r, "messages", rules))
    p, extra = ex.params, {}
    if obj.get("stream") is not None:
        ex.stream = r.bool_(obj["stream"], "stream")
    for keys, read in ((nums, r.num), (ints, r.int_), (("user",), r.str_)):
        for k in keys:
            if obj.get(k) is not None:
                p[k] = read(obj[k], k)
    if obj.get("tool_choice") is not None:
        tc = decode_tool_choice(obj["tool_choice"], r, "tool_choice")
        if tc is None:
            extra["tool_choice"] = obj["tool_choice"]
        else:
            p["tool_choice"] = tc
    if obj.get("response_format") is not None:
        r.str_(r.obj(obj["response_format"], "response_format").get("type"), "response_format.type")
        p["response_format"] = obj["response_format"]
    return ex, extra


def keep_extra(ex: Exchange, name: str, extra: dict[str, Any], obj: dict[str, Any], known: frozenset[str]) -> Exchange:
    """Every request key the dialect has no neutral name for rides in `ex.extra[name]` (its own upstream
    gets it back; any other is never sent it)."""
    extra.update((k, v) for k, v in obj.items() if k not in known)
    if extra:
        ex.extra[name] = extra
    return ex


def decode_tool_defs(tools: Any, r: Reader, param: str) -> tuple[list[dict[str, Any]], list[Any]]:
    """`[{"type":"function","function":{name, description?, parameters?, strict?}}]` (same in both
    dialects) → (neutral function defs, entries of other types kept verbatim)."""
    out: list[dict[str, Any]] = []
    other: list[Any] = []
    for i, t in enumerate(r.list_(tools, param)):
        p = f"{param}[{i}]"
        t = r.obj(t, p)
        if t.get("type", "function") == "function":
            out.append(function_def(r.obj(t.get("function"), f"{p}.function"), r, f"{p}.function"))
        else:
            other.append(t)
    return out, other


def function_def(fn: dict[str, Any], r: Reader, p: str) -> dict[str, Any]:
    """A function tool's definition in neutral form: name, and description, parameters, strict if set."""
    d: dict[str, Any] = {"name": r.str_(fn.get("name"), f"{p}.name")}
    for key, read in (("description", r.str_), ("parameters", r.obj), ("strict", r.bool_)):
        if fn.get(key) is not None:
            d[key] = read(fn[key], f"{p}.{key}")
    return d


_TOOL_FIELDS = ("description", "parameters", "strict")  # a function tool's optional fields


def encode_tool_defs(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"type": "function", "function": {"name": t["name"], **{k: t[k] for k in _TOOL_FIELDS
                                                                    if t.get(k) is not None}}} for t in tools]


def decode_tool_choice(v: Any, r: Reader, param: str) -> str | dict[str, str] | None:
    """`"none"|"auto"|"required"` or `{"type":"function","function":{"name"}}` → str | {"name"};
    None for a shape neither dialect shares (the caller keeps it verbatim)."""
    if isinstance(v, str):
        return v
    d = r.obj(v, param)
    if d.get("type", "function") == "function" and isinstance(d.get("function"), dict):
        return {"name": r.str_(d["function"].get("name"), f"{param}.function.name")}
    return None


def encode_tool_calls(calls: list[ToolCall], typed: bool = True) -> list[dict[str, Any]]:
    """Tool calls as both dialects write them (OpenAI's with `"type": "function"`)."""
    return [{"id": tc.id, **({"type": "function"} if typed else {}),
             "function": {"name": tc.name, "arguments": tc.arguments}} for tc in calls]


def encode_tool_choice(v: str | dict[str, str]) -> str | dict[str, Any]:
    return v if isinstance(v, str) else {"type": "function", "function": {"name": v["name"]}}


# Llama Guard 4 taxonomy (MLCommons + S14), wire_formats.md §3.7.
LLAMA_GUARD_CATEGORIES: dict[str, str] = {
    "S1": "Violent Crimes", "S2": "Non-Violent Crimes", "S3": "Sex-Related Crimes", "S4": "Child Sexual Exploitation",
    "S5": "Defamation", "S6": "Specialized Advice", "S7": "Privacy", "S8": "Intellectual Property",
    "S9": "Indiscriminate Weapons", "S10": "Hate", "S11": "Suicide & Self-Harm", "S12": "Sexual Content",
    "S13": "Elections", "S14": "Code Interpreter Abuse",
}
_NAME_TO_CODE = {v.lower(): k for k, v in LLAMA_GUARD_CATEGORIES.items()}


def category_code(s: str) -> str:
    """'S10' / 's10' / 'Hate' → 'S10'; anything else unchanged."""
    u = s.strip().upper()
    if u in LLAMA_GUARD_CATEGORIES:
        return u
    return _NAME_TO_CODE.get(s.strip().lower(), s)


def code_order(c: str) -> tuple[int, str]:
    return (int(c[1:]), c) if c[:1] == "S" and c[1:].isdigit() else (1 << 30, c)


def encode_model(m: ModelInfo) -> dict[str, Any]:
    return {"id": m["id"], "object": "model", "created": int(m.get("created") or 0),
            "owned_by": m.get("owned_by") or ""}


def encode_models(models: list[ModelInfo]) -> dict[str, Any]:
    """`{"object":"list","data":[...]}` in both dialects (the Llama SDK unwraps `data`, §3.8)."""
    return {"object": "list", "data": [encode_model(m) for m in models]}


def decode_models(body: bytes) -> list[ModelInfo]:
    """A models list, same shape in both dialects: `{"data":[{id, created, owned_by, ...}]}`;
    a bare list or a single model object are accepted too."""
    r = UP
    data = load_json(body, status=502, what="upstream models list")
    if isinstance(data, dict):
        data = data.get("data", [data] if "id" in data else None)
    out: list[ModelInfo] = []
    for i, m in enumerate(r.list_(data, "data")):
        m = r.obj(m, f"data[{i}]")
        out.append({"id": r.str_(m.get("id"), f"data[{i}].id"),
                    "created": r.count(m.get("created"), f"data[{i}].created"),
                    "owned_by": r.opt_str(m.get("owned_by"), f"data[{i}].owned_by") or ""})
    return out


def error_body(status: int, message: str, *, type: str = "invalid_request_error", code: str | None = None,
               param: str | None = None) -> dict[str, Any]:
    """The OpenAI error shape (every OpenAI endpoint; the Llama API's adds copies))."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_fields(obj: Any) -> tuple[str, str | None]:
    """(message, code) from any error shape either dialect sends: `{"error":{message, code|type}}`,
    `{"error":"..."}`, problem-JSON (`detail`, `message`, `title`). ("", None) when there is none."""
    if not isinstance(obj, dict):
        return "", None
    err, msg, code = obj.get("error"), "", None
    if isinstance(err, dict):
        m, c = err.get("message"), err.get("code")
        msg = m if isinstance(m, str) else ""
        c = err.get("type") if c is None else c
        code = str(c) if isinstance(c, (str, int)) and not isinstance(c, bool) else None
    elif isinstance(err, str):
        msg = err
    if not msg:
        msg = next((obj[k] for k in ("detail", "message", "title") if isinstance(obj.get(k), str) and obj[k]), "")
    return msg, code


def decode_error(status: int, body: bytes) -> tuple[str, str | None]:
    """(message, code) from an upstream error body of either dialect, for translation. Never raises."""
    try:
        obj = load_json(body, status=502, what="upstream error")
    except DialectError:
        obj = None
    msg, code = error_fields(obj)
    if msg:
        return msg, code
    try:
        msg = f"upstream returned HTTP {status} {HTTPStatus(status).phrase}"
    except ValueError:
        msg = f"upstream returned HTTP {status}"
    text = body[:500].decode("utf-8", "replace").strip() if obj is None and isinstance(body, (bytes, bytearray)) else ""
    return (f"{msg}: {text}" if text else msg), code

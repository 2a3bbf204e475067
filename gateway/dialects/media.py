"""Media content parts (images, audio, files) in every face: decoded into neutral `Part`s that keep
what the client sent (so the policy's `content:` rule can see them) and re-encoded toward the upstream
unchanged; a part the upstream's dialect has no slot for is refused, never dropped. The table of wire
parts per face: docs/dialects.md."""

from __future__ import annotations

from typing import Any

from gateway.dialects._common import Reader
from gateway.dialects.base import DialectError
from gateway.types import MEDIA_KINDS, Part


def _fail(message: str, param: str) -> DialectError:
    return DialectError(message, status=400, param=param, code="unsupported_content")


def _opt(d: dict[str, Any], key: str, r: Reader, p: str) -> str | None:
    v = d.get(key)
    return None if v is None else r.str_(v, f"{p}.{key}")


def _audio(item: dict[str, Any], r: Reader, p: str, typ: str) -> Part:
    """An `input_audio` part (chat and Responses share its shape)."""
    ia = r.obj(item.get("input_audio"), f"{p}.input_audio")
    return Part("audio", data=r.str_(ia.get("data"), f"{p}.input_audio.data"),
                format=_opt(ia, "format", r, f"{p}.input_audio"), path=p, wire_type=typ)


def decode_chat_part(item: dict[str, Any], typ: str, r: Reader, p: str, role: str) -> Part | None:
    """An OpenAI chat media part (`image_url`, `input_audio`, `file`) → a Part; None for other types."""
    if typ == "image_url":
        iu = item.get("image_url")
        if isinstance(iu, str):
            return Part("image", image_url=iu, path=p, wire_type=typ)
        iu = r.obj(iu, f"{p}.image_url")
        return Part("image", image_url=r.str_(iu.get("url"), f"{p}.image_url.url"),
                    detail=_opt(iu, "detail", r, f"{p}.image_url"), path=p, wire_type=typ)
    if typ == "input_audio":
        return _audio(item, r, p, typ)
    if typ == "file":
        return _file(r.obj(item.get("file"), f"{p}.file"), r, f"{p}.file", p, typ)
    return None


def _file(d: dict[str, Any], r: Reader, where: str, p: str, typ: str) -> Part:
    """A file part from `d` at `where` (chat: the part's `file` object; Responses: the part itself)."""
    part = Part("file", data=_opt(d, "file_data", r, where), file_id=_opt(d, "file_id", r, where),
                filename=_opt(d, "filename", r, where), path=p, wire_type=typ)
    if part.data is None and part.file_id is None:
        r.fail(f"'{where}' needs file_data or file_id", where)
    return part


def encode_chat_part(part: Part) -> dict[str, Any]:
    """A media Part → its OpenAI chat part, as the client sent it."""
    if part.type == "image":
        iu: dict[str, Any] = {"url": part.image_url or ""}
        if part.detail is not None:
            iu["detail"] = part.detail
        return {"type": "image_url", "image_url": iu}
    if part.type == "audio":
        ia: dict[str, Any] = {"data": part.data or ""}
        if part.format is not None:
            ia["format"] = part.format
        return {"type": "input_audio", "input_audio": ia}
    if part.type == "file":
        f = (("file_data", part.data), ("file_id", part.file_id), ("filename", part.filename))
        return {"type": "file", "file": {k: v for k, v in f if v is not None}}
    raise _fail(f"a {part.type} part has no OpenAI chat content part", part.path or "messages")


def decode_responses_part(item: dict[str, Any], typ: str, r: Reader, p: str, role: str) -> Part | None:
    """A Responses media part (`input_image`, `input_audio`, `input_file`) → a Part; None for other
    types. What a chat upstream cannot receive (an image by file id, a file by URL) is refused."""
    if typ not in ("input_image", "input_audio", "input_file"):
        return None
    if role != "user":
        raise _fail(f"'{p}': {typ} parts are supported in user messages only", p)
    if typ == "input_image":
        url = item.get("image_url")
        if url is None:
            raise _fail(f"'{p}': an input_image by file_id refers to a file stored upstream, which no guard can "
                        "read and a chat upstream cannot take; send it as image_url (an https or data: URL)",
                        f"{p}.file_id")
        return Part("image", image_url=r.str_(url, f"{p}.image_url"), detail=_opt(item, "detail", r, p), path=p,
                    wire_type=typ)
    if typ == "input_audio":
        return _audio(item, r, p, typ)
    if item.get("file_url") is not None:
        raise _fail(f"'{p}': an input_file by file_url has no chat counterpart (Guardgate answers the Responses "
                    "API through a chat upstream); send file_data or file_id", f"{p}.file_url")
    return _file(item, r, p, p, typ)


def llama_media_part(item: dict[str, Any], typ: str, r: Reader, p: str, role: str) -> Part | None:
    """A Llama API `image_url` content item → an image Part; None for other types."""
    if typ != "image_url":
        return None
    iu = r.obj(item.get("image_url"), f"{p}.image_url")
    return Part("image", image_url=r.str_(iu.get("url"), f"{p}.image_url.url"), path=p, wire_type="image_url")


def encode_llama_part(part: Part) -> dict[str, Any]:
    """An image Part → a Llama API content item; audio and files have no Llama API slot (refused)."""
    if part.type == "image":
        return {"type": "image_url", "image_url": {"url": part.image_url or ""}}
    where = part.path or "messages"
    raise _fail(f"'{where}': the Llama API has no {part.type} content item, so this {part.wire_type or part.type} "
                "part cannot reach a Llama API upstream", where)


def text_only(parts: list[Part], role: str, dialect: str) -> None:
    """Refuse media parts in a message whose role carries text only in `dialect` (never drop them)."""
    for part in parts:
        if part.type in MEDIA_KINDS:
            where = part.path or "messages"
            raise _fail(f"'{where}': a {part.wire_type or part.type} part in a {role} message has no {dialect} "
                        "counterpart (text only there)", where)

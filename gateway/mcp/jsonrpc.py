"""JSON-RPC 2.0 framing for MCP: parse, validate, classify and build messages.

A body is one message or a batch (a non-empty array). Each message is exactly one of:
  request       {"jsonrpc": "2.0", "id": str|int, "method": str, "params"?: object}
  notification  {"jsonrpc": "2.0", "method": str, "params"?: object}
  response      {"jsonrpc": "2.0", "id": str|int, "result": object}
                {"jsonrpc": "2.0", "id": str|int|null, "error": {"code": int, "message": str, "data"?: any}}
Anything else (another key, a float or boolean id, array params, both result and error, ...) is
invalid: the gateway cannot say what it means, so it never forwards it (MCP forbids null request ids
and positional params, so they are refused too).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from gateway.context import GatewayError
from gateway.routing import loads_json

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
# Implementation-defined server error: the gateway's policy refused the message.
POLICY_REFUSED = -32001
# The gateway could not classify a message coming from the server (an answer to no request it saw).
UNCLASSIFIED = -32002

Kind = Literal["request", "notification", "response"]
_REQUEST_KEYS = frozenset({"jsonrpc", "id", "method", "params"})
_RESPONSE_KEYS = frozenset({"jsonrpc", "id", "result", "error"})
MAX_METHOD_LEN = 256


class InvalidMessage(ValueError):
    """A message that is not valid JSON-RPC 2.0 as MCP uses it."""

    def __init__(self, message: str, code: int = INVALID_REQUEST, id: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.id = id


@dataclass(slots=True)
class Message:
    """One validated message; `raw` is the object as it came (a dict, edited in place by the policy)."""

    kind: Kind
    raw: dict[str, Any]

    @property
    def id(self) -> Any:
        return self.raw.get("id")

    @property
    def method(self) -> str | None:
        return self.raw.get("method")

    @property
    def params(self) -> dict[str, Any]:
        p = self.raw.get("params")
        return p if isinstance(p, dict) else {}


def id_key(id: Any) -> str:
    """A dict key for a JSON-RPC id that keeps 1 and "1" apart."""
    return json.dumps(id)


def _valid_id(v: Any) -> bool:
    return (isinstance(v, str) and len(v) <= 1024) or (isinstance(v, int) and not isinstance(v, bool))


def validate(obj: Any) -> Message:
    """One message, classified; InvalidMessage otherwise."""
    if not isinstance(obj, dict):
        raise InvalidMessage("a JSON-RPC message must be an object")
    rid = obj.get("id")
    rid = rid if _valid_id(rid) else None
    if obj.get("jsonrpc") != "2.0":
        raise InvalidMessage('"jsonrpc" must be "2.0"', id=rid)
    if "method" in obj:
        extra = set(obj) - _REQUEST_KEYS
        if extra:
            raise InvalidMessage(f"unexpected member(s) in a request: {', '.join(sorted(extra))[:200]}", id=rid)
        method = obj["method"]
        if not isinstance(method, str) or not method or len(method) > MAX_METHOD_LEN:
            raise InvalidMessage('"method" must be a non-empty string', id=rid)
        if "params" in obj and not isinstance(obj["params"], dict):
            raise InvalidMessage('"params" must be an object', code=INVALID_PARAMS, id=rid)
        if "id" not in obj:
            return Message("notification", obj)
        if not _valid_id(obj["id"]):
            raise InvalidMessage('"id" must be a string or an integer')
        return Message("request", obj)
    extra = set(obj) - _RESPONSE_KEYS
    if extra:
        raise InvalidMessage(f"unexpected member(s) in a message: {', '.join(sorted(extra))[:200]}", id=rid)
    if ("result" in obj) == ("error" in obj):
        raise InvalidMessage("a message needs a method, or exactly one of result and error", id=rid)
    if "result" in obj:
        if not _valid_id(obj.get("id")):
            raise InvalidMessage('a response\'s "id" must be a string or an integer')
        if not isinstance(obj["result"], dict):
            raise InvalidMessage('"result" must be an object', id=rid)
    else:
        if "id" not in obj or not (obj["id"] is None or _valid_id(obj["id"])):
            raise InvalidMessage('an error response\'s "id" must be a string, an integer or null')
        err = obj["error"]
        if (
            not isinstance(err, dict)
            or not isinstance(err.get("code"), int)
            or isinstance(err.get("code"), bool)
            or not isinstance(err.get("message"), str)
            or set(err) - {"code", "message", "data"}
        ):
            raise InvalidMessage('"error" must be {code: integer, message: string, data?}', id=rid)
    return Message("response", obj)


def parse_body(body: bytes) -> tuple[list[Message], bool]:
    """(messages, was a batch) of a POST body; GatewayError 400 with a JSON-RPC code otherwise."""
    try:
        obj = loads_json(body)
    except GatewayError as e:
        raise GatewayError(400, e.message, "parse_error", param=str(PARSE_ERROR)) from None
    batch = isinstance(obj, list)
    items = obj if batch else [obj]
    if batch and not items:
        raise GatewayError(
            400, "an empty batch is not a JSON-RPC message", "invalid_request", param=str(INVALID_REQUEST)
        )
    out: list[Message] = []
    for i, item in enumerate(items):
        try:
            out.append(validate(item))
        except InvalidMessage as e:
            where = f"message {i} of the batch: " if batch else ""
            raise GatewayError(400, f"{where}{e}", "invalid_request", param=str(e.code)) from None
    return out, batch


def parse_data(data: str) -> list[Message] | None:
    """The messages of one SSE event's data (one message or a batch); None if it is not valid JSON-RPC."""
    try:
        obj = loads_json(data.encode("utf-8", "surrogatepass"))
        items = obj if isinstance(obj, list) else [obj]
        if not items:
            return None
        return [validate(x) for x in items]
    except (GatewayError, InvalidMessage, UnicodeEncodeError):
        return None


def error(id: Any, code: int, message: str, data: Any = None) -> dict[str, Any]:
    """A JSON-RPC error response."""
    err: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        err["data"] = data
    return {"jsonrpc": "2.0", "id": id, "error": err}


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def http_error_body(err: GatewayError) -> dict[str, Any]:
    """A gateway error (bad framing, key, unknown server, ...) as MCP clients read it: a JSON-RPC error
    with no id. The JSON-RPC code rides in `param` when the framing code set one."""
    code = (
        int(err.param)
        if err.param and err.param.lstrip("-").isdigit()
        else (INVALID_REQUEST if err.status < 500 else INTERNAL_ERROR)
    )
    return error(None, code, err.message, {"status": err.status, "code": err.code})

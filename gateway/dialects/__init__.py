"""Wire formats, one module per dialect and endpoint. `get("openai")` / `get("llama")`: a whole
dialect (both halves of chat, models, moderations); `codec(dialect, kind)`: the client half of an
endpoint kind; `upstream_codec(dialect, kind)`: the upstream half."""

from __future__ import annotations

from gateway.dialects import completions, llama_api, openai, responses
from gateway.dialects.base import ClientCodec, Dialect, DialectError, UpstreamCodec, UpstreamStreamError

# Each dialect module implements its protocols at module level, so the module is the codec.
_DIALECTS: dict[str, Dialect] = {"openai": openai, "llama": llama_api}
# "guardrails": the check API (gateway.guardrails) renders its errors in OpenAI's error shape.
_ALIASES = {"llama_api": "llama", "llama-api": "llama", "guardrails": "openai"}
# Endpoint kinds with a client codec of their own (any other kind: chat, in the route's dialect).
_CLIENT_CODECS: dict[str, ClientCodec] = {"completions": completions, "responses": responses}


def get(name: str) -> Dialect:
    """The dialect called `name` ("openai" or "llama"); KeyError for any other name."""
    try:
        return _DIALECTS[_ALIASES.get(name, name)]
    except KeyError:
        raise KeyError(f"unknown dialect {name!r} (known: {', '.join(_DIALECTS)})") from None


def codec(dialect: str, kind: str) -> ClientCodec:
    """The client-facing codec of an endpoint kind (gateway.endpoints.Kind): chat in either dialect;
    OpenAI's legacy completions and Responses API have codecs of their own."""
    return _CLIENT_CODECS.get(kind) or get(dialect)


def upstream_codec(dialect: str, kind: str) -> UpstreamCodec:
    """The upstream-facing codec for an endpoint kind asked in `dialect` (legacy completions on an
    OpenAI upstream; chat otherwise: the Responses API has no upstream half)."""
    if kind == "completions" and _ALIASES.get(dialect, dialect) == "openai":
        return completions
    return get(dialect)


__all__ = ["ClientCodec", "Dialect", "DialectError", "UpstreamCodec", "UpstreamStreamError", "codec",
           "get", "upstream_codec"]

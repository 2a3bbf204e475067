"""Wire formats: one module per dialect, looked up by name (`get("openai")`, `get("llama")`)."""

from __future__ import annotations

from gateway.dialects import llama_api, openai
from gateway.dialects.base import Dialect, DialectError, UpstreamStreamError

# Each dialect module exposes the `Dialect` functions at module level, so the module is the dialect.
_DIALECTS: dict[str, Dialect] = {"openai": openai, "llama": llama_api}  # type: ignore[dict-item]
# "guardrails": the check API (gateway.guardrails) renders its errors in OpenAI's error shape.
_ALIASES = {"llama_api": "llama", "llama-api": "llama", "guardrails": "openai"}

NAMES = tuple(_DIALECTS)


def get(name: str) -> Dialect:
    """The dialect called `name` ("openai" or "llama"); KeyError for any other name."""
    try:
        return _DIALECTS[_ALIASES.get(name, name)]
    except KeyError:
        raise KeyError(f"unknown dialect {name!r} (known: {', '.join(_DIALECTS)})") from None


def codec(dialect: str, kind: str) -> Dialect:
    """The client-facing codec of an endpoint kind (gateway.endpoints.Kind): chat in either dialect;
    OpenAI's legacy completions and Responses API have codecs of their own."""
    if kind == "completions":
        from gateway.dialects import completions

        return completions  # type: ignore[return-value]
    if kind == "responses":
        from gateway.dialects import responses

        return responses  # type: ignore[return-value]
    return get(dialect)


__all__ = ["NAMES", "Dialect", "DialectError", "UpstreamStreamError", "codec", "get"]

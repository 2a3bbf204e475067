"""The endpoint table: what every request path means, decided in one place.

Every request is classified here before anything else looks at it:
  1. `canonical_target` checks the raw request target (before any percent-decoding) and refuses
     a non-canonical spelling (400 `invalid_path`) instead of normalising it: the upstream receives
     exactly the path that was classified, so no decoder further down can turn it into another one.
  2. `split_prefix` finds the client-facing prefix and the dialect it speaks.
  3. `lookup` finds the endpoint for (dialect, method, canonical tail): its kind, its name (what a
     route's `passthrough:` lists), how a relayed stream ends, and its telemetry operation name.
A path that is in no entry is kind `passthrough` with the name `other`. No other module compares
path strings: they read the `Endpoint` a request was given.

What the policy does with each kind is `gateway.routing`'s business.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from gateway.errors import GatewayError


class Kind(StrEnum):
    CHAT = "chat"  # decoded, input stage, output/stream stage
    RESPONSES = "responses"  # the Responses API: decoded, guarded, served through the upstream's chat API
    COMPLETIONS = "completions"  # legacy text completions: prompt on input, text on the stream
    EMBEDDINGS = "embeddings"  # input stage on the texts; the vectors carry no text back
    MODERATIONS = "moderations"  # the policy's Llama Guard answers it, or the input stage runs first
    MODELS = "models"  # metadata: never content, always relayed (or translated)
    STORED_READ = "stored_read"  # stored answers read back: refused under an output policy
    PASSTHROUGH = "passthrough"  # not inspectable (files, audio, images, ...): relayed only without a
    # policy that inspects anything, or when the route lists it under `passthrough:`
    GUARDRAILS = "guardrails"  # the check API other gateways call (gateway.guardrails): answered here,
    # never routed upstream
    MCP = "mcp"  # an MCP server's Streamable HTTP endpoint (gateway.mcp): JSON-RPC, guarded per method


# Kinds a policy inspects (or that carry no content), so a route's `passthrough:` never names them.
GUARDED_KINDS = frozenset({Kind.CHAT, Kind.RESPONSES, Kind.COMPLETIONS, Kind.EMBEDDINGS, Kind.MODERATIONS,
                           Kind.MODELS, Kind.GUARDRAILS, Kind.MCP})

# Client-facing prefixes and the dialect each speaks (longest first).
PREFIXES: tuple[tuple[str, str], ...] = (
    ("/llama/compat/v1", "openai"),
    ("/llama/v1", "llama"),
    ("/openai/v1", "openai"),
    ("/v1", "openai"),
    ("/guardrails", "guardrails"),  # the check API (gateway.guardrails); errors in OpenAI's shape
    ("/mcp", "mcp"),  # MCP servers (config `mcp_servers:`), not a chat dialect: gateway.mcp
)

# What the gateway calls on an upstream when it translates (the same path in both dialects).
CHAT_PATH = "/chat/completions"
MODELS_PATH = "/models"

DONE = b"data: [DONE]"  # the OpenAI stream terminator
LLAMA_COMPLETE = b'"complete"'  # the native Llama stream's last event carries this


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One row of the table."""

    name: str  # what errors show and what a route's `passthrough:` lists
    kind: Kind
    dialect: str  # "openai" | "llama"
    methods: frozenset[str]
    template: str  # canonical tail; `{x}` matches one segment
    terminator: bytes | None = None  # a relayed SSE stream must carry this before EOF (else: truncated)
    operation: str | None = None  # gen_ai.operation.name

    @property
    def segments(self) -> tuple[str, ...]:
        return tuple(self.template.split("/")[1:])


def _e(name: str, kind: Kind, dialect: str, methods: str, template: str, **kw: object) -> Endpoint:
    return Endpoint(name, kind, dialect, frozenset(methods.split()), template, **kw)  # type: ignore[arg-type]


_OPENAI_CHAT: dict[str, object] = {"terminator": DONE, "operation": "chat"}
TABLE: tuple[Endpoint, ...] = (
    # --- OpenAI dialect (/v1, /openai/v1, /llama/compat/v1)
    _e("chat.completions", Kind.CHAT, "openai", "POST", "/chat/completions", **_OPENAI_CHAT),
    # Azure OpenAI's deployment form: the deployment names the model when the body does not.
    _e("chat.completions", Kind.CHAT, "openai", "POST", "/deployments/{deployment}/chat/completions",
       **_OPENAI_CHAT),
    _e("chat.completions.stored", Kind.STORED_READ, "openai", "GET", "/chat/completions"),
    _e("chat.completions.stored", Kind.STORED_READ, "openai", "GET POST DELETE", "/chat/completions/{id}"),
    _e("chat.completions.stored", Kind.STORED_READ, "openai", "GET", "/chat/completions/{id}/messages"),
    _e("responses", Kind.RESPONSES, "openai", "POST", "/responses", operation="chat"),
    _e("responses.stored", Kind.STORED_READ, "openai", "GET DELETE", "/responses/{id}"),
    _e("responses.stored", Kind.STORED_READ, "openai", "POST", "/responses/{id}/cancel"),
    _e("responses.stored", Kind.STORED_READ, "openai", "GET", "/responses/{id}/input_items"),
    _e("responses.input_tokens", Kind.PASSTHROUGH, "openai", "POST", "/responses/input_tokens"),
    _e("conversations", Kind.STORED_READ, "openai", "GET POST DELETE", "/conversations/{id}"),
    _e("conversations", Kind.STORED_READ, "openai", "GET POST", "/conversations/{id}/items"),
    _e("conversations", Kind.STORED_READ, "openai", "GET DELETE", "/conversations/{id}/items/{item}"),
    _e("conversations.create", Kind.PASSTHROUGH, "openai", "POST", "/conversations"),
    _e("completions", Kind.COMPLETIONS, "openai", "POST", "/completions", terminator=DONE,
       operation="text_completion"),
    _e("completions", Kind.COMPLETIONS, "openai", "POST", "/deployments/{deployment}/completions",
       terminator=DONE, operation="text_completion"),
    _e("embeddings", Kind.EMBEDDINGS, "openai", "POST", "/embeddings", operation="embeddings"),
    _e("embeddings", Kind.EMBEDDINGS, "openai", "POST", "/deployments/{deployment}/embeddings",
       operation="embeddings"),
    _e("moderations", Kind.MODERATIONS, "openai", "POST", "/moderations"),
    _e("models", Kind.MODELS, "openai", "GET", "/models"),
    _e("models", Kind.MODELS, "openai", "GET", "/models/{model}"),
    # --- native Llama API (/llama/v1)
    _e("chat.completions", Kind.CHAT, "llama", "POST", "/chat/completions", terminator=LLAMA_COMPLETE,
       operation="chat"),
    _e("moderations", Kind.MODERATIONS, "llama", "POST", "/moderations"),
    _e("models", Kind.MODELS, "llama", "GET", "/models"),
    _e("models", Kind.MODELS, "llama", "GET", "/models/{model}"),
    # --- the check API (/guardrails/{policy}): one face per caller, the same policy run behind each
    _e("guardrails.check", Kind.GUARDRAILS, "guardrails", "POST", "/{policy}", operation="guardrail"),
    _e("guardrails.litellm", Kind.GUARDRAILS, "guardrails", "POST", "/{policy}/litellm", operation="guardrail"),
    # LiteLLM appends this to its `api_base` unless the base already ends with it
    _e("guardrails.litellm", Kind.GUARDRAILS, "guardrails", "POST",
       "/{policy}/litellm/beta/litellm_basic_guardrail_api", operation="guardrail"),
    _e("guardrails.portkey", Kind.GUARDRAILS, "guardrails", "POST", "/{policy}/portkey", operation="guardrail"),
    # --- MCP Streamable HTTP (/mcp/{server}): POST messages, GET the server's stream, DELETE the session
    _e("mcp", Kind.MCP, "mcp", "POST GET DELETE", "/{server}", operation="mcp"),
)

# First segments of OpenAI endpoints that carry content the gateway does not inspect. They are kind
# `passthrough` like any unknown path; the name is what a route lists to let them through.
PASSTHROUGH_NAMES = ("files", "uploads", "batches", "audio", "images", "videos", "fine_tuning", "assistants",
                     "threads", "vector_stores", "realtime", "containers", "evals", "chatkit")


def _other(dialect: str, tail: str, method: str) -> Endpoint:
    first = tail.split("/", 2)[1] if tail.count("/") >= 1 else ""
    name = first if first in PASSTHROUGH_NAMES else "other"
    return Endpoint(name, Kind.PASSTHROUGH, dialect, frozenset({method}), tail)


def lookup(dialect: str, method: str, tail: str) -> Endpoint:
    """The table's entry for a canonical tail (see `canonical_target`); kind `passthrough` if none."""
    segs = tuple(tail.split("/")[1:])
    for ep in TABLE:
        if ep.dialect != dialect or method not in ep.methods:
            continue
        t = ep.segments
        if len(t) == len(segs) and all(a == b or a.startswith("{") for a, b in zip(t, segs, strict=True)):
            return ep
    return _other(dialect, tail, method)


def path_param(ep: Endpoint, tail: str, name: str) -> str | None:
    """The value of `{name}` in `tail` (e.g. an Azure deployment), None if the template has none."""
    for a, b in zip(ep.segments, tail.split("/")[1:], strict=False):
        if a == "{" + name + "}":
            return b
    return None


def split_prefix(path: str) -> tuple[str, str, str] | None:
    """(prefix, dialect, tail) for a canonical path on a dialect prefix; None for other paths."""
    for prefix, dialect in PREFIXES:
        if path == prefix or path.startswith(prefix + "/"):
            return prefix, dialect, path[len(prefix):]
    return None


def dialect_of(raw_path: str) -> str:
    """The dialect errors are rendered in for any path, canonical or not (Llama's for /llama/v1)."""
    if raw_path.startswith("/mcp/") or raw_path == "/mcp":
        return "mcp"
    return "llama" if raw_path.startswith("/llama/v1") else "openai"


# ----------------------------------------------------------------------------- canonical paths

# RFC 3986 pchar minus ';' (matrix parameters, which some servers strip before routing) and '%',
# checked apart: unreserved, the other sub-delims, ':' and '@'.
_SEGMENT_CHARS = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,=:@%]*")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# Escapes that are never canonical: what must be written plainly (unreserved characters), and what
# would change the path's structure once a server decodes it ('/', '\\', ';', '%', controls).
_NEVER_ESCAPED = _UNRESERVED | frozenset(b"/\\;%") | frozenset(range(0x20)) | {0x7F}


def canonical_target(target: str) -> tuple[str, str]:
    """(path, query) of a raw request target whose path is canonical; GatewayError 400 otherwise.

    The one rule, applied to every request: the path is origin-form ('/' first: no absolute-form or
    '*'), has no fragment, no empty segment (no '//', no trailing '/'), no '.' or '..' segment, no
    ';' parameters, no backslash, only ASCII path characters, and no percent-escape of a character
    that is unreserved or structural ('/', '\\', ';', '%', controls): `%2e`, `%2F`, `%25` and
    double-encoding are refused. Other escapes (e.g. `%3A` in an id) are valid and kept as sent.
    The query is not interpreted; it goes upstream as sent."""
    path, _, query = target.partition("?")
    why = _why_not_canonical(path)
    if why is not None or "#" in target:
        raise GatewayError(400, f"request path {target[:200]!r} is not canonical ({why or 'a fragment'}); "
                           "send the plain path, e.g. /v1/chat/completions", "invalid_path")
    return path, query


def _why_not_canonical(path: str) -> str | None:
    if not path.startswith("/"):
        return "not an origin-form path"
    segments = path.split("/")[1:]
    for seg in segments:
        if seg == "":
            return "an empty segment"
        if seg in (".", ".."):
            return "a dot segment"
        if not _SEGMENT_CHARS.fullmatch(seg):
            return "a character that must not appear in a path"
        if "%" in seg:
            escapes = _ESCAPE.findall(seg)
            if seg.count("%") != len(escapes):
                return "a malformed percent-escape"
            if any(int(h, 16) in _NEVER_ESCAPED for h in escapes):
                return "a percent-escape of a character that must be sent plainly"
    return None

"""What the upstream writes besides the answer, under a policy that checks answers.

The answer's content (text channels, tool calls with their ids, attached values) passes the policy's
output steps (`policy/gate.py`). Everything else an upstream writes is a way around them: an upstream
that echoes the prompt, or a compromised one, can carry anything in an error message, a mid-stream
error event, `system_fingerprint`, an unknown top-level field or a usage detail. So, under such a
policy, each of these is replaced by the gateway's own or kept only on an allow list:

- an upstream error body (HTTP 4xx/5xx): a generic message naming the status and the request id; the
  error `code` only when it is one of `KNOWN_CODES`; of its headers only a numeric `Retry-After` /
  `retry-after-ms` and a boolean `x-should-retry`;
- a mid-stream error event: the same, with a gateway message per gateway code;
- the answer's `id`: minted by the gateway; `model`: kept when it is the model asked for (or that
  model with a date snapshot suffix), else the model asked for;
- top-level fields: `system_fingerprint` (`fp_` + hex) and `service_tier` (a known tier) only;
  usage details: the known counts, integers only; every other field is dropped.

Without a policy that checks answers, all of it passes as before (the relay does not parse).
"""

from __future__ import annotations

import re
from collections.abc import AsyncGenerator
from dataclasses import replace
from http import HTTPStatus
from typing import Any

from gateway.types import Completion, Event, Exchange, StreamStart, new_id

# Error codes an upstream may name that are the providers' own vocabulary (and the gateway's).
KNOWN_CODES = frozenset(
    {
        "rate_limit_exceeded",
        "insufficient_quota",
        "context_length_exceeded",
        "invalid_api_key",
        "model_not_found",
        "content_filter",
        "content_policy_violation",
        "server_error",
        "invalid_request_error",
        "invalid_value",
        "invalid_type",
        "missing_required_parameter",
        "unsupported_parameter",
        "unsupported_value",
        "not_found_error",
        "authentication_error",
        "permission_error",
        "rate_limit_error",
        "overloaded_error",
        "api_error",
        "timeout",
        "upstream_error",
        "upstream_truncated",
        "bad_upstream_response",
        "upstream_event_too_large",
    }
)
# What the gateway says for a stream error it raised itself (its codes), else GENERIC_STREAM.
STREAM_MESSAGES = {
    "upstream_truncated": "the upstream stream ended before its terminator",
    "bad_upstream_response": "the upstream sent a stream event that does not decode",
    "upstream_event_too_large": "the upstream sent a stream event that is too large",
}
GENERIC_STREAM = "the upstream reported an error during the stream"

SERVICE_TIERS = frozenset({"auto", "default", "flex", "scale", "priority"})
_FINGERPRINT = re.compile(r"fp_[0-9a-f]{1,64}")
_SNAPSHOT = re.compile(r"-(?:\d{4}-\d{2}-\d{2}|\d{4}|\d{8})")
_RETRY_NUMBER = re.compile(r"\d{1,10}(?:\.\d{1,6})?")
USAGE_DETAILS = {
    "prompt_tokens_details": frozenset({"cached_tokens", "audio_tokens"}),
    "completion_tokens_details": frozenset(
        {"reasoning_tokens", "audio_tokens", "accepted_prediction_tokens", "rejected_prediction_tokens"}
    ),
    # Responses usage
    "input_tokens_details": frozenset({"cached_tokens"}),
    "output_tokens_details": frozenset({"reasoning_tokens"}),
}


def _phrase(status: int) -> str:
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        return str(status)


def error_message(status: int, request_id: str) -> str:
    """The gateway's own message for an upstream error answer."""
    return f"the upstream answered HTTP {_phrase(status)} (request {request_id})"


def error_code(code: str | None) -> str:
    return code if code in KNOWN_CODES else "upstream_error"


def error_headers(headers: Any) -> dict[str, str]:
    """The retry hints of an upstream error answer that are safe to pass on (shape-checked)."""
    out: dict[str, str] = {}
    for h in ("Retry-After", "retry-after-ms"):
        v = headers.get(h)
        if v is not None and _RETRY_NUMBER.fullmatch(v.strip()):
            out[h] = v.strip()
    v = headers.get("x-should-retry")
    if v is not None and v.strip().lower() in ("true", "false"):
        out["x-should-retry"] = v.strip().lower()
    return out


def stream_error(code: str | None, request_id: str) -> tuple[str, str]:
    """(message, code) for a stream that failed mid-way: the gateway's words, never the upstream's."""
    code = error_code(code)
    return f"{STREAM_MESSAGES.get(code, GENERIC_STREAM)} (request {request_id})", code


def model_name(model: str, asked: str) -> str:
    """The upstream's `model` when it is the one asked for (or a dated snapshot of it), else the one asked for."""
    if not model or not asked:
        return asked or ""
    m, a = model.strip().lower(), asked.strip().lower()
    if m == a or (m.startswith(a) and _SNAPSHOT.fullmatch(m[len(a) :])):
        return model
    return asked


def _top(top: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    fp = top.get("system_fingerprint")
    if isinstance(fp, str) and _FINGERPRINT.fullmatch(fp):
        out["system_fingerprint"] = fp
    tier = top.get("service_tier")
    if isinstance(tier, str) and tier in SERVICE_TIERS:
        out["service_tier"] = tier
    return out


def _usage(details: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, allowed in USAGE_DETAILS.items():
        d = details.get(key)
        if isinstance(d, dict):
            kept = {k: v for k, v in d.items() if k in allowed and type(v) is int}
            if kept:
                out[key] = kept
    return out


def _extra(extra: dict[str, Any]) -> dict[str, Any]:
    """A Completion's / StreamStart's dialect extras with only the allowed metadata left."""
    out: dict[str, Any] = {}
    for name, value in extra.items():
        if name == "guardgate":
            out[name] = value  # the gateway's own annotation
        elif name == "openai" and isinstance(value, dict):
            kept: dict[str, Any] = {}
            if isinstance(value.get("top"), dict) and (top := _top(value["top"])):
                kept["top"] = top
            if isinstance(value.get("usage"), dict) and (usage := _usage(value["usage"])):
                kept["usage"] = usage
            if "top" not in value and "usage" not in value:  # a stream start: the chunk fields themselves
                kept = _top(value)
            if kept:
                out[name] = kept
        # every other dialect's extras (llama `top`: unknown fields) are dropped
    return out


def _id(upstream_id: str) -> str:
    return new_id("cmpl-" if upstream_id.startswith("cmpl-") else "chatcmpl-")


def completion(c: Completion, ex: Exchange) -> Completion:
    """A non-stream answer with its metadata reduced to the gateway's own and the allow list."""
    return replace(c, id=_id(c.id), model=model_name(c.model, ex.model), extra=_extra(c.extra))


def stream_start(ev: StreamStart, ex: Exchange) -> StreamStart:
    """A stream's identity and chunk metadata, as `completion` does it."""
    return replace(ev, id=_id(ev.id), model=model_name(ev.model, ex.model), extra=_extra(ev.extra))


def checks_answers(run: Any) -> bool:
    """A policy run (or None) that checks answers, in enforce mode: then this module's rules apply."""
    return run is not None and run.policy.has_output and not run.policy.shadow


async def checked_starts(batches: AsyncGenerator[list[Event], None], ex: Exchange) -> AsyncGenerator[list[Event], None]:
    """The upstream's stream events with each `StreamStart` reduced by `stream_start`."""
    try:
        async for batch in batches:
            yield [stream_start(ev, ex) if isinstance(ev, StreamStart) else ev for ev in batch]
    finally:
        await batches.aclose()

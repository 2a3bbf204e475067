"""Tokens a relayed answer used, read from the bytes the gateway passed on.

The relay never parses what it forwards; when a token budget applies to a relayed request, a
`UsageTap` keeps a copy of the body (up to `MAX_TAP_BYTES`) and reads it once the answer is sent:
the upstream's `usage` (a JSON answer's, or a stream's usage chunk) when present, else the gateway's
own count (gateway.policy.tokens, cl100k) of the text it relayed. Only then is any of this paid.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

MAX_TAP_BYTES = 8 * 1024 * 1024  # past this the count is what was seen (the budget still moves)


@dataclass(slots=True)
class Counted:
    prompt_tokens: int
    completion_tokens: int
    source: str  # "upstream": the upstream's usage; "gateway": counted by the gateway

    @property
    def total(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def from_usage(usage: Any) -> Counted | None:
    """A `usage` object (OpenAI or Llama API field names, or gateway.types.Usage) as a count."""
    if usage is None:
        return None
    if not isinstance(usage, dict):
        return Counted(int(getattr(usage, "prompt_tokens", 0) or 0), int(getattr(usage, "completion_tokens", 0) or 0),
                       "upstream")
    prompt = usage.get("prompt_tokens", usage.get("input_tokens", 0))
    completion = usage.get("completion_tokens", usage.get("output_tokens", 0))
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    return Counted(prompt, completion, "upstream")


def _text_of(obj: Any, out: list[str]) -> None:
    """Every string under `content`, `text`, `arguments` or `refusal` of an answer or chunk."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k in ("content", "text", "arguments", "refusal", "reasoning_content") and isinstance(v, str):
                out.append(v)
            else:
                _text_of(v, out)
    elif isinstance(obj, list):
        for v in obj:
            _text_of(v, out)


def _prompt_count(payload: Any) -> int:
    from gateway.policy.tokens import count_tokens

    if not isinstance(payload, dict):
        return 0
    texts: list[str] = []
    for k in ("messages", "input", "prompt"):
        if isinstance(payload.get(k), str):
            texts.append(payload[k])
        else:
            _text_of(payload.get(k), texts)
    return sum(count_tokens(t) for t in texts)


@dataclass(slots=True)
class UsageTap:
    """Collects a relayed body; `count()` reads it once the relay is done."""

    payload: Any  # the request's JSON (for the gateway's own prompt count)
    buf: bytearray = field(default_factory=bytearray)

    def feed(self, data: bytes) -> None:
        if len(self.buf) < MAX_TAP_BYTES:
            self.buf += data[: MAX_TAP_BYTES - len(self.buf)]

    def count(self) -> Counted | None:
        from gateway.policy.tokens import count_tokens

        raw = bytes(self.buf)
        objs: list[Any] = []
        if raw.lstrip().startswith(b"{"):
            try:
                objs.append(json.loads(raw))
            except ValueError:
                pass
        else:
            for line in raw.splitlines():
                if line.startswith(b"data:"):
                    data = line[5:].strip()
                    if data and data != b"[DONE]":
                        try:
                            objs.append(json.loads(data))
                        except ValueError:
                            continue
        texts: list[str] = []
        for obj in objs:
            if isinstance(obj, dict):
                raw_usage = obj.get("usage")
                if raw_usage is None and isinstance(obj.get("response"), dict):  # Responses stream events
                    raw_usage = obj["response"].get("usage")
                usage = from_usage(raw_usage)
                if usage is not None and usage.total:
                    return usage
                _text_of({k: v for k, v in obj.items() if k != "usage"}, texts)
        if not objs:
            return None
        # joined: a stream's pieces split words, and counting each piece alone would over-count
        return Counted(_prompt_count(self.payload), count_tokens("".join(texts)), "gateway")

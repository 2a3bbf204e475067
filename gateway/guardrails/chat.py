"""OpenAI-shaped chat messages as the check API reads them, with a way back.

Every face hands the policy the same neutral `Message`s; what comes back (input redactions) must be
written into the caller's own JSON, so each text the guards see remembers where it came from:
`Where(message, content)`: the message's index and, for a list `content`, the item's index (None for
a string `content`); `content == REFUSAL` is an assistant message's `refusal` field. Tool-call
arguments are part `-(k+1)` of a message (`gateway.types.TextEdit`) and are written back too.

Deny by default: a content item that carries text the decoder has no rule for is an error (400),
never skipped; only items with no text (`input_audio`, `file`) are left out, as the proxy does.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from typing import Any

from gateway.context import GatewayError
from gateway.types import Message, Part, ToolCall

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
REFUSAL = -1  # `Where.content` of an assistant message's `refusal` field
_NO_TEXT_PARTS = frozenset({"input_audio", "file"})


@dataclass(frozen=True, slots=True)
class Where:
    message: int
    content: int | None  # None: the string `content`; REFUSAL: the `refusal` field


@dataclass(slots=True)
class Conversation:
    """Decoded messages plus, per message, where each of its text parts came from."""

    raw: list[Any]
    messages: list[Message] = field(default_factory=list)
    origins: list[list[Where | None]] = field(default_factory=list)  # per message, per part

    def texts(self) -> list[str]:
        """Every text part, in order (what LiteLLM calls `texts`)."""
        return [p.text for m in self.messages for p in m.parts if p.type == "text"]

    def rewritten(self, messages: list[Message]) -> list[Any]:
        """A deep copy of the raw messages with the texts and tool-call arguments of `messages` (this
        conversation after the input stage's redactions) written back where they came from."""
        out = copy.deepcopy(self.raw)
        for mi, (msg, origins) in enumerate(zip(messages, self.origins, strict=True)):
            raw = out[mi]
            for part, where in zip(msg.parts, origins, strict=True):
                if where is None or part.type != "text":
                    continue
                if where.content is None:
                    raw["content"] = part.text
                elif where.content == REFUSAL:
                    raw["refusal"] = part.text
                else:
                    item = raw["content"][where.content]
                    item["refusal" if item.get("type") == "refusal" else "text"] = part.text
            for k, tc in enumerate(msg.tool_calls):
                fn = raw["tool_calls"][k].get("function")
                if isinstance(fn, dict):
                    fn["arguments"] = tc.arguments
        return out


def _bad(message: str, param: str) -> GatewayError:
    return GatewayError(400, message, "invalid_request", param=param)


def decode(raw: Any, param: str = "messages") -> Conversation:
    """OpenAI chat `messages` → a Conversation (400 with the field named when it does not decode)."""
    if not isinstance(raw, list):
        raise _bad(f"'{param}' must be a list of chat messages", param)
    conv = Conversation(raw=raw)
    for i, m in enumerate(raw):
        p = f"{param}[{i}]"
        if not isinstance(m, dict):
            raise _bad(f"'{p}' must be an object", p)
        role = m.get("role")
        if role not in ROLES:
            raise _bad(f"'{p}.role' must be one of {sorted(ROLES)}", f"{p}.role")
        parts: list[Part] = []
        origins: list[Where | None] = []
        content = m.get("content")
        if isinstance(content, str):
            parts.append(Part("text", content))
            origins.append(Where(i, None))
        elif isinstance(content, list):
            for j, item in enumerate(content):
                q = f"{p}.content[{j}]"
                if not isinstance(item, dict):
                    raise _bad(f"'{q}' must be an object", q)
                typ = item.get("type")
                text = item.get("refusal") if typ == "refusal" else item.get("text")
                if isinstance(text, str):
                    parts.append(Part("text", text))
                    origins.append(Where(i, j))
                elif typ == "image_url":
                    iu = item.get("image_url")
                    url = iu.get("url") if isinstance(iu, dict) else iu
                    parts.append(Part("image", image_url=url if isinstance(url, str) else None))
                    origins.append(None)
                elif typ not in _NO_TEXT_PARTS:
                    raise _bad(f"content part type {typ!r} is not one the guards can read", f"{q}.type")
        elif content is not None:
            raise _bad(f"'{p}.content' must be a string, a list of parts or null", f"{p}.content")
        if isinstance(m.get("refusal"), str) and m["refusal"]:
            parts.append(Part("text", m["refusal"]))
            origins.append(Where(i, REFUSAL))
        calls = tool_calls(m.get("tool_calls"), f"{p}.tool_calls")
        tcid = m.get("tool_call_id")
        conv.messages.append(
            Message(
                role="tool" if role == "function" else role,
                parts=parts,
                tool_calls=calls,
                tool_call_id=tcid if isinstance(tcid, str) else None,
            )
        )
        conv.origins.append(origins)
    return conv


def tool_calls(raw: Any, param: str) -> list[ToolCall]:
    """OpenAI `tool_calls` (`[{id, type, function: {name, arguments}}]`) → neutral tool calls."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise _bad(f"'{param}' must be a list", param)
    out: list[ToolCall] = []
    for k, tc in enumerate(raw):
        fn = tc.get("function") if isinstance(tc, dict) else None
        if not isinstance(fn, dict):
            raise _bad(f"'{param}[{k}].function' must be an object", f"{param}[{k}].function")
        args = fn.get("arguments", "")
        if not isinstance(args, str):
            args = json.dumps(args, ensure_ascii=False)
        out.append(ToolCall(id=str(tc.get("id") or ""), name=str(fn.get("name") or ""), arguments=args))
    return out


def encode_tool_calls(calls: list[ToolCall]) -> list[dict[str, Any]]:
    return [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls]

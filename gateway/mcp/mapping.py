"""One policy, mapped onto MCP by the direction the data flows (the face: no guard logic here).

Toward the model (`input` steps): every string a server sends in a result the model may read is a
third-party text, checked as a `tool` message (Prompt Guard scores it as indirect data; regex, pii,
hidden_unicode read tool messages). Object keys are checked too (a schema's property names reach the
model) but cannot be rewritten: a redaction that touches one withholds the whole thing.
From the model (`output` steps): a `tools/call` is a `ToolCall` (name + arguments) in a one-choice
answer, run through the same gate as a chat answer's tool call (`tools`, `pii`, `regex`,
`alignment_check`).

Each check is one `PolicyRun`, so each writes one audit record (with an `mcp` member: server,
method, tool) and feeds the guard metrics, like a chat request.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gateway.policy.chain import PolicyRun
from gateway.types import Completion, Exchange, Message, ToolCall

# Keys whose values are not text the model reads: protocol enums, cursors and base64 payloads.
# Protocol values the model does not read, skipped only where they hold what the protocol puts there (a
# hostile server's text in a `type` or `data` field of `structuredContent` is still checked).
_ENUMS: dict[str, frozenset[str]] = {
    "type": frozenset(
        {
            "text",
            "image",
            "audio",
            "resource",
            "resource_link",
            "object",
            "string",
            "integer",
            "number",
            "boolean",
            "array",
            "null",
        }
    ),
    "role": frozenset({"user", "assistant"}),
}
_MIME = re.compile(r"[A-Za-z0-9.+-]{1,64}/[A-Za-z0-9.+-]{1,64}")
_OPAQUE_KEYS = frozenset({"nextCursor", "protocolVersion", "jsonrpc", "blob"})  # cursors, versions, base64
_BINARY_TYPES = frozenset({"image", "audio"})
_PLACEHOLDER = re.compile(r"<([A-Z][A-Z0-9_]*)>")
BINARY_NOTICE = "[{kind} withheld by Guardgate: the policy does not inspect binary content]"


@dataclass(slots=True)
class Slot:
    """One string of a message: where it lives (container None: object keys, read only) and its text."""

    container: dict[str, Any] | list[Any] | None
    key: str | int | None
    text: str


def strings(obj: Any) -> list[Slot]:
    """Every string of `obj` a model may read (not protocol enums or base64 data), and, as one last read-only
    slot, its object keys (a schema's property names reach the model too)."""
    out: list[Slot] = []
    keys: dict[str, None] = {}

    def walk(o: Any) -> None:
        items = o.items() if isinstance(o, dict) else enumerate(o)
        for k, v in items:
            if isinstance(k, str):
                if isinstance(v, str) and _protocol_value(o, k, v):
                    continue
                keys[k] = None
            if isinstance(v, str):
                if v.strip():
                    out.append(Slot(o, k, v))
            elif isinstance(v, (dict, list)):
                walk(v)

    if isinstance(obj, (dict, list)):
        walk(obj)
    if keys:
        out.append(Slot(None, None, " ".join(keys)))
    return out


def _protocol_value(d: dict[str, Any], key: str, value: str) -> bool:
    """Is `d[key] = value` protocol data no model reads: an enum, a MIME type, a cursor, base64 data?"""
    if key in _OPAQUE_KEYS:
        return True
    if key in _ENUMS:
        return value in _ENUMS[key]
    if key == "mimeType":
        return _MIME.fullmatch(value) is not None
    return key == "data" and d.get("type") in _BINARY_TYPES  # image or audio bytes


def _binary_kind(d: dict[str, Any]) -> str | None:
    if d.get("type") in _BINARY_TYPES:
        return str(d["type"])
    if "blob" in d:
        return "binary resource"
    return None


def withhold_binary(obj: Any, notice: str = BINARY_NOTICE) -> int:
    """Replace every binary item (image or audio content, blob resource) in `obj` with a text notice, in
    place: the gateway cannot inspect it, so it does not pass under a policy. Returns how many."""
    n = 0
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in list(items):
        if isinstance(v, dict) and (kind := _binary_kind(v)) is not None:
            text = notice.format(kind=kind)
            obj[k] = (
                {"type": "text", "text": text}
                if "type" in v
                else {"uri": v.get("uri", ""), "mimeType": "text/plain", "text": text}
            )
            n += 1
        elif isinstance(v, (dict, list)):
            n += withhold_binary(v, notice)
    return n


@dataclass(slots=True)
class Scope:
    """Who is asking, for the audit record, metrics and traces of each check."""

    server: str
    request_id: str
    key: str | None
    audit: Any
    record_audit: Callable[[dict[str, Any]], None]
    observe: Callable[[str, str, str | None, str, str], None]  # (method, direction, tool, stage, action)


class McpRun(PolicyRun):
    """A policy run whose audit record says which MCP server, method and tool it checked."""

    def __init__(self, *args: Any, mcp: dict[str, Any], **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.mcp = mcp

    def record(self, status: int = 200, error: str | None = None) -> dict[str, Any]:
        rec = super().record(status, error)
        rec["mcp"] = self.mcp
        return rec


def _run(policy: Any, scope: Scope, method: str, tool: str | None, direction: str) -> McpRun:
    info: dict[str, Any] = {"server": scope.server, "method": method, "direction": direction}
    if tool is not None:
        info["tool"] = tool
    return McpRun(
        policy,
        request_id=scope.request_id,
        route=f"/mcp/{scope.server}",
        dialect="mcp",
        model=scope.server,
        key=scope.key,
        audit=scope.audit,
        mcp=info,
    )


def record_refusal(policy: Any, scope: Scope, method: str, direction: str, why: str) -> None:
    """An audit record for a message the method table refused (no guard ran: deny by default)."""
    run = _run(policy, scope, method[:100], None, direction)
    run.action, run.blocked_stage = "block", "method"
    scope.observe(method, direction, None, "method", "block")
    scope.record_audit(run.finish(status=403, error=why))


@dataclass(slots=True)
class TextCheck:
    """The input stage's answer for a set of texts: withheld, or the texts to send (maybe redacted)."""

    blocked: bool = False
    reason: str = ""
    changed: bool = False
    categories: list[str] = field(default_factory=list)


async def check_texts(policy: Any, scope: Scope, method: str, tool: str | None, slots: list[Slot]) -> TextCheck:
    """Run the input steps on `slots` (toward the model); write redactions back into their containers."""
    if not slots or not policy.has_input:
        return TextCheck()
    run = _run(policy, scope, method, tool, "to_model")
    status = 200
    try:
        ex = Exchange(model=scope.server, messages=[Message.of("tool", s.text) for s in slots])
        decision = await run.check_input(ex)
        if decision.blocked:
            status = 403
            scope.observe(method, "to_model", tool, "input", "block")
            return TextCheck(
                True, decision.message.replace("Request blocked", "Withheld", 1), categories=list(decision.categories)
            )
        out = TextCheck()
        if decision.exchange is not None:
            for s, m in zip(slots, decision.exchange.messages, strict=True):
                new = m.text
                if new == s.text:
                    continue
                if s.container is None:  # an object key cannot be rewritten: withhold it all
                    status = 403
                    scope.observe(method, "to_model", tool, "input", "block")
                    return TextCheck(
                        True,
                        f"Withheld by policy '{policy.name}': a redaction would change an object key",
                        categories=list(decision.categories),
                    )
                s.container[s.key] = new  # type: ignore[index]
                out.changed = True
        scope.observe(method, "to_model", tool, "input", decision.action)
        return out
    finally:
        scope.record_audit(run.finish(status=status))


@dataclass(slots=True)
class CallCheck:
    """The output stage's answer for one tools/call: refused, or the arguments to send."""

    refused: bool = False
    reason: str = ""
    arguments: Any = None
    changed: bool = False
    restore: dict[str, str] = field(default_factory=dict)


def _unmasks(policy: Any) -> bool:
    return any(
        s.guard_name == "pii" and getattr(s.guard, "unmask", False)
        for s in (*policy.output.steps, *policy.stream.steps)
    )


async def check_call(policy: Any, scope: Scope, call_id: Any, name: str, arguments: Any) -> CallCheck:
    """Run the output steps on a tool call the model wrote (`tools/call`)."""
    if not (policy.has_output or policy.has_stream):
        return CallCheck(arguments=arguments)
    args_text = json.dumps(arguments if arguments is not None else {}, ensure_ascii=False, separators=(",", ":"))
    run = _run(policy, scope, "tools/call", name, "from_model")
    status = 200
    try:
        call = ToolCall(id=str(call_id), name=name, arguments=args_text)
        answer = Completion(
            id=f"mcp-{scope.request_id}",
            model=scope.server,
            message=Message("assistant", tool_calls=[call]),
            finish_reason="tool_calls",
        )
        out = await run.check_output(Exchange(model=scope.server, messages=[]), answer)
        action, _ = run.final_action()
        calls = out.message.tool_calls
        if out.finish_reason == "content_filter" or len(calls) != 1 or calls[0].name != name:
            status = 403
            scope.observe("tools/call", "from_model", name, "output", "block")
            cats = sorted({c for r in run.records.values() if r.outcome == "block" for c in r.categories})
            why = f" ({', '.join(cats)})" if cats else ""
            return CallCheck(True, f"tools/call {name!r} refused by policy '{policy.name}'{why}")
        scope.observe("tools/call", "from_model", name, "output", action)
        released = calls[0].arguments
        if released == args_text:
            return CallCheck(arguments=arguments)
        restore: dict[str, str] = {}
        if _unmasks(policy):
            released, restore = number_placeholders(args_text, released)
        try:
            new_args = json.loads(released)
        except ValueError:
            status = 403
            return CallCheck(
                True,
                f"tools/call {name!r} refused by policy '{policy.name}': its arguments "
                "were redacted into something that is not JSON",
            )
        return CallCheck(arguments=new_args, changed=True, restore=restore)
    finally:
        scope.record_audit(run.finish(status=status))


def number_placeholders(original: str, released: str) -> tuple[str, dict[str, str]]:
    """Number the `<KIND>` placeholders a masking step wrote into `released` (`<EMAIL_1>`, ...), so the
    values can be put back into the server's answer: (numbered text, placeholder -> original value)."""
    sm = difflib.SequenceMatcher(None, original, released, autojunk=False)
    out: list[str] = []
    restore: dict[str, str] = {}
    by_value: dict[tuple[str, str], str] = {}
    counts: dict[str, int] = {}
    for tag, i1, i2, j1, j2 in sm.get_opcodes():
        seg = released[j1:j2]
        m = _PLACEHOLDER.fullmatch(seg)
        if tag == "replace" and m:
            kind, value = m.group(1), original[i1:i2]
            ph = by_value.get((kind, value))
            if ph is None:
                counts[kind] = counts.get(kind, 0) + 1
                ph = by_value[(kind, value)] = f"<{kind}_{counts[kind]}>"
                restore[ph] = value
            out.append(ph)
        else:
            out.append(seg)
    return "".join(out), restore


def unmask(obj: Any, restore: dict[str, str]) -> None:
    """Put masked values back into every string of a result (in place)."""
    if not restore:
        return
    for s in strings(obj):
        if s.container is not None and "<" in s.text:
            new = s.text
            for ph, value in restore.items():
                new = new.replace(ph, value)
            s.container[s.key] = new  # type: ignore[index]

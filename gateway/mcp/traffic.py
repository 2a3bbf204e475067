"""What the policy does to each MCP message, whichever way it travels (transport-agnostic: the
Streamable HTTP proxy and the stdio wrapper both use it).

Client → server:
  request       the method table decides: unknown (or server-only) methods are refused with
                METHOD_NOT_FOUND naming them; `tools/call` runs the output steps (refused with
                POLICY_REFUSED, or sent with the arguments the gate released); the rest pass.
  notification  `notifications/*` pass; anything else is refused.
  response      (answers to the server's own requests: roots, elicitation, sampling) pass.
Server → client:
  response      checked by what it answers (the request's method, remembered by id): see
                `gateway.mcp.methods`. An answer to a request the gateway did not see is checked
                whole (every string) and withheld if flagged.
  request       `sampling/createMessage` runs the input steps on its messages; an unknown method or a
                refused sampling request never reaches the client: the gateway answers the server.
  notification  `notifications/*` pass; anything else is dropped.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from gateway.mcp import jsonrpc, methods
from gateway.mcp.jsonrpc import Message, id_key
from gateway.mcp.mapping import Scope, check_call, check_texts, record_refusal, strings, unmask, withhold_binary
from gateway.mcp.methods import Method

UNKNOWN = Method("unknown", "client", result="unknown")


@dataclass(slots=True)
class Pending:
    """A client request on its way: what its answer will carry."""

    method: Method
    tool: str | None = None
    restore: dict[str, str] = field(default_factory=dict)


class Sessions:
    """Requests the gateway forwarded, per (server, Mcp-Session-Id), so an answer that arrives on another
    stream (a GET resumed with Last-Event-ID) is still checked by what it answers. Bounded (LRU)."""

    def __init__(self, max_sessions: int = 4096, per_session: int = 1024) -> None:
        self._s: OrderedDict[tuple[str, str], OrderedDict[str, Pending]] = OrderedDict()
        self.max_sessions, self.per_session = max_sessions, per_session

    def remember(self, server: str, session: str | None, key: str, p: Pending) -> None:
        if not session:
            return
        k = (server, session)
        d = self._s.get(k)
        if d is None:
            d = self._s[k] = OrderedDict()
            while len(self._s) > self.max_sessions:
                self._s.popitem(last=False)
        self._s.move_to_end(k)
        d[key] = p
        while len(d) > self.per_session:
            d.popitem(last=False)

    def get(self, server: str, session: str | None, key: str) -> Pending | None:
        d = self._s.get((server, session or ""))
        return d.get(key) if d is not None else None

    def forget(self, server: str, session: str | None) -> None:
        self._s.pop((server, session or ""), None)


class NotificationRefused(ValueError):
    """A notification the policy refuses: it has no id, so no JSON-RPC error can answer it."""


@dataclass(slots=True)
class FromServer:
    """What happens to one message from the server."""

    forward: dict[str, Any] | None  # the message for the client (None: dropped)
    changed: bool = False
    reply: dict[str, Any] | None = None  # an answer the gateway sends the server itself


class Traffic:
    """One policy applied to the messages of one HTTP request (or one stdio session)."""

    def __init__(self, policy: Any, scope: Scope, *, binary: str = "withhold") -> None:
        self.policy = policy
        self.scope = scope
        self.binary = binary
        self.pending: dict[str, Pending] = {}
        self.rewrote = False  # a client message was changed (tools/call arguments the gate rewrote)

    # ------------------------------------------------------------------ client → server

    async def from_client(self, msg: Message) -> dict[str, Any] | None:
        """None: forward `msg` (its `raw` may have been rewritten); else the error to answer the client with."""
        if msg.kind == "response":
            return None
        name = msg.method or ""
        if msg.kind == "notification":
            if methods.is_notification_method(name):
                return None
            record_refusal(self.policy, self.scope, name, "from_client", "method_not_allowed")
            raise NotificationRefused(
                f"notification {name[:100]!r} is refused by policy '{self.policy.name}': only notifications/* pass"
            )
        entry = methods.lookup(name, "client")
        if entry is None:
            record_refusal(self.policy, self.scope, name, "from_client", "method_not_allowed")
            return jsonrpc.error(
                msg.id,
                jsonrpc.METHOD_NOT_FOUND,
                f"method {name[:100]!r} is refused by policy '{self.policy.name}': the gateway "
                "does not know what it carries (deny by default)",
            )
        pending = Pending(entry)
        if entry.request == "tool_call":
            params = msg.params
            tool, args = params.get("name"), params.get("arguments")
            if not isinstance(tool, str) or not tool:
                return jsonrpc.error(msg.id, jsonrpc.INVALID_PARAMS, "tools/call needs params.name (a string)")
            if args is not None and not isinstance(args, dict):
                return jsonrpc.error(msg.id, jsonrpc.INVALID_PARAMS, "tools/call params.arguments must be an object")
            cc = await check_call(self.policy, self.scope, msg.id, tool, args)
            if cc.refused:
                return jsonrpc.error(
                    msg.id, jsonrpc.POLICY_REFUSED, cc.reason, {"guardgate": {"policy": self.policy.name, "tool": tool}}
                )
            if cc.changed:
                msg.raw["params"] = {**params, "arguments": cc.arguments}
                self.rewrote = True
            pending.tool, pending.restore = tool, cc.restore
        self.pending[id_key(msg.id)] = pending
        return None

    # ------------------------------------------------------------------ server → client

    async def from_server(self, msg: Message, earlier: Pending | None = None) -> FromServer:
        """`earlier`: what the session remembers about the request this answers (another stream's)."""
        raw = msg.raw
        if msg.kind == "notification":
            ok = methods.is_notification_method(msg.method or "")
            return FromServer(raw if ok else None)
        if msg.kind == "request":
            return await self._server_request(msg)
        pending = self.pending.get(id_key(msg.id)) or earlier or Pending(UNKNOWN)
        m, kind = pending.method, pending.method.result
        if kind == "protocol":
            return FromServer(raw)
        if "error" in raw:
            check = await check_texts(self.policy, self.scope, m.name, pending.tool, strings(raw["error"]))
            if check.blocked:
                return FromServer(jsonrpc.error(msg.id, jsonrpc.POLICY_REFUSED, check.reason), True)
            return FromServer(raw, check.changed)
        result: dict[str, Any] = raw["result"]
        if kind.startswith("list:"):
            return FromServer(raw, await self._list(m.name, result, kind[5:]))
        if kind == "initialize":
            text = result.get("instructions")
            if not isinstance(text, str):
                return FromServer(raw)
            holder = {"instructions": text}
            check = await check_texts(self.policy, self.scope, m.name, None, strings(holder)[:1])
            if check.blocked:
                del result["instructions"]  # the server's instructions are withheld, the session goes on
                return FromServer(raw, True)
            result["instructions"] = holder["instructions"]
            return FromServer(raw, check.changed)
        changed = self.binary != "pass" and withhold_binary(result) > 0
        check = await check_texts(self.policy, self.scope, m.name, pending.tool, strings(result))
        if check.blocked:
            if kind == "tool_result":
                raw["result"] = {"content": [{"type": "text", "text": check.reason}], "isError": True}
                return FromServer(raw, True)
            return FromServer(jsonrpc.error(msg.id, jsonrpc.POLICY_REFUSED, check.reason), True)
        if pending.restore:
            unmask(result, pending.restore)
            changed = True
        return FromServer(raw, changed or check.changed)

    async def _list(self, method: str, result: dict[str, Any], key: str) -> bool:
        """Each item of a list result checked on its own; a flagged one is removed. True if any was."""
        items = result.get(key)
        if not isinstance(items, list):
            return False
        checks = await asyncio.gather(
            *(check_texts(self.policy, self.scope, method, _item_name(item), strings(item)) for item in items)
        )
        kept = [item for item, c in zip(items, checks, strict=True) if not (c.blocked or c.changed)]
        if len(kept) == len(items):
            return False
        result[key] = kept
        return True

    async def _server_request(self, msg: Message) -> FromServer:
        name = msg.method or ""
        entry = methods.lookup(name, "server")
        if entry is None:
            record_refusal(self.policy, self.scope, name, "from_server", "method_not_allowed")
            return FromServer(
                None,
                True,
                jsonrpc.error(
                    msg.id,
                    jsonrpc.METHOD_NOT_FOUND,
                    f"method {name[:100]!r} is refused by the client's gateway "
                    f"(policy '{self.policy.name}': deny by default)",
                ),
            )
        if entry.request == "sampling":
            check = await check_texts(self.policy, self.scope, name, None, strings(msg.params))
            if check.blocked:
                return FromServer(None, True, jsonrpc.error(msg.id, jsonrpc.POLICY_REFUSED, check.reason))
            return FromServer(msg.raw, check.changed)
        return FromServer(msg.raw)


def _item_name(item: Any) -> str | None:
    name = item.get("name") if isinstance(item, dict) else None
    return name if isinstance(name, str) else None

"""MCP metrics: messages per server, method and direction; policy outcomes per server, method and tool.

prometheus_client instruments in the gateway's registry (`Telemetry.registry`); tool names are
bounded per server (the first `MAX_TOOLS` seen, then "other") because a client may name any tool.
"""

from __future__ import annotations

import re
from typing import Any

from prometheus_client import Counter

MAX_TOOLS = 200
_LABEL = re.compile(r"[A-Za-z0-9_./:-]{1,64}")


class McpMetrics:
    def __init__(self, registry: Any) -> None:
        self.messages = Counter(
            "guardgate_mcp_messages",
            "MCP messages by server, method (for an answer: the "
            "method it answers), direction (to_server, to_client) and outcome (forwarded, "
            "changed, refused, dropped).",
            ["server", "method", "direction", "outcome"],
            registry=registry,
        )
        self.checks = Counter(
            "guardgate_mcp_checks",
            "Policy checks of MCP traffic by server, method, tool, "
            "stage (input: toward the model, output: tools/call) and the action taken.",
            ["server", "method", "tool", "stage", "action"],
            registry=registry,
        )
        self._tools: dict[str, set[str]] = {}

    def method(self, name: str | None) -> str:
        """A bounded method label: the known MCP methods, notifications by name, anything else "other"."""
        from gateway.mcp.methods import TABLE

        if name in TABLE or name in ("unknown", "response"):
            return str(name)
        if name and name.startswith("notifications/") and _LABEL.fullmatch(name) and len(name) < 48:
            return name
        return "other"

    def tool(self, server: str, name: str | None) -> str:
        if not name:
            return "-"
        seen = self._tools.setdefault(server, set())
        if name in seen:
            return name
        if len(seen) < MAX_TOOLS and _LABEL.fullmatch(name):
            seen.add(name)
            return name
        return "other"

    def message(self, server: str, method: str | None, direction: str, outcome: str) -> None:
        self.messages.labels(server, self.method(method), direction, outcome).inc()

    def check(self, server: str, method: str, tool: str | None, stage: str, action: str) -> None:
        self.checks.labels(server, self.method(method), self.tool(server, tool), stage, action).inc()

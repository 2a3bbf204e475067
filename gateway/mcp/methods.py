"""The MCP method table: what each method carries, and which policy stage sees it.

Data, like `gateway.endpoints`: per method, who may send it, what its params carry (`request`) and
what its result carries (`result`):

  request  "protocol"  nothing the gateway guards (handshake, ping, subscriptions, log level)
           "tool_call" from the model: the call (name + arguments) runs the `output` steps
           "sampling"  a server's LLM request: its messages run the `input` steps
  result   "protocol"  nothing toward the model
           "initialize"  the server's `instructions` (read by the model): `input` steps
           "list:<key>"  tools / prompts / resources: each item's texts run the `input` steps, a
                         flagged item is removed from the list
           "tool_result" every text of a tools/call result: `input` steps
           "contents"    resources/read contents: `input` steps
           "prompt"      prompts/get description and messages: `input` steps

Notifications (`notifications/...`) are protocol in both directions. Under a policy that inspects
anything, a method that is not in this table (or sent the wrong way) is refused, naming it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Sender = Literal["client", "server", "both"]


@dataclass(frozen=True, slots=True)
class Method:
    name: str
    sender: Sender
    request: str = "protocol"
    result: str = "protocol"

    def sent_by(self, who: str) -> bool:
        return self.sender == "both" or self.sender == who


def _m(name: str, sender: Sender, request: str = "protocol", result: str = "protocol") -> Method:
    return Method(name, sender, request, result)


TABLE: dict[str, Method] = {
    m.name: m
    for m in (
        # client → server
        _m("initialize", "client", result="initialize"),
        _m("ping", "both"),
        _m("logging/setLevel", "client"),
        _m("completion/complete", "client"),
        _m("tools/list", "client", result="list:tools"),
        _m("tools/call", "client", request="tool_call", result="tool_result"),
        _m("resources/list", "client", result="list:resources"),
        _m("resources/templates/list", "client", result="list:resourceTemplates"),
        _m("resources/read", "client", result="contents"),
        _m("resources/subscribe", "client"),
        _m("resources/unsubscribe", "client"),
        _m("prompts/list", "client", result="list:prompts"),
        _m("prompts/get", "client", result="prompt"),
        # server → client
        _m("sampling/createMessage", "server", request="sampling"),
        _m("elicitation/create", "server"),
        _m("roots/list", "server"),
    )
}

NOTIFICATION_PREFIX = "notifications/"


def lookup(method: str, sender: str) -> Method | None:
    """The table's entry for a request `sender` ("client" | "server") may send; None if refused."""
    m = TABLE.get(method)
    return m if m is not None and m.sent_by(sender) else None


def is_notification_method(method: str) -> bool:
    return method.startswith(NOTIFICATION_PREFIX) and len(method) > len(NOTIFICATION_PREFIX)


# Which stage guards what (docs/mcp.md has this table for users).
DIRECTION = {
    "tool_call": "output",
    "sampling": "input",
    "initialize": "input",
    "tool_result": "input",
    "contents": "input",
    "prompt": "input",
}

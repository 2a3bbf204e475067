"""`openai-agents` driving a tool loop through Guardgate to a FastMCP server.

The agent's model is a scripted chat upstream (reached through the gateway's /v1) that asks for one
tool and then repeats what the tool returned; its MCP server is `MCPServerStreamableHttp` pointed at
/mcp/tools (tests/mcp_fixtures.POLICY). What the model is offered and what it reads back is what
the policy let through.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from harness import CREATED, oa_completion
from mcp_fixtures import INJECTION, POLICY, SECRET, McpServer

from gateway.policy.chain import PolicyStore

agents = pytest.importorskip("agents")
from agents.mcp import MCPServerStreamableHttp  # noqa: E402


def tool_call(name: str, args: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": "chatcmpl-t",
        "object": "chat.completion",
        "created": CREATED,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "finish_reason": "tool_calls",
                "message": {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {"id": "call_1", "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}
                    ],
                },
            }
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10},
    }


class ChatScript:
    """Asks for `tool(args)` first, then answers with what the tool returned."""

    def __init__(self) -> None:
        self.tool: tuple[str, dict[str, Any]] = ("add", {"a": 1, "b": 2})
        self.bodies: list[dict[str, Any]] = []

    async def handler(self, request: web.Request, up: Any) -> web.StreamResponse:
        body = up.last.json()
        self.bodies.append(body)
        last = body["messages"][-1]
        if last["role"] == "tool":
            content = last["content"] if isinstance(last["content"], str) else json.dumps(last["content"])
            return web.json_response(oa_completion("Tool said: " + content, model="m"))
        return web.json_response(tool_call(*self.tool))


@pytest.fixture
def loop_stack(make_stack, tmp_path: Path) -> Any:
    server = McpServer()
    script = ChatScript()
    path = tmp_path / "mcp.yaml"
    path.write_text(POLICY)
    st = make_stack(
        {
            "upstreams": {"main": {"base_url": "SCRIPTED"}},
            "mcp_servers": {"tools": {"url": server.url, "policy": str(path)}},
        },
        handler=script.handler,
        policies=PolicyStore(required=[str(path)]),
    )
    st.server, st.script = server, script
    yield st
    server.close()


async def run_agent(st: Any, tool: str, args: dict[str, Any]) -> str:
    st.script.tool = (tool, args)
    agents.set_tracing_disabled(True)
    model = agents.OpenAIChatCompletionsModel(model="m", openai_client=st.async_openai())
    async with MCPServerStreamableHttp(
        params={"url": st.url + "/mcp/tools"}, name="tools", client_session_timeout_seconds=10
    ) as mcp_server:
        agent = agents.Agent(name="a", instructions="Use the tools.", model=model, mcp_servers=[mcp_server])
        result = await agents.Runner.run(agent, "go", max_turns=4)
    return str(result.final_output)


async def test_agent_tool_loop_through_the_gateway(loop_stack) -> None:
    st = loop_stack
    out = await run_agent(st, "add", {"a": 20, "b": 22})
    assert out.startswith("Tool said:") and '"42"' in out
    offered = [t["function"]["name"] for t in st.script.bodies[0]["tools"]]
    assert "add" in offered and "poisoned" not in offered  # the tag-character description is not offered
    assert ("add", {"a": 20, "b": 22}) in st.server.state.calls


async def test_agent_never_reads_an_injection_or_a_secret(loop_stack) -> None:
    st = loop_stack
    out = await run_agent(st, "fetch_page", {"url": "https://example.com/a"})
    assert "Withheld by policy" in out and "IGNORE ALL" not in out
    assert INJECTION not in json.dumps(st.script.bodies)
    out = await run_agent(st, "read_config", {})
    assert "[secret redacted]" in out and SECRET not in json.dumps(st.script.bodies)


async def test_agent_denied_tool_never_reaches_the_server(loop_stack) -> None:
    st = loop_stack
    out = await run_agent(st, "delete_all", {"confirm": True})
    # the SDK turns the gateway's JSON-RPC error into its generic tool-error text for the model
    assert out.startswith("Tool said: An error occurred while running the tool")
    assert st.server.state.deleted == []

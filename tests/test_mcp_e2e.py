"""MCP through Guardgate, end to end: the official `mcp` SDK on both sides.

A FastMCP server over Streamable HTTP on loopback; the SDK's `streamablehttp_client` talking to it
directly and through the gateway (the uvloop server of tests/harness.py), under a policy
(tests/mcp_fixtures.POLICY) and without one. Client-visible results are compared direct vs gateway.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from harness import wait_until
from mcp import ClientSession
from mcp.client.streamable_http import streamablehttp_client
from mcp.shared.exceptions import McpError
from mcp_fixtures import INJECTION, POLICY, README, SECRET, TAGS, McpServer

from gateway.policy.audit import AuditLog
from gateway.policy.chain import PolicyStore


@pytest.fixture
def server() -> Any:
    s = McpServer()
    yield s
    s.close()


@pytest.fixture
def gateway(make_stack, tmp_path: Path, server: McpServer, monkeypatch) -> Any:
    def make(policy: str | None = POLICY, keys: bool = False, **server_opts: Any) -> Any:
        cfg: dict[str, Any] = {
            "upstreams": {"main": {"base_url": "SCRIPTED"}},
            "mcp_servers": {"tools": {"url": server.url, **server_opts}},
        }
        store = None
        if policy == "starter":
            from gateway import starter

            cfg["mcp_servers"]["tools"]["policy"] = "starter"
            store = PolicyStore(required=["starter"], builtins=[starter.build()])
        elif policy is not None:
            path = tmp_path / "mcp.yaml"
            path.write_text(policy)
            cfg["mcp_servers"]["tools"]["policy"] = str(path)
            store = PolicyStore(required=[str(path)])
        if keys:
            monkeypatch.setenv("GG_KEY", "gg-secret-key")
            cfg["keys"] = [{"name": "team", "key_env": "GG_KEY"}]
        audit = AuditLog(tmp_path / "audit.jsonl")
        st = make_stack(cfg, policies=store, audit=audit)
        st.mcp_url = st.url + "/mcp/tools"
        st.audit_path = tmp_path / "audit.jsonl"
        return st

    return make


@contextlib.asynccontextmanager
async def session(url: str, **kw: Any) -> AsyncIterator[ClientSession]:
    async with streamablehttp_client(url, **kw) as (read, write, _), ClientSession(read, write) as s:
        await s.initialize()
        yield s


def dump(result: Any) -> Any:
    return result.model_dump(mode="json", exclude_none=True)


def audit(st: Any) -> list[dict[str, Any]]:
    wait_until(lambda: st.audit_path.exists() and st.audit_path.read_text().strip() != "")
    return [json.loads(line) for line in st.audit_path.read_text().splitlines()]


async def benign_scenario(url: str) -> dict[str, Any]:
    """Everything a well-behaved client sees of the benign parts of the server."""
    progress: list[tuple[float, float | None, str | None]] = []

    async def on_progress(p: float, total: float | None, message: str | None) -> None:
        progress.append((p, total, message))

    async with streamablehttp_client(url) as (read, write, get_id), ClientSession(read, write) as s:
        init = await s.initialize()
        out: dict[str, Any] = {"init": dump(init)}
        tools = await s.list_tools()
        out["tools"] = [dump(t) for t in tools.tools if t.name != "poisoned"]
        out["add"] = dump(await s.call_tool("add", {"a": 2, "b": 40}))
        out["echo"] = dump(await s.call_tool("echo", {"text": "héllo 👋🏽 مرحبا"}))
        out["count"] = dump(await s.call_tool("count", {"n": 3}, progress_callback=on_progress))
        out["progress"] = progress
        out["resources"] = dump(await s.list_resources())
        out["readme"] = dump(await s.read_resource("docs://readme"))
        out["prompts"] = dump(await s.list_prompts())
        out["prompt"] = dump(await s.get_prompt("greet", {"name": "Ada"}))
        out["ping"] = dump(await s.send_ping())
        out["session"] = bool(get_id())
    return out


async def test_benign_traffic_is_the_same_through_the_gateway(gateway, server) -> None:
    st = gateway()
    direct = await benign_scenario(server.url)
    through = await benign_scenario(st.mcp_url)
    assert through == direct
    assert direct["add"]["structuredContent"] == {"result": 42}
    assert [p[0] for p in direct["progress"]] == [1, 2, 3]
    assert direct["readme"]["contents"][0]["text"] == README
    assert direct["session"] is True


async def test_tool_with_hidden_tag_characters_is_not_offered(gateway, server) -> None:
    st = gateway()
    async with session(server.url) as s:
        assert "poisoned" in [t.name for t in (await s.list_tools()).tools]
    async with session(st.mcp_url) as s:
        names = [t.name for t in (await s.list_tools()).tools]
    assert "poisoned" not in names and "add" in names
    rec = next(r for r in audit(st) if r.get("mcp", {}).get("tool") == "poisoned")
    assert rec["action"] == "block" and rec["mcp"]["method"] == "tools/list"
    assert rec["dialect"] == "mcp" and rec["route"] == "/mcp/tools"


async def test_result_with_injection_never_reaches_the_client(gateway, server) -> None:
    st = gateway()
    async with session(st.mcp_url) as s:
        res = await s.call_tool("fetch_page", {"url": "https://example.com/weather"})
    text = json.dumps(dump(res))
    assert res.isError is True
    assert "IGNORE ALL PREVIOUS" not in text and "evil.example" not in text
    assert "Withheld by policy" in res.content[0].text
    assert server.state.calls[-1][0] == "fetch_page"  # the call went through; its result did not
    assert INJECTION not in st.audit_path.read_text()


async def test_secret_in_a_result_is_redacted(gateway) -> None:
    st = gateway()
    async with session(st.mcp_url) as s:
        res = await s.call_tool("read_config", {})
    assert res.isError is False
    assert SECRET not in json.dumps(dump(res))
    assert "aws_access_key_id=[secret redacted]" in res.content[0].text


async def test_denied_tool_never_reaches_the_server(gateway, server) -> None:
    st = gateway()
    async with session(st.mcp_url) as s:
        with pytest.raises(McpError) as e:
            await s.call_tool("delete_all", {"confirm": True})
        assert "refused by policy" in str(e.value) and "deny:delete_all" in str(e.value)
        with pytest.raises(McpError) as e:
            await s.call_tool("fetch_page", {"url": "https://evil.example/x"})
        assert "host_in" in str(e.value)
        assert dump(await s.call_tool("add", {"a": 1, "b": 1}))["structuredContent"] == {"result": 2}
    assert server.state.deleted == []
    assert [c[0] for c in server.state.calls] == ["add"]
    rec = next(r for r in audit(st) if r.get("mcp", {}).get("tool") == "delete_all")
    assert rec["action"] == "block" and rec["mcp"]["direction"] == "from_model"


async def _post(url: str, body: Any, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    h = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json", **(headers or {})}
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with aiohttp.ClientSession() as c, c.post(url, data=data, headers=h) as r:
        text = await r.text()
        return r.status, json.loads(text) if text.strip().startswith(("{", "[")) else text


async def test_unknown_methods_are_refused_naming_them(gateway, server) -> None:
    st = gateway()
    status, body = await _post(st.mcp_url, {"jsonrpc": "2.0", "id": 7, "method": "tasks/list", "params": {}})
    assert status == 200 and body["id"] == 7 and body["error"]["code"] == -32601
    assert "tasks/list" in body["error"]["message"]
    # a server-to-client method sent by the client is refused too
    status, body = await _post(st.mcp_url, {"jsonrpc": "2.0", "id": 8, "method": "sampling/createMessage"})
    assert body["error"]["code"] == -32601
    # a notification that is not notifications/*: no id to answer, so a 400
    status, body = await _post(st.mcp_url, {"jsonrpc": "2.0", "method": "tools/call"})
    assert status == 400 and body["error"]["code"] == -32601 and body["id"] is None
    # a batch with one refused request: nothing of it reaches the server
    status, body = await _post(
        st.mcp_url, [{"jsonrpc": "2.0", "id": 1, "method": "ping"}, {"jsonrpc": "2.0", "id": 2, "method": "x/y"}]
    )
    assert [b["id"] for b in body] == [1, 2] and "another message" in body[0]["error"]["message"]
    assert server.state.calls == []
    refused = [r for r in audit(st) if r.get("error") == "method_not_allowed"]
    assert {r["mcp"]["method"] for r in refused} == {"tasks/list", "sampling/createMessage", "tools/call", "x/y"}
    assert all(r["action"] == "block" and r["status"] == 403 for r in refused)


async def test_without_a_policy_everything_passes(gateway, server) -> None:
    st = gateway(policy=None)
    async with session(st.mcp_url) as s:
        tools = {t.name: t for t in (await s.list_tools()).tools}
        res = await s.call_tool("fetch_page", {"url": "https://evil.example/x"})
    assert TAGS in (tools["poisoned"].description or "")
    assert res.content[0].text == INJECTION


async def test_gateway_keys_apply_to_mcp(gateway) -> None:
    st = gateway(keys=True)
    status, body = await _post(st.mcp_url, {"jsonrpc": "2.0", "id": 1, "method": "ping"})
    assert status == 401 and body["error"]["message"] == "missing gateway key"
    async with session(st.mcp_url, headers={"Authorization": "Bearer gg-secret-key"}) as s:
        assert dump(await s.call_tool("add", {"a": 1, "b": 2}))["structuredContent"] == {"result": 3}


async def test_unknown_server_and_paths(gateway) -> None:
    st = gateway()
    status, body = await _post(st.url + "/mcp/nope", {"jsonrpc": "2.0", "id": 1, "method": "ping"})
    assert status == 404 and "nope" in body["error"]["message"]
    async with aiohttp.ClientSession() as c, c.put(st.mcp_url, data=b"{}") as r:
        assert r.status == 405


async def test_the_starter_policy_covers_mcp(gateway, server) -> None:
    st = gateway(policy="starter")
    async with session(st.mcp_url) as s:
        names = [t.name for t in (await s.list_tools()).tools]
        assert "poisoned" not in names and "add" in names  # hidden Unicode in a description
        res = await s.call_tool("read_config", {})
        assert SECRET not in res.content[0].text and "[secret redacted]" in res.content[0].text
        assert dump(await s.call_tool("add", {"a": 1, "b": 2}))["structuredContent"] == {"result": 3}

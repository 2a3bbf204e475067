"""`guardgate mcp wrap -- CMD`: a stdio FastMCP server under the policy, driven by the SDK's stdio client."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.shared.exceptions import McpError
from mcp_fixtures import POLICY, SECRET

FIXTURES = str(Path(__file__).with_name("mcp_fixtures.py"))
ROOT = str(Path(__file__).resolve().parent.parent)

pytestmark = pytest.mark.slow  # subprocesses


def params(tmp_path: Path, *wrap_args: str) -> StdioServerParameters:
    policy = tmp_path / "mcp.yaml"
    policy.write_text(POLICY)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, str(Path(FIXTURES).parent)])}
    return StdioServerParameters(
        command=sys.executable,
        args=[
            "-m",
            "gateway.cli",
            "mcp",
            "wrap",
            "--policy",
            str(policy),
            "--audit",
            str(tmp_path / "a.jsonl"),
            *wrap_args,
            "--",
            sys.executable,
            FIXTURES,
        ],
        env=env,
        cwd=str(tmp_path),
    )


async def test_wrapped_stdio_server_is_guarded(tmp_path: Path) -> None:
    async with stdio_client(params(tmp_path, "--name", "fixtures")) as (read, write), ClientSession(read, write) as s:
        await s.initialize()
        names = [t.name for t in (await s.list_tools()).tools]
        assert "add" in names and "poisoned" not in names
        res = await s.call_tool("add", {"a": 2, "b": 3})
        assert res.structuredContent == {"result": 5}
        res = await s.call_tool("fetch_page", {"url": "https://example.com/"})
        assert res.isError and "Withheld by policy" in res.content[0].text
        res = await s.call_tool("read_config", {})
        assert SECRET not in res.content[0].text and "[secret redacted]" in res.content[0].text
        with pytest.raises(McpError, match="deny:delete_all"):
            await s.call_tool("delete_all", {})
        assert (await s.read_resource("docs://readme")).contents[0].text.startswith("Guardgate MCP")
    recs: list[dict[str, Any]] = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert any(r["mcp"].get("tool") == "delete_all" and r["action"] == "block" for r in recs)
    assert all(r["mcp"]["server"] == "fixtures" for r in recs)


async def test_wrap_without_a_policy_changes_nothing(tmp_path: Path) -> None:
    p = params(tmp_path)
    p.args = ["-m", "gateway.cli", "mcp", "wrap", "--policy", "none", "--", sys.executable, FIXTURES]
    async with stdio_client(p) as (read, write), ClientSession(read, write) as s:
        await s.initialize()
        assert "poisoned" in [t.name for t in (await s.list_tools()).tools]
        assert (await s.call_tool("read_config", {})).content[0].text.count(SECRET) == 1

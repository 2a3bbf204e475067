"""`guardgate serve` (the production entry point, a subprocess) with an MCP-only config: the startup
table and /readyz list the servers, and the SDK's client works through it under the starter policy."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from harness import wait_until
from mcp import ClientSession
from mcp.client.streamable_http import streamablehttp_client
from mcp_fixtures import SECRET, McpServer, free_port

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow  # a subprocess


async def test_guardgate_serve_fronts_an_mcp_server(tmp_path: Path) -> None:
    server = McpServer()
    port = free_port()
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(
        f"listen: {{host: 127.0.0.1, port: {port}}}\nmcp_servers:\n  tools: {{url: '{server.url}', policy: starter}}\n"
    )
    log = tmp_path / "serve.log"
    with log.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "serve", "--config", str(cfg)],
            cwd=tmp_path,
            stderr=err,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
    try:
        assert wait_until(lambda: "mcp servers" in log.read_text(), timeout=60), log.read_text()
        table = log.read_text()
        assert f"/mcp/tools  {server.url}  starter" in table
        ready = httpx.get(f"http://127.0.0.1:{port}/readyz").json()
        assert ready["mcp_servers"] == [{"name": "tools", "path": "/mcp/tools", "url": server.url, "policy": "starter"}]
        async with (
            streamablehttp_client(f"http://127.0.0.1:{port}/mcp/tools") as (read, write, _),
            ClientSession(read, write) as s,
        ):
            await s.initialize()
            names = [t.name for t in (await s.list_tools()).tools]
            assert "add" in names and "poisoned" not in names
            res = await s.call_tool("read_config", {})
            assert SECRET not in res.content[0].text and "[secret redacted]" in res.content[0].text
    finally:
        proc.terminate()
        proc.wait(20)
        server.close()

"""Added latency of a benign MCP `tools/call` through Guardgate (docs/performance.md, "MCP").

One run, side by side: a FastMCP server (the official SDK, Streamable HTTP, a subprocess under
uvicorn) and `guardgate serve` (a subprocess) fronting it twice: `/mcp/relay` without a policy (bytes
relayed) and `/mcp/guarded` under a policy with no model guard (hidden_unicode and regex on what
goes to the model, `tools` on the call). One SDK client session per target; the calls are
interleaved (direct, relay, guarded, direct, ...) so the machine's noise lands on all three.

    python bench/bench_mcp.py [--calls 300]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
POLICY = """
name: bench
input:
  steps:
    - guard: hidden_unicode
    - guard: regex
      patterns: ['(?i)ignore (all )?previous instructions']
      action: block
output:
  steps:
    - guard: tools
      deny: [delete_all]
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve_mcp(port: int) -> None:
    import uvicorn
    from mcp.server.fastmcp import FastMCP

    mcp = FastMCP("bench", log_level="WARNING")

    @mcp.tool()
    def add(a: int, b: int) -> int:
        """Add two numbers."""
        return a + b

    uvicorn.run(mcp.streamable_http_app(), host="127.0.0.1", port=port, log_level="warning")


def wait_http(url: str, timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


async def measure(urls: dict[str, str], calls: int) -> dict[str, list[float]]:
    from contextlib import AsyncExitStack

    from mcp import ClientSession
    from mcp.client.streamable_http import streamablehttp_client

    out: dict[str, list[float]] = {k: [] for k in urls}
    async with AsyncExitStack() as stack:
        sessions = {}
        for name, url in urls.items():
            read, write, _ = await stack.enter_async_context(streamablehttp_client(url))
            s = await stack.enter_async_context(ClientSession(read, write))
            await s.initialize()
            await s.list_tools()
            for _ in range(20):  # warm-up: pools, caches
                await s.call_tool("add", {"a": 1, "b": 2})
            sessions[name] = s
        for i in range(calls):
            for name, s in sessions.items():
                t0 = time.perf_counter()
                res = await s.call_tool("add", {"a": i, "b": 1})
                out[name].append((time.perf_counter() - t0) * 1000)
                assert res.structuredContent == {"result": i + 1}, res
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--serve-mcp", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_mcp:
        serve_mcp(args.serve_mcp)
        return 0
    mcp_port, gw_port = free_port(), free_port()
    tmp = Path(tempfile.mkdtemp())
    (tmp / "bench.yaml").write_text(POLICY)
    mcp_url = f"http://127.0.0.1:{mcp_port}/mcp"
    (tmp / "gateway.yaml").write_text(f"""
listen: {{host: 127.0.0.1, port: {gw_port}}}
policy_dirs: ["{tmp}"]
mcp_servers:
  relay: {{url: "{mcp_url}"}}
  guarded: {{url: "{mcp_url}", policy: bench}}
""")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen([sys.executable, __file__, "--serve-mcp", str(mcp_port)], env=env, stderr=subprocess.DEVNULL),
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gateway.cli",
                "serve",
                "--config",
                str(tmp / "gateway.yaml"),
                "--log-level",
                "WARNING",
            ],
            env=env,
            stderr=subprocess.DEVNULL,
        ),
    ]
    try:
        wait_http(mcp_url)
        wait_http(f"http://127.0.0.1:{gw_port}/healthz")
        base = f"http://127.0.0.1:{gw_port}/mcp"
        res = asyncio.run(
            measure({"direct": mcp_url, "relay": f"{base}/relay", "guarded": f"{base}/guarded"}, args.calls)
        )
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)
    p50 = {k: statistics.median(v) for k, v in res.items()}
    p99 = {k: statistics.quantiles(v, n=100)[98] for k, v in res.items()}
    print(f"benign tools/call, {args.calls} calls each, interleaved (ms)")
    print(f"{'target':10} {'p50':>8} {'p99':>8} {'added p50':>10}")
    for k in res:
        print(f"{k:10} {p50[k]:8.2f} {p99[k]:8.2f} {p50[k] - p50['direct']:+10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

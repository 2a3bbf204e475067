"""The tests run the event loop `guardgate serve` runs (uvloop where installed), everywhere.

CodeShield's semgrep tier worked under asyncio's loop and never ran under uvloop's (argv[0] of a
subprocess), and the tests, on asyncio's loop, did not see it. These fail if the loops differ again:
pytest-asyncio's loop, the harness's server loop, and the loop a real `guardgate serve` reports.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import pytest
from harness import Loop

from gateway.cli import loop_name, serve_loop_policy


def serve_loop_class() -> type:
    loop = serve_loop_policy().new_event_loop()
    try:
        return type(loop)
    finally:
        loop.close()


def test_serve_runs_uvloop_where_it_is_installed() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on every POSIX install
        assert serve_loop_class() is type(asyncio.DefaultEventLoopPolicy().new_event_loop())
        return
    assert serve_loop_class() is uvloop.Loop


async def test_async_tests_run_the_serve_loop() -> None:
    assert type(asyncio.get_running_loop()) is serve_loop_class()


def test_harness_servers_run_the_serve_loop() -> None:
    lp = Loop()
    try:
        assert type(lp.loop) is serve_loop_class()
    finally:
        lp.close()


@pytest.mark.slow
async def test_guardgate_serve_reports_the_loop_the_tests_run() -> None:
    """`guardgate serve` itself, as a subprocess: its startup line names its loop."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "serve", "--upstream", "http://127.0.0.1:9/v1", "--port", "0",
         "--log-level", "WARNING"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env={**os.environ},
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 30
        line = ""
        while time.monotonic() < deadline and "event loop:" not in line:
            line = proc.stderr.readline()
            if not line and proc.poll() is not None:
                break
        assert "event loop:" in line, line
        served = line.rsplit("event loop: ", 1)[1].rstrip().rstrip(")")
        assert served == loop_name(asyncio.get_running_loop())
    finally:
        proc.terminate()
        proc.wait(10)

"""Synchronisation for tests: wait for a condition or an event, never for a guessed amount of time.

A test that needs "the other side got somewhere" polls that condition with a deadline (`wait_until`,
`until`) or blocks on an event the other side sets (`Hold`, `wait_ready`). A deadline that passes is
a failure with a message, not a hang; pytest-timeout (pyproject) is the backstop for the rest.
"""

from __future__ import annotations

import asyncio
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx


def wait_until(pred: Callable[[], Any], timeout: float = 5.0, interval: float = 0.01) -> bool:
    """Poll `pred` (from a plain thread) until it is true or `timeout` seconds passed; its last value."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(interval)
    return bool(pred())


async def until(pred: Callable[[], Any], timeout: float = 5.0, interval: float = 0.001) -> bool:
    """`wait_until` for a coroutine: polls without blocking the event loop."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        await asyncio.sleep(interval)
    return bool(pred())


def wait_ready(
    url: str,
    proc: subprocess.Popen | None = None,
    timeout: float = 60.0,
    log: Callable[[], str] = lambda: "",
    path: str = "/readyz",
) -> None:
    """Wait until a server we started answers `path` with 200; fail early (with its log) if it exits."""

    def ready() -> bool:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"server exited {proc.returncode}:\n{log()}")
        try:
            return httpx.get(url + path, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    if not wait_until(ready, timeout, interval=0.1):
        raise AssertionError(f"{url} not ready after {timeout} s:\n{log()}")


class Hold:
    """An event a scripted upstream awaits (`await hold.wait()`) and a test releases from any thread.

    It replaces "sleep long enough to still be in flight": the handler is in flight until the test says
    otherwise. `arrived` is set (a threading.Event) as soon as a handler starts waiting.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._released = False
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self.arrived = threading.Event()

    async def wait(self, timeout: float | None = None) -> bool:
        """Wait for `release()`; True if released, False if `timeout` passed first."""
        ev = asyncio.Event()
        with self._lock:
            if self._released:
                self.arrived.set()
                return True
            self._waiters.append((asyncio.get_running_loop(), ev))
        self.arrived.set()
        try:
            await asyncio.wait_for(ev.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def release(self) -> None:
        with self._lock:
            self._released = True
            waiters, self._waiters = self._waiters, []
        for loop, ev in waiters:
            if not loop.is_closed():
                loop.call_soon_threadsafe(ev.set)

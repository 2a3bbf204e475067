from __future__ import annotations

import asyncio
import functools
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from harness import Loop, ScriptedUpstream

from gateway.cli import serve_loop_policy
from gateway.config import parse
from gateway.server import Gateway, create_app

# Every test runs the event loop `guardgate serve` runs (uvloop where installed): pytest-asyncio's
# loops (its default `event_loop_policy` fixture returns this global policy) and the harness's server
# threads alike. tests/test_event_loop_policy.py fails if they ever differ.
asyncio.set_event_loop_policy(serve_loop_policy())


@dataclass
class Stack:
    """A scripted upstream and a gateway in front of it, both on loopback."""

    loop: Loop
    upstream: ScriptedUpstream
    upstream_url: str
    gateway: Gateway
    url: str  # gateway root, e.g. http://127.0.0.1:PORT

    def openai(self, prefix: str = "/v1", **kw: Any) -> Any:
        import openai

        kw.setdefault("api_key", "sk-client")
        kw.setdefault("max_retries", 0)
        return openai.OpenAI(base_url=self.url + prefix, **kw)

    def async_openai(self, prefix: str = "/v1", **kw: Any) -> Any:
        import openai

        kw.setdefault("api_key", "sk-client")
        kw.setdefault("max_retries", 0)
        return openai.AsyncOpenAI(base_url=self.url + prefix, **kw)

    def llama(self, prefix: str = "/llama/v1", **kw: Any) -> Any:
        import llama_api_client

        kw.setdefault("api_key", "llm-client")
        kw.setdefault("max_retries", 0)
        return llama_api_client.LlamaAPIClient(base_url=self.url + prefix, **kw)

    def async_llama(self, prefix: str = "/llama/v1", **kw: Any) -> Any:
        import llama_api_client

        kw.setdefault("api_key", "llm-client")
        kw.setdefault("max_retries", 0)
        return llama_api_client.AsyncLlamaAPIClient(base_url=self.url + prefix, **kw)


StackFactory = Callable[..., Stack]


def build_stack(loops: list[Loop], config: dict | None = None, *, handler: Any = None, dialect: str = "openai",
                policies: Any = None, audit: Any = None) -> Stack:
    """A Stack on a new Loop (appended to `loops`: the caller closes them). `make_stack` without the fixture,
    for module-scoped stacks."""
    loop = Loop()
    loops.append(loop)
    up = ScriptedUpstream(handler=handler)
    up.port = loop.serve(up.app())
    up_url = f"http://127.0.0.1:{up.port}/v1"
    cfg_dict = dict(config or {})
    cfg_dict.setdefault("upstreams", {"main": {"base_url": up_url, "dialect": dialect,
                                               "timeouts": {"connect": 2, "read": 5}}})
    for u in cfg_dict["upstreams"].values():
        if u.get("base_url") == "SCRIPTED":
            u["base_url"] = up_url
    cfg = parse(cfg_dict, "test-config")
    gw = Gateway(cfg, policies=policies, audit=audit)
    port = loop.serve(create_app(gw))
    return Stack(loop, up, up_url, gw, f"http://127.0.0.1:{port}")


@pytest.fixture
def make_stack() -> Iterator[StackFactory]:
    """make_stack(config_dict_without_base_url, handler=..., dialect='openai', policies=..., audit=...)."""
    loops: list[Loop] = []
    yield functools.partial(build_stack, loops)
    for lp in loops:
        lp.close()


@pytest.fixture
def stack(make_stack: StackFactory) -> Stack:
    return make_stack()


# ---------------------------------------------------------------------------- the `slow` marker
# `python -m pytest -q -m "not slow"` is the fast inner loop; CI runs everything. A test is `slow` when
# it loads a real model (llama.cpp GGUFs, ONNX, torch), starts `guardgate serve` or semgrep, or takes
# over ~2 s: marked by hand (`@pytest.mark.slow`, or `pytestmark` for a whole module), and here for
# every test that uses one of these model fixtures, so a new model test is slow without being told.
SLOW_FIXTURES = frozenset({
    "tiny_gguf", "rig_gguf", "llama4_stub_gguf", "rig8b_gguf",  # llama_fixtures: GGUFs through llama.cpp
    "model_dir", "prompt_guard_model",  # Prompt Guard ONNX models (prompt_guard_fixtures)
})
SLOW_REPORT_S = 3.0  # an unmarked test slower than this is listed at the end of the run


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


_unmarked_slow: list[tuple[float, str]] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call" and report.duration > SLOW_REPORT_S and "slow" not in report.keywords:
        _unmarked_slow.append((report.duration, report.nodeid))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _unmarked_slow:
        terminalreporter.section(f"tests over {SLOW_REPORT_S:.0f} s without the slow marker")
        for d, nodeid in sorted(_unmarked_slow, reverse=True):
            terminalreporter.write_line(f"{d:6.1f}s {nodeid}")

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

"""The Guard protocol and the guard registry.

A guard is built once per policy step from the step's options and shared by all requests. It
answers one-shot checks (`check`: input stage on the conversation, output stage on a complete
answer) and opens a per-stream `StreamCheck` for the stream stage, which sees the answer grow and
may keep state between checks (Llama Guard keeps its KV cache, CodeShield its fence tracker).

Guards never see wire formats or the server: only neutral `Message`s and text.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from gateway.types import Message, Stage, ToolCall, Verdict


@dataclass(slots=True)
class GuardInput:
    """What a guard is asked to judge.

    stage "input": `messages` is the request's conversation.
    stage "output"/"stream": `messages` is the request's conversation (context) and `text` the
    assistant's answer (the whole answer for "output"; the answer so far for "stream", with
    `window_start` the offset of the text not yet checked and `final` true on the last check).
    """

    stage: Stage
    messages: list[Message]
    text: str = ""
    window_start: int = 0
    final: bool = True
    request_id: str = ""
    context: dict[str, Any] = field(default_factory=dict)
    # Input stage: the text of request fields besides `messages` that the upstream renders to the
    # model (tool definitions, the response_format schema, documents, template kwargs, ...), as
    # (field path, text). Untrusted: an MCP server writes tool descriptions, a retriever documents.
    fields: list[tuple[str, str]] = field(default_factory=list)
    # Output/stream stage: the answer's tool calls that are complete so far (name, id, whole
    # arguments), for guards that judge calls as calls (tools, alignment_check), not as text.
    tool_calls: list[ToolCall] = field(default_factory=list)


class StreamCheck:
    """Per-stream state of one guard. The default re-checks the unchecked window one-shot.

    `calls` is set by the stream gate before every check: the answer's complete tool calls so far.
    """

    def __init__(self, guard: Guard, messages: list[Message], request_id: str) -> None:
        self.guard = guard
        self.messages = messages
        self.request_id = request_id
        self.calls: list[ToolCall] = []

    async def check(self, text: str, window_start: int, final: bool) -> Verdict:
        """Judge `text` (the whole answer so far); `text[window_start:]` is new since the last check."""
        return await self.guard.check(
            GuardInput(
                stage="stream",
                messages=self.messages,
                text=text,
                window_start=window_start,
                final=final,
                request_id=self.request_id,
                tool_calls=list(self.calls),
            )
        )

    async def close(self) -> None:
        """Free per-stream resources (called on stream end, block and client disconnect)."""


class Guard(ABC):
    """Base class of every guard. Subclasses set `name` and `stages` and implement `check`."""

    name: ClassVar[str]
    stages: ClassVar[frozenset[str]] = frozenset({"input", "stream", "output"})
    # True when the guard may rewrite the request on the input stage (returns `Verdict.edits` with a
    # `redact` action of its own): such a step cannot run in parallel with the upstream call.
    rewrites_input: ClassVar[bool] = False

    def __init__(self, **options: Any) -> None:
        self.options = options

    @abstractmethod
    async def check(self, inp: GuardInput) -> Verdict:
        """Judge one input; must not block the event loop (run inference in a worker)."""

    def open_stream(self, messages: list[Message], request_id: str) -> StreamCheck:
        return StreamCheck(self, messages, request_id)

    async def start(self) -> None:
        """Load models etc. Called once when a policy using this guard is activated."""

    async def aclose(self) -> None:
        """Release models and workers."""

    def status(self) -> dict[str, Any]:
        """What this guard can do now, for /readyz: {"state": "ready" | "degraded" | "failed", ...}.

        "failed" makes the gateway not ready (every check would fail, or a part the step requires is
        down); "degraded" is reported but still ready. Guards with parts that can fail on their own
        (CodeShield's semgrep tier) override this; the default is ready once `start()` returned.
        """
        return {"state": "ready"}

    def verdict(self, t0: float, **kw: Any) -> Verdict:
        """A verdict stamped with this guard's name and the latency since `t0` (perf_counter)."""
        return Verdict(guard=self.name, latency_ms=(time.perf_counter() - t0) * 1000.0, **kw)


class GuardConfigError(ValueError):
    """A guard's options are invalid (raised at policy load, reported with file:line)."""


def config_error(guard: str, msg: str, option: str) -> GuardConfigError:
    """`guard: msg`, naming the option so the policy loader can point at its line."""
    e = GuardConfigError(f"{guard}: {msg}")
    e.option = option  # type: ignore[attr-defined]
    return e


def reject_unknown_options(guard: str, options: dict[str, Any], known: tuple[str, ...]) -> None:
    """GuardConfigError naming the first option `guard` does not take."""
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise config_error(guard, f"unknown option(s) {', '.join(unknown)} (known: {', '.join(known)})", unknown[0])


GuardFactory = Callable[..., Guard]
_REGISTRY: dict[str, GuardFactory] = {}


def register(name: str) -> Callable[[GuardFactory], GuardFactory]:
    """Class decorator: make a guard available to policies under `name`."""

    def deco(factory: GuardFactory) -> GuardFactory:
        _REGISTRY[name] = factory
        return factory

    return deco


BUILTIN_MODULES = ("regex", "llama_guard", "prompt_guard", "code_shield")


_builtins_loaded = False


def _load_builtins() -> None:
    # Import the built-in guards for their @register side effect; optional runtimes
    # (llama.cpp, onnxruntime, semgrep) are imported lazily inside each guard, so these
    # imports are cheap and never fail for a missing optional dependency.
    global _builtins_loaded
    if _builtins_loaded:
        return
    import importlib

    for mod in BUILTIN_MODULES:
        importlib.import_module(f"gateway.guards.{mod}")
    _builtins_loaded = True


def create(name: str, **options: Any) -> Guard:
    _load_builtins()
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise GuardConfigError(f"unknown guard {name!r} (known: {', '.join(sorted(_REGISTRY))})") from None
    return factory(**options)


def known() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)

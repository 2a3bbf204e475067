"""The Guard protocol, what a guard receives at start, and the guard registry.

A guard is built once per policy step from the step's options and shared by all requests. It
answers one-shot checks (`check`: input stage on the conversation, output stage on a complete
answer) and opens a per-stream `StreamCheck` for the stream stage, which sees the answer grow and
may keep state between checks (Llama Guard keeps its KV cache, CodeShield its fence tracker).

Guards never see wire formats, upstreams or the server: only neutral `Message`s and text. A guard
that asks a model over HTTP (alignment_check's judge, a remote Llama Guard) gets a `ChatClient` from
the `GuardResources` handed to `Guard.start()`: Exchange in, Completion out; the server builds it
from a configured upstream or a `remote:` URL (`gateway.upstreams.chat_client`).

The registry: a guard registers itself with `@register("name")`; `discover()` imports every module
and subpackage of `gateway.guards`, so a new guard is one module (a package's `__init__` imports the
module that registers). A guard whose optional dependency is missing is known but unavailable:
`availability()` says `missing (pip install 'guardgate[EXTRA]')`, and a policy step naming it gets
an `UnavailableGuard` (its start fails, its checks are error verdicts, `on_error` decides).
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from gateway.types import Completion, Exchange, Message, Stage, ToolCall, Verdict


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
        if self.guard.immediate:
            return self.check_now(text, window_start, final)
        return await self.guard.check(self._input(text, window_start, final))

    def check_now(self, text: str, window_start: int, final: bool) -> Verdict:
        """`check` without a suspension point, for the stream of an `ImmediateGuard` (the gate runs
        it inline). A subclass that keeps state between checks overrides this one."""
        return self.guard.check_now(self._input(text, window_start, final))

    def _input(self, text: str, window_start: int, final: bool) -> GuardInput:
        return GuardInput(stage="stream", messages=self.messages, text=text, window_start=window_start,
                          final=final, request_id=self.request_id, tool_calls=list(self.calls))

    async def close(self) -> None:
        """Free per-stream resources (called on stream end, block and client disconnect)."""


class ResumingStream(StreamCheck):
    """The stream check of a scanner that may leave a run undecided at the end of the text (a regex's
    partial match, a run of invisible characters that may still grow): each check resumes at the
    earliest undecided offset, else at the new window. The guard implements
    `scan_from(t0, text, pos, final) -> (Verdict, undecided offset or None)`."""

    def __init__(self, guard: Guard, messages: list[Message], request_id: str) -> None:
        super().__init__(guard, messages, request_id)
        self._resume: int | None = None

    def check_now(self, text: str, window_start: int, final: bool) -> Verdict:
        t0 = time.perf_counter()
        pos = window_start if self._resume is None else min(self._resume, window_start)
        verdict, self._resume = self.guard.scan_from(t0, text, pos, final)  # type: ignore[attr-defined]
        return verdict


class ChatClient(Protocol):
    """A chat model a guard may ask (built by the server; the guard never sees the wire format)."""

    async def complete(self, exchange: Exchange, *, extra_body: dict[str, Any] | None = None) -> Completion:
        """The model's whole answer to `exchange` (non-stream). `extra_body`: fields merged into the
        request body as they are (e.g. a provider's own options). Raises on any failure (an HTTP
        error, a timeout, an answer that does not decode): the caller's verdict is then an error."""
        ...


class GuardResources:
    """What the running gateway lends a guard at `start()`. This base lends nothing: it is what a
    guard gets where nothing is set up for it (a guard started on its own, in a test or a benchmark).
    The server passes `gateway.upstreams.chat_client.ChatClients` over its upstreams; `guardgate
    check` and `eval` pass one without upstreams (remote endpoints only)."""

    def chat_client(self, upstream: str | None = None, remote: Mapping[str, Any] | None = None) -> ChatClient:
        """A client for the configured upstream named `upstream`, or for the OpenAI-compatible
        endpoint `remote` (`base_url`, `api_key_env`, `timeout_s`, `headers`); exactly one."""
        raise RuntimeError("no chat client is available here: guards that ask a model (alignment_check, a "
                           "remote Llama Guard) run under `guardgate serve`, which builds their clients")


NO_RESOURCES = GuardResources()
REMOTE_KEYS = ("base_url", "api_key_env", "timeout_s", "headers")


def parse_remote(guard: str, raw: Any, *, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """A guard's `remote:` option as a mapping (`remote: URL` is `{base_url: URL}`), checked at policy
    load: `base_url` (http/https), `api_key_env` (a variable's name, never a key), `timeout_s`,
    `headers`, plus the guard's own `extra` keys (such as `model`)."""
    if isinstance(raw, str):
        raw = {"base_url": raw}
    if not isinstance(raw, dict) or not isinstance(raw.get("base_url"), str):
        raise config_error(guard, "remote needs at least base_url", "remote")
    unknown = sorted(set(raw) - set(REMOTE_KEYS) - set(extra))
    if unknown:
        raise config_error(guard, f"remote: unknown key(s) {', '.join(unknown)} "
                                  f"(known: {', '.join((*REMOTE_KEYS, *extra))})", "remote")
    if not raw["base_url"].startswith(("http://", "https://")):
        raise config_error(guard, "remote.base_url must start with http:// or https://", "remote")
    env = raw.get("api_key_env")
    if env is not None and (not isinstance(env, str) or env.startswith(("sk-", "Bearer"))):
        raise config_error(guard, "remote.api_key_env names an environment variable; never put a key in the file",
                           "remote")
    t = raw.get("timeout_s", 10.0)
    if isinstance(t, bool) or not isinstance(t, int | float) or t <= 0:
        raise config_error(guard, "remote.timeout_s must be a positive number of seconds", "remote")
    if not isinstance(raw.get("headers", {}), dict):
        raise config_error(guard, "remote.headers must be a mapping", "remote")
    return dict(raw)


class Guard(ABC):
    """Base class of every guard. Subclasses set `name` and `stages` and implement `check`."""

    name: ClassVar[str]
    stages: ClassVar[frozenset[str]] = frozenset({"input", "stream", "output"})
    # True when the guard may rewrite the request on the input stage (returns `Verdict.edits` with a
    # `redact` action of its own): such a step cannot run in parallel with the upstream call.
    rewrites_input: ClassVar[bool] = False

    def __init__(self, **options: Any) -> None:
        self.options = options

    # True for an `ImmediateGuard`: its checks never wait on anything (CPU work bounded by the text).
    immediate: ClassVar[bool] = False

    @abstractmethod
    async def check(self, inp: GuardInput) -> Verdict:
        """Judge one input; must not block the event loop (run inference in a worker)."""

    def check_now(self, inp: GuardInput) -> Verdict:
        """`check` without a suspension point: only an `ImmediateGuard` has one."""
        raise TypeError(f"guard {self.name} is not immediate: await check()")

    def open_stream(self, messages: list[Message], request_id: str) -> StreamCheck:
        return StreamCheck(self, messages, request_id)

    async def start(self, resources: GuardResources = NO_RESOURCES) -> None:
        """Load models, take clients from `resources`. Called once when a policy using this guard
        is activated (every caller passes the resources of where it runs)."""

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


class ImmediateGuard(Guard):
    """A guard whose checks are CPU work bounded by the text and never wait on anything (regex,
    hidden_unicode, pii, tools): it implements `check_now`, and the policy runs it inline, without
    a task or a trip through the event loop. A step's `timeout` cannot interrupt it (no timeout can
    interrupt code that does not yield); such a guard bounds its own work (regex: `scan_timeout_ms`)."""

    immediate: ClassVar[bool] = True

    async def check(self, inp: GuardInput) -> Verdict:
        return self.check_now(inp)

    @abstractmethod
    def check_now(self, inp: GuardInput) -> Verdict:
        """Judge one input, synchronously."""


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
# Guards that cannot be built here, with why: "missing (pip install 'guardgate[EXTRA]')" for a guard
# whose optional dependency is absent, or a module of the package that failed to import.
_UNAVAILABLE: dict[str, str] = {}
PACKAGE = "gateway.guards"
_discovered: set[str] = set()


def register(name: str, *, requires: tuple[str, ...] = (), extra: str | None = None
             ) -> Callable[[GuardFactory], GuardFactory]:
    """Class decorator: make a guard available to policies under `name`. `requires`: modules the
    guard imports lazily (at start or per check); when one is not installed, the guard is listed
    as missing, with `extra` as the install hint, instead of failing later."""

    def deco(factory: GuardFactory) -> GuardFactory:
        absent = [m for m in requires if importlib.util.find_spec(m) is None]
        if absent:
            hint = f"pip install 'guardgate[{extra}]'" if extra else f"pip install {' '.join(absent)}"
            _UNAVAILABLE[name] = f"missing ({hint})"
            _REGISTRY.pop(name, None)
        else:
            _REGISTRY[name] = factory
            _UNAVAILABLE.pop(name, None)
        return factory

    return deco


def discover(package: str = PACKAGE) -> None:
    """Import every module and subpackage of `package` once, for their `@register` side effects.
    A module that does not import is recorded (under its own name, the guard's name by convention)
    rather than raised or logged: a policy naming it gets an `UnavailableGuard` saying why."""
    if package in _discovered:
        return
    _discovered.add(package)
    pkg = importlib.import_module(package)
    for mod in pkgutil.iter_modules(pkg.__path__):
        if mod.name.startswith("_") or mod.name == "base":
            continue
        try:
            importlib.import_module(f"{package}.{mod.name}")
        except ModuleNotFoundError as e:
            if e.name and e.name.split(".")[0] == package.split(".")[0]:
                raise  # our own module is missing: a bug, not an optional dependency
            _UNAVAILABLE.setdefault(mod.name, f"missing (pip install {e.name})")
        except Exception as e:  # a broken optional guard must not break unrelated policies
            _UNAVAILABLE.setdefault(mod.name, f"failed to import: {type(e).__name__}: {e}")


class UnavailableGuard(Guard):
    """Stands in for a known guard that cannot be built here: it fails to start (the policy marks
    the step unavailable, /readyz and `guardgate doctor` say why) and every check is an error."""

    name: ClassVar[str] = "unavailable"

    def __init__(self, guard_name: str, why: str, **options: Any) -> None:
        super().__init__(**options)
        self.guard_name = guard_name
        self.why = why

    async def start(self, resources: GuardResources = NO_RESOURCES) -> None:
        raise RuntimeError(self.why)

    async def check(self, inp: GuardInput) -> Verdict:
        raise RuntimeError(f"guard {self.guard_name} is not available: {self.why}")


def create(name: str, **options: Any) -> Guard:
    """The guard `name` built from a step's options; an `UnavailableGuard` for a known guard that
    cannot be built here; GuardConfigError for a name no module registers."""
    discover()
    factory = _REGISTRY.get(name)
    if factory is not None:
        return factory(**options)
    if name in _UNAVAILABLE:
        return UnavailableGuard(name, _UNAVAILABLE[name], **options)
    raise GuardConfigError(f"unknown guard {name!r} (known: {', '.join(known())})")


def known() -> list[str]:
    """Every guard name a policy may use, available here or not."""
    discover()
    return sorted({*_REGISTRY, *_UNAVAILABLE})


def availability() -> dict[str, str]:
    """{guard: "available" | why it is not} for every known guard (`guardgate doctor`, /readyz)."""
    discover()
    return {name: _UNAVAILABLE.get(name, "available") for name in known()}

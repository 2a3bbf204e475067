"""Policy YAML: load, validate (errors name file:line), and build the guards of every step.

A policy has three stages, each a list of steps:

    input   before the upstream call (guards run concurrently)
    stream  on the answer while it streams (windows of `check_every_tokens`, leak bound
            `max_unchecked_tokens`); applies one-shot to non-stream answers too
    output  on a non-stream answer

A step names a guard; the keys `guard action on_error timeout timeout_ms parallel_with_upstream
name notice` belong to the step, every other key is an option of the guard. Building a guard
never loads a model (`Policy.start()` does), so a policy naming a model that is absent loads.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.guards import base as guard_base
from gateway.guards.base import NO_RESOURCES, Guard, GuardConfigError, GuardResources
from gateway.policy.content import ContentRules, check_guard_steps, parse_content
from gateway.types import Verdict
from gateway.yamlio import ConfigError, Fields, LDict, LList, line_of, load, loads

log = logging.getLogger("guardgate.policy")

STEP_KEYS = frozenset({"guard", "action", "on_error", "timeout", "timeout_ms", "parallel_with_upstream",
                       "name", "notice"})
STAGES = ("input", "stream", "output")
DEFAULT_TIMEOUT_S = 5.0
DEFAULT_CHECK_EVERY = 32
DEFAULT_NOTICE = "[redacted]"
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s)?\s*$")


async def run_step(step: Step, call: Callable[[], Awaitable[Verdict]]) -> Verdict:
    """One guard call under the step's timeout. Never raises: a guard that crashed, timed out, is
    unavailable or answered nonsense becomes a Verdict with `error` set (never a pass)."""
    t0 = time.perf_counter()
    try:
        if step.unavailable:
            raise RuntimeError(step.unavailable)
        async with asyncio.timeout(step.timeout_s):
            return _verdict(await call())
    except TimeoutError:
        return Verdict(guard=step.guard_name, error=f"timeout after {step.timeout_s * 1000:.0f} ms",
                       latency_ms=(time.perf_counter() - t0) * 1000)
    except Exception as e:
        return _failed(step, t0, e)


def run_step_now(step: Step, call: Callable[[], Verdict]) -> Verdict:
    """`run_step` for an immediate step (`Step.immediate`), inline: the same never-raise rule; no
    timeout, since nothing could interrupt a call that never yields."""
    t0 = time.perf_counter()
    try:
        if step.unavailable:
            raise RuntimeError(step.unavailable)
        return _verdict(call())
    except Exception as e:
        return _failed(step, t0, e)


def _verdict(v: Any) -> Verdict:
    if not isinstance(v, Verdict):
        raise TypeError(f"guard returned {type(v).__name__}, not a Verdict")
    return v


def _failed(step: Step, t0: float, e: Exception) -> Verdict:
    return Verdict(guard=step.guard_name, error=f"{type(e).__name__}: {e}",
                   latency_ms=(time.perf_counter() - t0) * 1000)


class PolicyError(ConfigError):
    """A policy file that does not load; formats as `file:line: message`."""


@dataclass(eq=False)
class Step:
    """One guard in one stage, with what to do when it flags or fails."""

    stage: str
    index: int
    guard_name: str
    guard: Guard
    options: dict[str, Any]
    action: str = "block"
    on_error: str = "block"
    timeout_s: float = DEFAULT_TIMEOUT_S
    parallel_with_upstream: bool = False
    label: str = ""
    notice: str = DEFAULT_NOTICE
    file: str | None = None
    line: int | None = None
    unavailable: str | None = None  # set when the guard failed to start: every check is then an error

    def __post_init__(self) -> None:
        if not self.label:
            self.label = f"{self.stage}[{self.index}]:{self.guard_name}"

    @property
    def immediate(self) -> bool:
        """Its checks run inline (`run_step_now`): an `ImmediateGuard`, or a guard that failed to start."""
        return self.guard.immediate or self.unavailable is not None


@dataclass
class StageConfig:
    steps: list[Step] = field(default_factory=list)


@dataclass
class StreamConfig(StageConfig):
    check_every_tokens: int = DEFAULT_CHECK_EVERY  # 0: auto (sized from check latency and token rate)
    max_unchecked_tokens: int = 0  # 0 = strict: nothing reaches the client before it was checked
    max_stall_ms: float = 500.0  # auto: the longest a token should wait for its verdict


@dataclass(eq=False)
class Policy:
    name: str
    mode: str = "enforce"  # enforce | shadow
    description: str = ""
    file: str | None = None
    input: StageConfig = field(default_factory=StageConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)
    output: StageConfig = field(default_factory=StageConfig)
    # How a stream the policy cut ends: `finish` (finish_reason content_filter, what OpenAI does) or
    # `error` (the dialect's error event, which the SDKs raise, with the policy's message).
    on_stream_block: str = "finish"
    content: ContentRules = field(default_factory=ContentRules)  # media parts: refuse | allow | guard
    # lifecycle: runs in flight hold a reference; a retired policy closes its guards after the last one
    active: int = 0
    retired: bool = False
    started: bool = False
    _closed: bool = False

    @property
    def shadow(self) -> bool:
        return self.mode == "shadow"

    @property
    def steps(self) -> list[Step]:
        return [*self.input.steps, *self.stream.steps, *self.output.steps]

    @property
    def has_input(self) -> bool:
        return bool(self.input.steps)

    @property
    def has_stream(self) -> bool:
        return bool(self.stream.steps)

    @property
    def has_output(self) -> bool:
        """A non-stream answer is checked: by the output steps and, one-shot, by the stream steps."""
        return bool(self.output.steps or self.stream.steps)

    @property
    def needs_inspection(self) -> bool:
        """False when the policy has no step at all: the server may relay bytes untouched."""
        return bool(self.steps)

    @property
    def input_parallel(self) -> bool:
        """Some input step lets the upstream call start before the input verdict is in."""
        return any(s.parallel_with_upstream for s in self.input.steps)

    async def start(self, resources: GuardResources = NO_RESOURCES) -> None:
        """Start every guard (loads models) with what the caller lends guards (`resources`: the
        server's chat clients). A guard that fails to start makes its step fail its checks."""
        if self.started:
            return
        self.started = True
        for step in self.steps:
            try:
                await step.guard.start(resources)
            except Exception as e:  # the step's on_error decides, per request
                step.unavailable = f"guard {step.guard_name} failed to start: {type(e).__name__}: {e}"
                log.error("policy %s: %s (%s:%s)", self.name, step.unavailable, step.file, step.line)

    def status(self) -> dict[str, dict[str, Any]]:
        """{step label: state} for /readyz: the guard's own `status()`; "unavailable" when it did not start
        (its checks fail and `on_error` decides, per request, as designed: not a readiness failure)."""
        out: dict[str, dict[str, Any]] = {}
        for step in self.steps:
            if step.unavailable:
                out[step.label] = {"state": "unavailable", "reason": step.unavailable}
            else:
                try:
                    out[step.label] = step.guard.status()
                except Exception as e:  # a status that cannot be read is not a ready guard
                    out[step.label] = {"state": "failed", "reason": f"status: {type(e).__name__}: {e}"}
        return out

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        for step in self.steps:
            try:
                await step.guard.aclose()
            except Exception:
                log.exception("policy %s: closing guard %s", self.name, step.guard_name)

    def acquire(self) -> None:
        self.active += 1

    def release(self) -> None:
        self.active -= 1
        if self.retired and self.active <= 0:
            _spawn_close(self)

    def retire(self) -> None:
        """Replaced by a reload: close the guards once no request uses this policy any more."""
        self.retired = True
        if self.active <= 0:
            _spawn_close(self)


_closing: set[asyncio.Task[None]] = set()


def _spawn_close(policy: Policy) -> None:
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return
    t = loop.create_task(policy.aclose())
    _closing.add(t)
    t.add_done_callback(_closing.discard)


# --------------------------------------------------------------------------- parsing


def _plain(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_plain(x) for x in v]
    return v


def _duration(f: Fields, key: str) -> float:
    """`timeout: 2s | 500ms | 1.5` (seconds) → seconds."""
    v = f.obj[key]
    if isinstance(v, bool):
        raise f.error(key, f"{f.what}.{key} must be a duration like 2s or 500ms")
    if isinstance(v, int | float):
        secs = float(v)
    else:
        m = _DURATION.match(str(v))
        if not m:
            raise f.error(key, f"{f.what}.{key} must be a duration like 2s or 500ms, got {v!r}")
        secs = float(m.group(1)) / (1000.0 if m.group(2) == "ms" else 1.0)
    if secs <= 0:
        raise f.error(key, f"{f.what}.{key} must be positive")
    return secs


def _timeout(f: Fields, default: float) -> float:
    if "timeout" in f.obj and "timeout_ms" in f.obj:
        raise f.error("timeout_ms", f"{f.what}: give timeout or timeout_ms, not both")
    if "timeout" in f.obj:
        return _duration(f, "timeout")
    if "timeout_ms" in f.obj:
        ms = f.get("timeout_ms", (int, float))
        if ms <= 0:
            raise f.error("timeout_ms", f"{f.what}.timeout_ms must be positive")
        return float(ms) / 1000.0
    return default


def _choice(f: Fields, key: str, allowed: tuple[str, ...], default: str) -> str:
    v = f.get(key, str, default)
    if v not in allowed:
        raise f.error(key, f"{f.what}.{key} must be one of {', '.join(allowed)}, got {v!r}")
    return v


def _step(obj: Any, stage: str, i: int, file: str | None, on_error: str, timeout_s: float) -> Step:
    what = f"{stage}.steps[{i}]"
    if not isinstance(obj, dict):
        raise PolicyError(f"{what} must be a mapping with a 'guard' key", file, line_of(obj))
    step_part = {k: v for k, v in obj.items() if k in STEP_KEYS}
    sp = LDict(step_part)
    sp.line = getattr(obj, "line", 0)
    sp.key_lines = getattr(obj, "key_lines", {})
    f = Fields(sp, file, what, set(STEP_KEYS))
    name = f.get("guard", str, required=True)
    action = _choice(f, "action", ("block", "redact", "warn", "log"), "block")
    parallel = f.get("parallel_with_upstream", bool, False)
    if parallel and stage != "input":
        raise f.error("parallel_with_upstream", f"{what}: parallel_with_upstream applies to input steps only")
    options = {str(k): _plain(v) for k, v in obj.items() if k not in STEP_KEYS}
    try:
        guard = guard_base.create(name, **options)
    except (GuardConfigError, TypeError, ValueError) as e:
        opt, item = getattr(e, "option", None), getattr(e, "item", None)
        line = line_of(obj, "guard")
        if opt is not None and opt in obj:
            item_line = line_of(obj[opt], item) if item is not None else None
            line = item_line or line_of(obj, opt)
        raise PolicyError(f"{what} ({name}): {e}", file, line) from None
    if stage not in guard.stages:
        raise f.error("guard", f"{what}: guard {name} does not support the {stage} stage "
                               f"(supports: {', '.join(sorted(guard.stages))})")
    return Step(
        stage=stage, index=i, guard_name=name, guard=guard, options=options, action=action,
        on_error=_choice(f, "on_error", ("block", "allow"), on_error),
        timeout_s=_timeout(f, timeout_s), parallel_with_upstream=parallel,
        label=f.get("name", str, ""), notice=f.get("notice", str, DEFAULT_NOTICE),
        file=file, line=line_of(obj),
    )


def _stage(obj: Any, stage: str, file: str | None, on_error: str, timeout_s: float) -> StageConfig:
    allowed = (
        {"steps", "check_every_tokens", "max_unchecked_tokens", "max_stall_ms"} if stage == "stream" else {"steps"}
    )
    f = Fields(obj if obj is not None else LDict(), file, stage, allowed)
    steps_obj = f.get("steps", list, LList())
    steps = [_step(s, stage, i, file, on_error, timeout_s) for i, s in enumerate(steps_obj)]
    if stage != "stream":
        return StageConfig(steps=steps)
    every = f.get("check_every_tokens", (int, str), DEFAULT_CHECK_EVERY)
    if every == "auto":
        every = 0
    elif isinstance(every, str) or every < 1:
        raise f.error("check_every_tokens", "stream.check_every_tokens must be at least 1, or auto")
    stall = f.get("max_stall_ms", (int, float), 500.0)
    if stall <= 0:
        raise f.error("max_stall_ms", "stream.max_stall_ms must be more than 0")
    unchecked = f.get("max_unchecked_tokens", int, 0)
    if unchecked < 0:
        raise f.error("max_unchecked_tokens", "stream.max_unchecked_tokens must be 0 (strict) or more")
    return StreamConfig(
        steps=steps, check_every_tokens=every, max_unchecked_tokens=unchecked, max_stall_ms=float(stall)
    )


def parse_policy(obj: Any, file: str | None = None, default_name: str | None = None) -> Policy:
    """A validated `Policy` from YAML data (as loaded by `gateway.yamlio`, which keeps line numbers)."""
    try:
        return _parse_policy(obj, file, default_name)
    except PolicyError:
        raise
    except ConfigError as e:
        raise PolicyError(e.message, e.file, e.line) from None


def _parse_policy(obj: Any, file: str | None, default_name: str | None) -> Policy:
    if obj is None:
        raise PolicyError("empty policy file", file, None)
    top = Fields(obj, file, "policy",
                 {"name", "description", "mode", "on_error", "on_stream_block", "timeout", "timeout_ms", "content",
                  *STAGES})
    name = top.get("name", str, default_name)
    if not name:
        raise PolicyError("policy has no name", file, line_of(obj))
    if not _NAME.match(name):
        raise top.error("name", f"policy name {name!r} may contain only letters, digits, '_', '-' and '.'")
    on_error = _choice(top, "on_error", ("block", "allow"), "block")
    timeout_s = _timeout(top, DEFAULT_TIMEOUT_S)
    stages = {s: _stage(obj.get(s), s, file, on_error, timeout_s) for s in STAGES}
    assert isinstance(stages["stream"], StreamConfig)
    _check_input_rewrites(stages["input"], file)
    content = parse_content(obj.get("content"), file)
    check_guard_steps(content, stages["input"].steps, obj)
    return Policy(
        name=name, mode=_choice(top, "mode", ("enforce", "shadow"), "enforce"),
        description=top.get("description", str, ""), file=file,
        input=stages["input"], stream=stages["stream"], output=stages["output"], content=content,
        on_stream_block=_choice(top, "on_stream_block", ("finish", "error"), "finish"),
    )


def _check_input_rewrites(stage: StageConfig, file: str | None) -> None:
    """An input step that rewrites the request (action redact, or a guard such as pii that masks) needs
    the verdict before the request leaves: no input step may then start the upstream call early."""
    rewriting = [s for s in stage.steps if s.action == "redact" or s.guard.rewrites_input]
    parallel = [s for s in stage.steps if s.parallel_with_upstream]
    if rewriting and parallel:
        raise PolicyError(f"input.steps[{parallel[0].index}]: parallel_with_upstream cannot be used with an input "
                          f"step that rewrites the request (input.steps[{rewriting[0].index}]: "
                          f"{rewriting[0].guard_name}): the upstream would get the request before it is rewritten",
                          file, parallel[0].line)


def load_policy(path: str | Path) -> Policy:
    """Load and validate one policy file; raises `PolicyError` naming file:line."""
    p = Path(path)
    try:
        data = load(p)
    except PolicyError:
        raise
    except ConfigError as e:
        raise PolicyError(e.message, e.file, e.line) from None
    return parse_policy(data, str(p), default_name=p.stem)


def parse_policy_text(text: str, name: str = "<policy>") -> Policy:
    """Load a policy from a YAML string (tests, `guardgate check` on stdin)."""
    try:
        data = loads(text, name)
    except ConfigError as e:
        raise PolicyError(e.message, e.file, e.line) from None
    return parse_policy(data, name, default_name=Path(name).stem if name != "<policy>" else None)

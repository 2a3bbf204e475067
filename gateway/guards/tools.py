"""`tools`: a deterministic policy on the tool calls a model makes (no model).

Options:
    allow       tool names the model may call; any other call is a violation (default: any name)
    deny        tool names the model may never call (checked before `allow`)
    arguments   {tool name: JSON schema} the call's arguments must satisfy (JSON Schema 2020-12, via
                `jsonschema`), with two keywords of ours for what a schema cannot say well:
                  host_in: [example.com, ...]   a string that is a URL whose host is one of these
                                                (or a subdomain of one); no host is a violation
                  path_under: /srv/data         a string that is a path which, normalised (`..`
                                                resolved), stays under this prefix
                Arguments that are not a JSON object are a violation for a tool listed here.
    "*" in `arguments` applies to every tool without its own entry.

Stream and output stages. Each call is judged once, when it is complete (the gate releases a tool
call only whole and after every step checked it, so a violating call never reaches the client);
text is never held by this step. A violation flags the verdict with a category naming the rule:
`deny:NAME`, `allow:NAME` (not in the allow list), `arguments:NAME:PATH:KEYWORD` (e.g.
`arguments:fetch:url:host_in`); the step's action (default block) ends the answer with
`content_filter` and the annotation carries that category.
"""

from __future__ import annotations

import json
import posixpath
import time
from collections.abc import Iterator
from functools import partial
from typing import Any, ClassVar
from urllib.parse import urlsplit

import jsonschema
from jsonschema import Draft202012Validator, ValidationError

from gateway.guards.base import (
    Guard,
    GuardInput,
    ImmediateGuard,
    StreamCheck,
    config_error,
    register,
    reject_unknown_options,
)
from gateway.types import Message, ToolCall, Verdict

_config_error = partial(config_error, "tools")  # (msg, option) -> GuardConfigError


def host_allowed(url: str, hosts: list[str]) -> bool:
    """The URL's host is one of `hosts` or a subdomain of one (case-insensitive)."""
    try:
        host = urlsplit(url.strip()).hostname
    except ValueError:
        return False
    if not host:
        return False
    host = host.lower().rstrip(".")
    return any(host == h.lower() or host.endswith("." + h.lower().lstrip(".")) for h in hosts)


def path_is_under(path: str, prefix: str) -> bool:
    """`path`, normalised (relative paths taken from the prefix, `..` resolved), stays under `prefix`."""
    base = posixpath.normpath(prefix)
    full = posixpath.normpath(path if posixpath.isabs(path) else posixpath.join(base, path))
    return full == base or full.startswith(base.rstrip("/") + "/")


def _host_in(validator: Any, hosts: Any, instance: Any, schema: Any) -> Iterator[ValidationError]:
    if isinstance(instance, str) and not host_allowed(instance, list(hosts)):
        yield ValidationError(f"{instance!r} is not on an allowed host ({', '.join(hosts)})")


def _path_under(validator: Any, prefix: Any, instance: Any, schema: Any) -> Iterator[ValidationError]:
    if isinstance(instance, str) and not path_is_under(instance, str(prefix)):
        yield ValidationError(f"{instance!r} is not under {prefix}")


ArgsValidator = jsonschema.validators.extend(Draft202012Validator, {"host_in": _host_in, "path_under": _path_under})


def _names(value: Any, option: str) -> frozenset[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise _config_error(f"{option} must be a list of tool names", option)
    return frozenset(value)


@register("tools")
class ToolsGuard(ImmediateGuard):
    """Allow/deny lists of tool names and JSON-schema constraints on each call's arguments."""

    name: ClassVar[str] = "tools"
    stages: ClassVar[frozenset[str]] = frozenset({"stream", "output"})
    OPTIONS: ClassVar[tuple[str, ...]] = ("allow", "deny", "arguments")

    def __init__(self, **options: Any) -> None:
        reject_unknown_options(self.name, options, self.OPTIONS)
        super().__init__(**options)
        self.allow = _names(options.get("allow"), "allow")
        self.deny = _names(options.get("deny"), "deny") or frozenset()
        args = options.get("arguments", {})
        if not isinstance(args, dict):
            raise _config_error("arguments must map tool names to JSON schemas", "arguments")
        self.validators: dict[str, Any] = {}
        for tool, schema in args.items():
            if not isinstance(schema, dict):
                raise _config_error(f"arguments.{tool} must be a JSON schema (a mapping)", "arguments")
            try:
                ArgsValidator.check_schema(schema)
            except jsonschema.SchemaError as e:
                raise _config_error(f"arguments.{tool} is not a valid JSON schema: {e.message}", "arguments") from None
            self.validators[str(tool)] = ArgsValidator(schema)
        if not (self.allow is not None or self.deny or self.validators):
            raise _config_error("give at least one of allow, deny, arguments", "allow")

    def violation(self, call: ToolCall) -> tuple[str, str] | None:
        """(rule, why) of the first rule `call` breaks, or None."""
        if call.name in self.deny:
            return f"deny:{call.name}", f"tool {call.name!r} is denied"
        if self.allow is not None and call.name not in self.allow:
            return f"allow:{call.name}", f"tool {call.name!r} is not in the allow list"
        validator = self.validators.get(call.name, self.validators.get("*"))
        if validator is None:
            return None
        try:
            args = json.loads(call.arguments) if call.arguments.strip() else {}
        except ValueError:
            return f"arguments:{call.name}:json", f"arguments of {call.name!r} are not JSON"
        err = jsonschema.exceptions.best_match(validator.iter_errors(args))
        if err is None:
            return None
        where = ".".join(str(p) for p in err.absolute_path) or "$"
        return f"arguments:{call.name}:{where}:{err.validator}", f"{call.name} {where}: {err.message}"

    def judge(self, t0: float, messages: list[Message], calls: list[ToolCall]) -> Verdict:
        for call in calls:
            found = self.violation(call)
            if found is not None:
                rule, why = found
                return self.verdict(t0, flagged=True, score=1.0, categories=[rule], reason=why,
                                    details={"rule": rule, "tool": call.name, "call_id": call.id})
        return self.verdict(t0, flagged=False, score=0.0, details={"calls": len(calls)} if calls else {})

    def check_now(self, inp: GuardInput) -> Verdict:
        return self.judge(time.perf_counter(), inp.messages, inp.tool_calls)

    def open_stream(self, messages: list[Message], request_id: str) -> StreamCheck:
        return CallStream(self, messages, request_id)


class CallStream(StreamCheck):
    """For guards that judge tool calls: each complete call once (`guard.judge(t0, messages, new_calls)`,
    sync or async); with no new complete call the check passes at once, so text is not held by it."""

    def __init__(self, guard: Guard, messages: list[Message], request_id: str) -> None:
        super().__init__(guard, messages, request_id)
        self.judged = 0

    async def check(self, text: str, window_start: int, final: bool) -> Verdict:
        t0 = time.perf_counter()
        new = self.calls[self.judged:]
        if not new:
            return self.guard.verdict(t0, flagged=False, score=0.0)
        result = self.guard.judge(t0, self.messages, new)  # type: ignore[attr-defined]
        return self._judged(new, await result if hasattr(result, "__await__") else result)

    def check_now(self, text: str, window_start: int, final: bool) -> Verdict:
        """The tools guard's (an `ImmediateGuard`): `judge` returns its verdict."""
        t0 = time.perf_counter()
        new = self.calls[self.judged:]
        if not new:
            return self.guard.verdict(t0, flagged=False, score=0.0)
        return self._judged(new, self.guard.judge(t0, self.messages, new))  # type: ignore[attr-defined]

    def _judged(self, new: list[ToolCall], v: Verdict) -> Verdict:
        if v.error is None:
            self.judged += len(new)
        return v

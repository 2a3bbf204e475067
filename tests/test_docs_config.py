"""The docs agree with the code: every config key the parsers accept is documented, every YAML example
in docs/ loads with the real parsers, every exported metric is documented, the shipped policies load."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import gateway.config
import gateway.policy.schema as schema
from gateway.guards.base import GuardConfigError
from gateway.yamlio import loads

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
REFERENCE = DOCS / "configuration.md"
FENCE = re.compile(r"^```yaml[^\n]*\n(.*?)^```", re.S | re.M)


# ---------------------------------------------------------------------------- what the parsers accept


def _fields_key_sets(module: Any) -> set[str]:
    """Keys of every `Fields(obj, file, what, ALLOWED)` call in `module`'s source (set literals,
    names assigned in the same function, `*CONSTANTS`, conditional expressions)."""
    tree = ast.parse(inspect.getsource(module))
    keys: set[str] = set()

    def resolve(node: ast.AST, scope: ast.AST) -> set[str]:
        if isinstance(node, ast.Set):
            out: set[str] = set()
            for elt in node.elts:
                if isinstance(elt, ast.Constant) and isinstance(elt.value, str):
                    out.add(elt.value)
                elif isinstance(elt, ast.Starred) and isinstance(elt.value, ast.Name):
                    out |= {str(x) for x in getattr(module, elt.value.id)}
                else:
                    raise AssertionError(f"cannot read allowed keys from {ast.dump(elt)}")
            return out
        if isinstance(node, ast.IfExp):
            return resolve(node.body, scope) | resolve(node.orelse, scope)
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") in ("set", "frozenset") and node.args:
            return resolve(node.args[0], scope)
        if isinstance(node, ast.Name):
            for sub in ast.walk(scope):
                targets = sub.targets if isinstance(sub, ast.Assign) else []
                if any(getattr(t, "id", None) == node.id for t in targets):
                    return resolve(sub.value, scope)
            return {str(x) for x in getattr(module, node.id)}  # a module constant
        raise AssertionError(f"cannot read allowed keys from {ast.dump(node)}")

    for fn in ast.walk(tree):
        if not isinstance(fn, ast.FunctionDef):
            continue
        for call in ast.walk(fn):
            is_fields = isinstance(call, ast.Call) and getattr(call.func, "id", "") == "Fields"
            if is_fields and len(call.args) >= 4:
                keys |= resolve(call.args[3], fn)
    return keys


def gateway_keys() -> set[str]:
    keys = _fields_key_sets(gateway.config)
    assert {"listen", "upstreams", "routes", "audit", "base_url", "key_env", "max_body_bytes"} <= keys
    return keys


def policy_keys() -> set[str]:
    keys = _fields_key_sets(schema) | set(schema.STEP_KEYS)
    assert {"name", "mode", "on_error", "steps", "check_every_tokens", "max_unchecked_tokens", "guard",
            "parallel_with_upstream", "notice"} <= keys
    return keys


INTERNAL_OPTIONS = {"pool"}  # llama_guard / local upstream: an engine pool object injected in code, not YAML


def guard_option_keys() -> dict[str, set[str]]:
    from gateway.guards.alignment_check import AlignmentCheck
    from gateway.guards.code_shield import CodeShieldOptions
    from gateway.guards.hidden_unicode import HiddenUnicodeGuard
    from gateway.guards.llama_guard import LlamaGuard, RemoteOptions
    from gateway.guards.pii import PiiGuard
    from gateway.guards.prompt_guard import PromptGuard
    from gateway.guards.regex import RegexGuard
    from gateway.guards.tools import ToolsGuard
    from gateway.upstreams.local import LocalUpstream

    params = inspect.signature(RegexGuard.__init__).parameters
    regex_params = {p for p in params if p not in ("self", "options")}
    return {
        "prompt_guard": set(PromptGuard.OPTIONS),
        "llama_guard": set(LlamaGuard._KEYS) - INTERNAL_OPTIONS,
        "llama_guard.remote": {f.name for f in dataclasses.fields(RemoteOptions)},
        "code_shield": {f.name for f in dataclasses.fields(CodeShieldOptions)} - {"severity_actions_set"}
        | {"semgrep_timeout_ms"},
        "regex": regex_params,
        "hidden_unicode": set(HiddenUnicodeGuard.OPTIONS),
        "pii": set(PiiGuard.OPTIONS),
        "tools": set(ToolsGuard.OPTIONS) | {"host_in", "path_under"},
        "alignment_check": set(AlignmentCheck.OPTIONS),
        "alignment_check.remote": set(AlignmentCheck.REMOTE_OPTIONS),
        "upstreams.*.options (llama_cpp)": set(LocalUpstream._OPTION_KEYS) - INTERNAL_OPTIONS,
    }


def documented(text: str, key: str) -> bool:
    return f"`{key}`" in text or re.search(rf"`{re.escape(key)}[`:( ]", text) is not None


def test_every_gateway_and_policy_key_is_in_the_reference() -> None:
    text = REFERENCE.read_text()
    missing = sorted(k for k in gateway_keys() | policy_keys() if not documented(text, k))
    assert not missing, f"keys accepted by the parsers but not described in docs/configuration.md: {missing}"


def test_every_guard_option_is_in_the_reference() -> None:
    text = REFERENCE.read_text()
    missing = {}
    for g, keys in guard_option_keys().items():
        if absent := sorted(k for k in keys if not documented(text, k)):
            missing[g] = absent
    assert not missing, f"options not described in docs/configuration.md: {missing}"


def test_the_key_check_can_fail() -> None:
    assert not documented("`listen` and `port`", "upstreams")
    assert documented("| `timeout` / `timeout_ms` |", "timeout_ms")


# ---------------------------------------------------------------------------- examples load


def yaml_blocks() -> Iterator[tuple[str, int, str]]:
    for md in sorted(DOCS.glob("*.md")):
        text = md.read_text()
        for m in FENCE.finditer(text):
            yield md.name, text.count("\n", 0, m.start()) + 2, m.group(1)


@pytest.fixture(scope="module")
def prompt_guard_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A crafted Prompt Guard model: policies naming `prompt-guard-2-86m` load without the real one."""
    import prompt_guard_fixtures as F

    return F.write_trigger_model(tmp_path_factory.mktemp("pg") / "model")


@pytest.fixture
def guard_models(prompt_guard_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.guards.prompt_guard import metadata as prompt_guard

    real = prompt_guard.resolve_model_dir

    def resolve(name: Any) -> tuple[Path, str | None]:
        try:
            return real(name)
        except GuardConfigError:  # a manifest model not pulled on this machine
            return prompt_guard_model, None

    monkeypatch.setattr(prompt_guard, "resolve_model_dir", resolve)


def load_example(name: str, line: int, block: str) -> str:
    """Parse one example with the parser it is for; returns which one."""
    where = f"{name}:{line}"
    if block.lstrip().startswith("# fragment"):
        loads(block, where)
        return "fragment"
    obj = loads(block, where)
    assert isinstance(obj, dict), f"{where}: an example must be a mapping"
    if "upstreams" in obj or "mcp_servers" in obj:
        gateway.config.parse(obj, where)
        return "gateway"
    if {"input", "stream", "output"} & set(obj):
        schema.parse_policy(obj, where)
        return "policy"
    raise AssertionError(f"{where}: neither a gateway file nor a policy (start it with '# fragment')")


def test_docs_have_examples_of_both_kinds(guard_models: None) -> None:
    kinds = [load_example(*b) for b in yaml_blocks()]
    assert kinds.count("gateway") >= 3 and kinds.count("policy") >= 6


@pytest.mark.parametrize("name,line,block", list(yaml_blocks()), ids=lambda v: str(v)[:20])
def test_every_yaml_example_loads(name: str, line: int, block: str, guard_models: None) -> None:
    load_example(name, line, block)


def test_a_broken_example_is_caught(guard_models: None) -> None:
    from gateway.yamlio import ConfigError

    with pytest.raises(ConfigError, match="limitz"):
        load_example("x.md", 1, "upstreams: {a: {base_url: 'http://x'}}\nlimitz: {}\n")
    with pytest.raises(ConfigError):
        load_example("x.md", 1, "name: p\nstream: {steps: [{guard: regex, patterns: ['a'], acton: block}]}\n")


@pytest.mark.parametrize("path", sorted((ROOT / "policies").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_policies_load(path: Path, guard_models: None) -> None:
    schema.load_policy(path)


# ---------------------------------------------------------------------------- metrics


def test_every_metric_is_documented() -> None:
    from gateway.telemetry import Telemetry

    text = REFERENCE.read_text()
    names = []
    for fam in Telemetry(tracer_provider=None).registry.collect():
        names.append(fam.name + "_total" if fam.type == "counter" else fam.name)
    assert len(names) >= 11
    missing = [n for n in names if f"`{n}`" not in text]
    assert not missing, f"metrics not described in docs/configuration.md: {missing}"

"""Policy YAML: validation errors name file:line; the shipped policy packs load."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import pytest

from gateway.guards import base as guard_base
from gateway.guards.base import Guard, GuardConfigError, GuardInput, UnavailableGuard
from gateway.policy.schema import PolicyError, load_policy, parse_policy_text
from gateway.types import Verdict

REPO = Path(__file__).resolve().parent.parent
PACKS = sorted((REPO / "policies").glob("*.yaml"))

GOOD = """\
name: ok
mode: enforce
on_error: block
timeout_ms: 1500
input:
  steps:
    - guard: regex
      patterns: ["ignore previous instructions"]
      ignore_case: true
      parallel_with_upstream: true
stream:
  check_every_tokens: 16
  max_unchecked_tokens: 4
  steps:
    - guard: regex
      name: keys
      patterns:
        - "AKIA[0-9A-Z]{16}"
        - {pattern: "sk-[A-Za-z0-9]{20,}", category: secrets}
      action: redact
      notice: "[key]"
      timeout: 250ms
      on_error: allow
output:
  steps:
    - guard: regex
      patterns: ["x{3}"]
      action: warn
"""


def test_good_policy_parses_with_defaults_and_overrides():
    p = parse_policy_text(GOOD, "ok.yaml")
    assert p.name == "ok" and p.mode == "enforce" and not p.shadow
    assert p.has_input and p.has_stream and p.has_output and p.needs_inspection and p.input_parallel
    s = p.stream.steps[0]
    got = (s.label, s.action, s.notice, s.on_error, s.timeout_s)
    assert got == ("keys", "redact", "[key]", "allow", 0.25)
    assert p.input.steps[0].timeout_s == 1.5 and p.input.steps[0].on_error == "block"
    assert (p.stream.check_every_tokens, p.stream.max_unchecked_tokens) == (16, 4)
    assert p.output.steps[0].action == "warn"
    assert s.line == 15 and s.file == "ok.yaml"


@pytest.mark.parametrize("text,line,needle", [
    ("name: x\nmoed: enforce\n", 2, "unknown key 'moed'"),
    ("name: x\nmode: strict\n", 2, "mode must be one of enforce, shadow"),
    ("name: x\nstream:\n  steps:\n    - guard: regex\n      patterns: [a]\n      action: explode\n", 6,
     "action must be one of"),
    ("name: x\nstream:\n  steps:\n    - guard: nosuch\n", 4, "unknown guard 'nosuch'"),
    ("name: x\nstream:\n  steps:\n    - action: block\n", 4, "missing required key 'guard'"),
    ("name: x\ninput:\n  steps:\n    - guard: regex\n      patterns: [a]\n      action: redact\n"
     "    - {guard: regex, patterns: [b], parallel_with_upstream: true}\n", 7,
     "parallel_with_upstream cannot be used with an input step that rewrites"),
    ("name: x\nstream:\n  steps:\n    - guard: regex\n      patterns:\n        - ok\n        - 'bad(('\n", 7,
     "patterns[1] is not a valid regex"),
    ("name: x\nstream:\n  steps:\n    - guard: regex\n      patterns: [a]\n      colour: red\n", 6,
     "unknown option(s) colour"),
    ("name: x\nstream:\n  check_every_tokens: 0\n", 3, "check_every_tokens must be at least 1"),
    ("name: x\nstream:\n  max_unchecked_tokens: -1\n", 3, "max_unchecked_tokens must be 0"),
    ("name: x\nstream:\n  steps:\n    - guard: regex\n      patterns: [a]\n      timeout: soon\n", 6,
     "must be a duration"),
    ("name: x\nstream:\n  steps:\n    - guard: regex\n      patterns: [a]\n"
     "      parallel_with_upstream: true\n", 6,
     "applies to input steps only"),
    ("name: x\nname: y\n", 2, "duplicate key 'name'"),
    ("name: x\nstream: [\n", 3, "invalid YAML"),
    ("name: x\nstream:\n  steps:\n    - guard: regex\n      patterns: ['a*']\n", 5,
     "matches the empty string"),
    ("name: 'bad name'\n", 1, "may contain only"),
])
def test_errors_name_file_and_line(tmp_path: Path, text: str, line: int, needle: str):
    f = tmp_path / "p.yaml"
    f.write_text(text)
    with pytest.raises(PolicyError) as ei:
        load_policy(f)
    msg = str(ei.value)
    assert msg.startswith(f"{f}:{line}: "), msg
    assert needle in msg, msg
    assert ei.value.line == line and ei.value.file == str(f)


def test_name_defaults_to_file_stem(tmp_path: Path):
    f = tmp_path / "my-pol.yaml"
    f.write_text("mode: shadow\n")
    p = load_policy(f)
    assert p.name == "my-pol" and p.shadow and not p.needs_inspection


def test_builtin_guard_whose_module_is_missing_loads_as_unavailable(monkeypatch: pytest.MonkeyPatch):
    guard_base.discover()
    monkeypatch.setitem(guard_base._UNAVAILABLE, "ghost_guard", "missing (pip install ghost)")
    p = parse_policy_text("name: g\nstream:\n  steps:\n    - guard: ghost_guard\n      model: absent\n")
    g = p.stream.steps[0].guard
    assert isinstance(g, UnavailableGuard) and g.options == {"model": "absent"}


# --------------------------------------------------------------------------- the guard registry


def test_discovery_registers_every_guard_module_and_subpackage():
    """One registry: every module and subpackage of gateway.guards that registers is found."""
    assert {"regex", "hidden_unicode", "pii", "tools", "alignment_check", "llama_guard", "prompt_guard",
            "code_shield"} <= set(guard_base.known())
    assert guard_base.availability()["code_shield"] == "available"  # a subpackage's __init__ registers


def test_a_guard_whose_optional_dependency_is_missing_reports_the_extra(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(guard_base, "_REGISTRY", dict(guard_base._REGISTRY))
    monkeypatch.setattr(guard_base, "_UNAVAILABLE", dict(guard_base._UNAVAILABLE))

    @guard_base.register("t_needs_extra", requires=("no_such_module_for_guardgate",), extra="fancy")
    class NeedsExtra(Guard):
        name: ClassVar[str] = "t_needs_extra"

        async def check(self, inp: GuardInput) -> Verdict:
            return Verdict(guard=self.name)

    assert guard_base.availability()["t_needs_extra"] == "missing (pip install 'guardgate[fancy]')"
    p = parse_policy_text("name: g\noutput:\n  steps:\n    - guard: t_needs_extra\n")
    step = p.output.steps[0]
    assert isinstance(step.guard, UnavailableGuard)
    import asyncio

    asyncio.run(p.start())  # the step is marked unavailable with the install line; nothing raised
    assert step.unavailable and "pip install 'guardgate[fancy]'" in step.unavailable
    assert p.status()[step.label]["state"] == "unavailable"


def test_a_module_that_does_not_import_is_reported_not_raised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    pkg = tmp_path / "t_guardpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "fine.py").write_text(
        "from gateway.guards.base import Guard, register\n"
        "from gateway.types import Verdict\n"
        "@register('t_fine')\n"
        "class Fine(Guard):\n"
        "    name = 't_fine'\n"
        "    async def check(self, inp):\n"
        "        return Verdict(guard=self.name)\n")
    (pkg / "t_absent_dep.py").write_text("import no_such_module_for_guardgate\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(guard_base, "_REGISTRY", dict(guard_base._REGISTRY))
    monkeypatch.setattr(guard_base, "_UNAVAILABLE", dict(guard_base._UNAVAILABLE))
    guard_base.discover("t_guardpkg")
    assert "t_fine" in guard_base._REGISTRY
    assert guard_base._UNAVAILABLE["t_absent_dep"] == "missing (pip install no_such_module_for_guardgate)"
    assert isinstance(guard_base.create("t_absent_dep"), UnavailableGuard)


# --------------------------------------------------------------------------- shipped packs

OPTION_CONTRACT = {  # option names agreed with the model-guard engineers
    "llama_guard": {"model", "categories", "threshold"},
    "prompt_guard": {"model", "messages", "threshold"},
    "code_shield": {"hold_code_blocks"},
}


def _contract_guard(name: str) -> type[Guard]:
    class Stub(Guard):
        stages: ClassVar[frozenset[str]] = frozenset({"input", "stream", "output"})

        def __init__(self, **options: Any) -> None:
            unknown = set(options) - OPTION_CONTRACT[name]
            if unknown:
                raise GuardConfigError(f"unknown option(s) {sorted(unknown)}")
            super().__init__(**options)

        async def check(self, inp: GuardInput) -> Verdict:
            return Verdict(guard=name)

    Stub.name = name
    return Stub


@pytest.mark.parametrize("path", PACKS, ids=lambda p: p.name)
def test_shipped_pack_is_valid_against_the_guard_option_contract(path: Path, monkeypatch: pytest.MonkeyPatch):
    guard_base.discover()  # import the real modules first, so they cannot re-register over the stubs
    for name in OPTION_CONTRACT:
        monkeypatch.setitem(guard_base._REGISTRY, name, _contract_guard(name))
    p = load_policy(path)
    assert p.name == path.stem
    assert p.needs_inspection and p.has_stream


def test_all_five_packs_ship():
    assert {p.stem for p in PACKS} >= {"default", "strict", "code-assistant", "agent", "shadow"}


@pytest.mark.parametrize("path", PACKS, ids=lambda p: p.name)
def test_shipped_pack_loads_with_the_real_guards_and_no_models(path: Path):
    """Building a guard must not need its model (Guard.start() loads it)."""
    load_policy(path)

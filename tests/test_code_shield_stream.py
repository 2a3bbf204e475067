"""The code_shield guard on streams and whole answers (tier 1 only: no semgrep process here)."""

from __future__ import annotations

import json

import pytest

from gateway.guards import base as guard_base
from gateway.guards.base import GuardConfigError, GuardInput
from gateway.guards.code_fences import extract_code_blocks
from gateway.guards.code_shield import CodeShieldGuard, SemgrepRunner, find_rules_dir
from gateway.types import Message, Verdict

if find_rules_dir() is None:  # pragma: no cover
    pytest.skip("codeshield package not installed", allow_module_level=True)

C_BAD = (
    "```c\n#include <stdio.h>\nint main(void) {\n  char name[16];\n"
    '  gets(name);\n  printf("%s", name);\n}\n```'
)
PY_OK = "```python\ndef greet(name: str) -> str:\n    return f'Hello {name}'\n```"
ANSWER = f"Here is a C version:\n\n{C_BAD}\n\nAnd a Python one:\n\n{PY_OK}\n\nBoth read a name.\n"


def guard(**opts: object) -> CodeShieldGuard:
    opts.setdefault("semgrep", "off")
    return CodeShieldGuard(**opts)


async def stream(g: CodeShieldGuard, text: str, size: int) -> list[tuple[int, Verdict]]:
    s = g.open_stream([Message.of("user", "write code")], "req-1")
    out = []
    for end in range(size, len(text) + size, size):
        end = min(end, len(text))
        out.append((end, await s.check(text[:end], max(0, end - size), end == len(text))))
    await s.close()
    return out


def test_registered_under_code_shield() -> None:
    g = guard_base.create("code_shield", hold_code_blocks=True, semgrep="off")
    assert isinstance(g, CodeShieldGuard) and g.name == "code_shield"
    assert {"stream", "output", "input"} <= g.stages


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 11, 16, 64, 1000])
async def test_stream_flags_only_the_insecure_block_and_holds_only_open_blocks(size: int) -> None:
    g = guard()
    c_block, py_block = extract_code_blocks(ANSWER)
    verdicts = await stream(g, ANSWER, size)
    flagged = [(end, v) for end, v in verdicts if v.flagged]
    assert len(flagged) == 1, [v.to_record() for _, v in flagged]
    end, v = flagged[0]
    assert v.span == c_block.span == (ANSWER.index("```c"), ANSWER.index("```c") + len(C_BAD))
    # reported at the first check that saw the closing fence's line end
    assert end >= c_block.end + 1 and (end - size < c_block.end + 1 or (size == 1 and end == c_block.end + 1))
    d = v.details
    assert (d["rule"], d["cwe"], d["line"], d["severity"], d["language"]) == (
        "bugprone-gets",
        "CWE-242",
        4,
        "error",
        "c",
    )
    assert d["recommended_action"] == "block" and d["spans"] == [list(c_block.span)]
    assert d["findings"][0]["offset"] == ANSWER.index("gets(name)")
    assert "CWE-242" in d["notice"] and v.categories == ["CWE-242"]
    for end, v in verdicts:
        assert v.error is None
        for b in (c_block, py_block):
            if b.start < end <= b.end:  # the block is open (its closing line not complete)
                assert v.hold_from is not None and v.hold_from <= b.start, (end, v.hold_from)
        if v.hold_from is not None:  # never holds prose that precedes the current line
            assert v.hold_from >= ANSWER.rfind("\n", 0, end - 1) + 1 or any(
                b.start == v.hold_from for b in (c_block, py_block)
            )
    assert verdicts[-1][1].hold_from is None


async def test_prose_only_stream_never_holds_and_never_scans() -> None:
    prose = "A long answer with `inline code`, lists:\n\n- one\n- two\n\nand no fences at all.\n" * 20
    g = guard()
    for _, v in await stream(g, prose, 9):
        assert not v.flagged and v.error is None
        assert v.details == {} or v.details.get("blocks_scanned") == 0
    assert g._scanner is None  # nothing to scan: rules were never even needed


async def test_hold_code_blocks_false_never_holds() -> None:
    verdicts = await stream(guard(hold_code_blocks=False), ANSWER, 5)
    assert all(v.hold_from is None for _, v in verdicts)
    assert sum(v.flagged for _, v in verdicts) == 1


async def test_unterminated_block_is_scanned_on_the_final_check() -> None:
    text = "Try this:\n```python\nimport hashlib\nh = hashlib.md5(pw)\n"
    verdicts = await stream(guard(), text, 8)
    assert not any(v.flagged for _, v in verdicts[:-1])
    last = verdicts[-1][1]
    assert last.flagged and last.span == (text.index("```"), len(text) - 1)
    assert last.details["rule"] == "insecure-md5-hash-usage" and last.details["recommended_action"] == "warn"


async def test_output_stage_scans_every_block_once() -> None:
    g = guard()
    v = await g.check(GuardInput(stage="output", messages=[], text=ANSWER))
    c_block, _ = extract_code_blocks(ANSWER)
    assert v.flagged and v.span == c_block.span and v.details["spans"] == [list(c_block.span)]
    assert v.details["blocks_scanned"] == 2
    assert [b["action"] for b in v.details["blocks"]] == ["block", "ignore"]
    clean = await g.scan_text("Just prose.\n```python\nprint('ok')\n```\n")
    assert not clean.flagged and clean.error is None and clean.score == 0.0


async def test_severity_actions_decide_the_action_and_what_is_ignored() -> None:
    text = "```python\nh = hashlib.md5(x)\n```\n```c\ngets(b);\n```\n"
    g = guard(severity_actions={"warning": "ignore", "error": "redact"})
    v = await g.scan_text(text)
    assert v.flagged and v.details["action"] == "redact"
    assert v.details["spans"] == [list(extract_code_blocks(text)[1].span)]  # the md5 block is not flagged
    only_warn = await g.scan_text("```python\nh = hashlib.md5(x)\n```\n")
    assert not only_warn.flagged
    default = await guard().scan_text(text)
    assert "action" not in default.details  # the step's own action applies unless severity_actions is set
    assert default.details["recommended_action"] == "block" and len(default.details["spans"]) == 2


@pytest.mark.parametrize(
    "opts,msg",
    [({"hold_code_block": True}, "unknown option"),
     ({"severity_actions": {"fatal": "block"}}, "unknown severity"),
     ({"severity_actions": {"error": "explode"}}, "must be one of"),
     ({"semgrep": "sometimes"}, "auto, required"),
     ({"hold_code_blocks": "yes"}, "true or false"),
     ({"unknown_language": "guess"}, "all or agnostic")],
)  # fmt: skip
def test_option_errors(opts: dict[str, object], msg: str) -> None:
    with pytest.raises(GuardConfigError, match=msg):
        CodeShieldGuard(**opts)


def test_step_keys_are_tolerated() -> None:
    CodeShieldGuard(action="block", on_error="allow", timeout_ms=2000, name="cs", notice="[x]")


async def test_tool_call_arguments_in_the_gate_text_are_scanned_as_they_stream() -> None:
    args = json.dumps({"code": "import hashlib\nprint(hashlib.md5(b'x').hexdigest())", "timeout": 5})
    text = "Let me run that.\n[tool_call run_python] " + args
    start = text.index('"import')
    end = text.index('", "timeout"') + 1
    for size in (1, 4, 13, len(text)):
        verdicts = await stream(guard(), text, size)
        flagged = [v for _, v in verdicts if v.flagged]
        assert len(flagged) == 1 and flagged[0].span == (start, end)
        assert flagged[0].details["language"] == "python" and "run_python" in flagged[0].reason
        for pos, v in verdicts:
            if start < pos < end:  # the string value is still arriving: held from its opening quote
                assert v.hold_from is not None and v.hold_from <= start


async def test_json_text_and_fenced_code_inside_json_strings() -> None:
    g = guard()
    v = await g.scan_text(json.dumps({"language": "c", "code": "int main() { char b[9]; gets(b); }"}))
    assert v.flagged and v.details["rule"] == "bugprone-gets"
    inner = json.dumps({"answer": "Use this:\n```python\nh = hashlib.sha1(p)\n```\n"})
    w = await g.scan_text(inner)
    assert w.flagged and w.details["rule"] == "insecure-sha1-hash-usage"
    assert not (await g.scan_text(json.dumps({"city": "Paris", "units": "metric"}))).flagged
    # prose that merely starts with a bracket is not JSON and still gets its fences scanned
    md = "[1] See below.\n```c\ngets(b);\n```\n"
    assert (await g.scan_text(md)).flagged


async def test_input_stage_scans_tool_results() -> None:
    msgs = [Message.of("user", "run it"), Message.of("tool", "```php\n<?php $h = md5($pw);\n```")]
    v = await guard().check(GuardInput(stage="input", messages=msgs))
    assert v.flagged and v.details["rule"] == "risky-crypto-algorithm" and "message 1" in v.reason
    assert not (await guard(roles=["user"]).check(GuardInput(stage="input", messages=msgs))).flagged


async def test_unlabelled_block_is_detected_or_scanned_as_every_language() -> None:
    g = guard()
    v = await g.scan_text("```\nimport hashlib\n\ndef digest(p):\n    return hashlib.md5(p)\n```\n")
    assert v.flagged and v.details["blocks"][0]["language"] == "python"
    assert v.details["blocks"][0]["language_source"] == "detected"
    w = await g.scan_text("```\nh = hashlib.md5(p)\n```\n")  # too little to tell: every supported language
    assert w.flagged and len(w.details["blocks"][0]["scanned_as"]) == 8
    # as in Meta's scan_code(language=None): the Java, PHP and Python rules all match
    assert {f["language"] for f in w.details["findings"]} == {"java", "php", "python"}


async def test_semgrep_not_installed_is_reported_as_not_run_never_as_a_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(SemgrepRunner, "locate", staticmethod(lambda explicit=None: None))
    g = CodeShieldGuard()
    await g.start()
    v = await g.scan_text("```python\ndef f(user):\n    return eval(user)\n```\n")
    assert not v.flagged and v.error is None
    assert v.details["tier2"] == "not_run" and "not installed" in v.details["tier2_not_run"]
    assert v.details["blocks"][0]["tier2"] == "not_run"
    assert g.status()["state"] == "degraded" and g.status()["tiers"] == ["regex"]
    assert g.status()["semgrep"]["state"] == "not installed"
    # tier 1 still works, and a block that needs no tier 2 says so
    w = await g.scan_text("```python\nprint('hi')\n```\n")
    assert w.details["tier2"] == "not_needed"
    # semgrep: required: the step is failed (the gateway not ready) and such a block is an error
    required = CodeShieldGuard(semgrep="required")
    await required.start()
    assert required.status()["state"] == "failed"
    r = await required.scan_text("```python\ndef f(user):\n    return eval(user)\n```\n")
    assert not r.flagged and r.error is not None and "not installed" in r.error
    assert r.details["blocks"][0]["tier2"] == "error"


@pytest.mark.parametrize("semgrep", ["auto", "required"])
async def test_a_configured_semgrep_that_is_missing_is_an_error_never_a_pass(semgrep: str) -> None:
    g = CodeShieldGuard(semgrep=semgrep, semgrep_path="/nonexistent/semgrep-core")
    await g.start()
    v = await g.scan_text("```python\ndef f(user):\n    return eval(user)\n```\n")
    assert not v.flagged and v.error is not None and "/nonexistent/semgrep-core" in v.error
    assert v.details["blocks"][0]["tier2"] == "error"
    st = g.status()
    assert st["state"] == ("failed" if semgrep == "required" else "degraded")
    assert st["semgrep"]["state"] == "failed" and "not an executable" in st["semgrep"]["reason"]
    # what tier 1 finds is still flagged
    c = await g.scan_text("```c\nvoid f(char *b) { gets(b); }\n```\n")
    assert c.flagged and c.error is None


async def test_semgrep_off_is_reported() -> None:
    v = await guard().scan_text("```python\nreturn eval(user)\n```\n")
    assert v.details["tier2"] == "off" and not v.flagged

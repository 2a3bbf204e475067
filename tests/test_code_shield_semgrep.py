"""CodeShield tier 2: semgrep run by us, end to end through a stream, batched, timed out, cleaned up.

Both engines: the default long-lived `osemgrep lsp` server (one per event loop) and one
`osemgrep scan` process per batch (~0.1-0.4 s each on 2 cores, so those tests batch blocks).
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from waits import until

from gateway.guards.code_fences import extract_code_blocks
from gateway.guards.code_shield import CodeShieldGuard, SemgrepRunner, find_rules_dir
from gateway.types import Message

if find_rules_dir() is None or SemgrepRunner.locate() is None:  # pragma: no cover
    pytest.skip("codeshield and semgrep are not installed", allow_module_level=True)

pytestmark = pytest.mark.slow  # runs semgrep

PY_BAD = (
    "```python\nimport subprocess\n\ndef run(user_input):\n    value = eval(user_input)\n"
    "    subprocess.call(user_input, shell=True)\n    return value\n```"
)
JS_BAD = (
    "```js\nconst cp = require('child_process');\nfunction handle(input) {\n"
    "  cp.exec(input, (err, out) => console.log(out));\n}\n```"
)
C_BAD = "```c\nvoid copy(char *src) {\n  char buf[16];\n  strcpy(buf, src);\n}\n```"
JAVA_XXE = (
    "```java\nclass P {\n  void f(java.io.InputStream in, DefaultHandler h) throws Exception {\n"
    "    SAXParserFactory spf = SAXParserFactory.newInstance();\n    SAXParser p = spf.newSAXParser();\n"
    "    p.parse(in, h);\n  }\n}\n```"
)
PY_OK = "```python\ndef add(a, b):\n    return a + b\n```"
ANSWER = f"First, Python:\n\n{PY_BAD}\n\nThen JavaScript:\n\n{JS_BAD}\n\nAnd a safe helper:\n\n{PY_OK}\n\nDone.\n"


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Point tempfile at an empty dir, so a leaked semgrep file would show (tests aclose() first)."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    yield tmp_path
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def shared() -> CodeShieldGuard:
    return CodeShieldGuard(hold_code_blocks=True)


def runs(g: CodeShieldGuard) -> int:
    assert g._scanner is not None and g._scanner.semgrep is not None
    return g._scanner.semgrep.runs


def processes(g: CodeShieldGuard) -> int:
    assert g._scanner is not None and g._scanner.semgrep is not None
    return g._scanner.semgrep.processes


@pytest.mark.parametrize("mode", ["server", "process"])
async def test_semgrep_findings_end_to_end_through_a_stream(mode: str, private_tmp: Path) -> None:
    shared = CodeShieldGuard(hold_code_blocks=True, semgrep_mode=mode)
    py, js, ok = extract_code_blocks(ANSWER)
    await shared.start()
    before = runs(shared)
    s = shared.open_stream([Message.of("user", "write code")], "r-semgrep")
    flagged = []
    size = 23
    for end in range(size, len(ANSWER) + size, size):
        end = min(end, len(ANSWER))
        v = await s.check(ANSWER[:end], end - size, end == len(ANSWER))
        assert v.error is None, v.error
        if v.flagged:
            flagged.append(v)
        for b in (py, js, ok):
            if b.start < end <= b.end:
                assert v.hold_from is not None and v.hold_from <= b.start
    await s.close()
    assert [v.span for v in flagged] == [py.span, js.span]
    py_rules = {(f["rule"], f["line"], f["analyzer"]) for f in flagged[0].details["findings"]}
    assert py_rules == {
        ("insecure-eval-use", 4, "semgrep"),
        ("insecure-subprocess-using-shell", 5, "semgrep"),
    }
    assert flagged[0].details["tier2"] == "ran" and set(flagged[0].categories) == {"CWE-78", "CWE-94"}
    assert {f["rule"] for f in flagged[1].details["findings"]} == {"child-process"}
    assert flagged[1].details["findings"][0]["offset"] == ANSWER.index("cp.exec(input")
    assert runs(shared) - before == 2  # one batch per block that needed it; the safe block needed none
    # the server started once (by start(), its self-test on it); a process per batch, plus the self-test's
    assert processes(shared) == (1 if mode == "server" else 3)
    await shared.aclose()


@pytest.mark.parametrize("mode", ["server", "process"])
async def test_one_semgrep_request_per_batch_of_blocks(mode: str, private_tmp: Path) -> None:
    shared = CodeShieldGuard(semgrep_mode=mode)
    text = "\n\n".join([PY_BAD, C_BAD, JS_BAD, JAVA_XXE, PY_OK]) + "\n"
    await shared.start()
    before = runs(shared)
    v = await shared.scan_text(text)
    assert runs(shared) - before == 1
    blocks = extract_code_blocks(text)
    assert v.details["spans"] == [list(b.span) for b in blocks[:4]]
    by_block = {f["block"].split()[2]: f["rule"] for f in v.details["findings"]}
    assert by_block["2"] == "vulnerable-strcpy"  # no prescan in Meta's rule: its driver never runs it alone
    assert by_block["4"] == "xxe-insecure-sax-parser"
    java = [f for f in v.details["findings"] if f["rule"] == "xxe-insecure-sax-parser"]
    # semgrep's "ERROR" maps to error -> block (Meta's driver compares "ERROR" with "error": always warn)
    assert java[0]["severity"] == "error" and java[0]["action"] == "block"
    assert v.details["recommended_action"] == "block"
    assert processes(shared) == (1 if mode == "server" else 2)  # process mode: start()'s self-test too
    await shared.aclose()


async def test_purplellama_golden_cases_and_what_metas_driver_misses(shared: CodeShieldGuard) -> None:
    # CodeShield/tests/test_codeshield.py: eval(input) is insecure (their own driver misses it with
    # current semgrep: --project-root / makes it scan nothing), the other two are secure.
    r = await shared.scan_code("eval(input)", "python")
    assert [f.rule for f in r.findings] == ["insecure-eval-use"] and r.tier2 == "ran"
    for code in ("hello world", "temp_filename = tmpnam(NULL);"):
        assert (await shared.scan_code(code, "c")).findings == []


async def test_prefilters_skip_semgrep_when_no_rule_can_match(shared: CodeShieldGuard) -> None:
    scanner = await shared.scanner()
    assert scanner.rules.prefilters_loaded
    # Meta's prescan `run\(` would start semgrep here; semgrep's own prefilter knows shell= is missing
    assert scanner.tier2_rules("result = runner.run(job)\n", "python") == []
    assert [r.id for r in scanner.tier2_rules("x = eval(s)\n", "python")] == ["insecure-eval-use"]
    before = runs(shared)
    r = await shared.scan_code("def f(job):\n    return runner.run(job)\n", "python")
    assert r.tier2 == "not_needed" and runs(shared) == before


async def test_tier1_block_skips_tier2(shared: CodeShieldGuard) -> None:
    before = runs(shared)
    r = await shared.scan_code("void f(char *s) { char b[4]; gets(b); strcpy(b, s); }", "c")
    assert r.tier2 == "skipped" and [f.rule for f in r.findings] == ["bugprone-gets"]
    assert runs(shared) == before


@pytest.mark.parametrize("mode", ["server", "process"])
async def test_timeout_is_a_guard_error_and_leaves_nothing_behind(mode: str, private_tmp: Path) -> None:
    g = CodeShieldGuard(semgrep_timeout_s=0.001, semgrep_mode=mode)
    v = await g.scan_text(PY_BAD + "\n")
    assert not v.flagged and v.error is not None and "timed out" in v.error
    assert v.details["tier2"] == "error"
    await g.aclose()
    if Path("/proc/self/status").exists():
        assert _our_semgreps() == []


def _our_semgreps() -> list[int]:
    """Live child processes of this test process running as osemgrep."""
    out = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            text = status.read_text()
            fields = dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)
            ours = fields.get("PPid", "").strip() == str(os.getpid()) and fields.get("State", "")[:1] != "Z"
            if ours and (status.parent / "cmdline").read_bytes().split(b"\0")[0].endswith(b"osemgrep"):
                out.append(int(status.parent.name))
        except OSError:
            continue
    return out


async def test_cancelled_scan_kills_the_semgrep_process_and_cleans_up(private_tmp: Path) -> None:
    g = CodeShieldGuard(semgrep_mode="process")
    await g.start()
    started = processes(g)  # start()'s self-test
    task = asyncio.create_task(g.scan_text(PY_BAD + "\n"))
    assert await until(lambda: processes(g) > started, timeout=10)  # the scan's process is started
    assert processes(g) == started + 1 and not task.done()
    task.cancel()  # what the gate does on a step timeout or a client disconnect
    with pytest.raises(asyncio.CancelledError):
        await task
    if Path("/proc/self/status").exists():
        assert _our_semgreps() == []


async def test_server_survives_a_cancelled_scan_and_aclose_stops_it(private_tmp: Path) -> None:
    g = CodeShieldGuard()
    assert (await g.scan_code("eval(x)", "python")).findings  # starts this loop's server
    srv = next(iter(g._scanner.semgrep._servers.values()))  # type: ignore[union-attr]
    task = asyncio.create_task(g.scan_text(PY_BAD + "\n"))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert sorted(p.name for p in Path(srv.ws).iterdir()) == ["rules.json"]  # the scan's files are gone
    r = await g.scan_code("subprocess.call(c, shell=True)", "python")
    assert [f.rule for f in r.findings] == ["insecure-subprocess-using-shell"] and processes(g) == 1
    info = g.describe()
    assert info["semgrep_mode"] == "server" and info["prefilters"] and info["semgrep_rules"]["python"] == 10
    await g.aclose()
    assert await until(lambda: srv.dead and not Path(srv.ws).exists(), timeout=5)
    if Path("/proc/self/status").exists():
        assert _our_semgreps() == []


async def test_server_that_cannot_start_falls_back_to_a_process_per_batch(tmp_path: Path) -> None:
    fake = tmp_path / "semgrep-core"
    fake.write_text("#!/bin/sh\nexit 3\n")
    fake.chmod(0o755)
    g = CodeShieldGuard(semgrep_path=str(fake), semgrep_timeout_s=5)
    v = await g.scan_text(PY_BAD + "\n")
    assert v.error is not None and "without JSON" in v.error  # the fallback ran and failed loudly
    assert g.describe()["semgrep_mode"] == "process" and g.describe()["semgrep_server_error"]


async def test_nosemgrep_comments_in_model_output_do_not_switch_the_scanner_off(shared: CodeShieldGuard) -> None:
    for marker in ("# nosemgrep", "# nosem", "# NOSEMGREP: insecure-eval-use"):
        r = await shared.scan_code(f"def f(u):\n    return eval(u)  {marker}\n", "python")
        assert [f.rule for f in r.findings] == ["insecure-eval-use"], marker


async def test_tier2_runs_after_a_regex_hit_only_when_it_can_change_the_outcome(
    shared: CodeShieldGuard,
) -> None:
    code = "import hashlib, subprocess\nh = hashlib.md5(data)\nsubprocess.run(cmd, shell=True)\n"
    before = runs(shared)
    r = await shared.scan_code(code, "python")  # flagged by tier 1; the step's action applies either way
    assert [f.rule for f in r.findings] == ["insecure-md5-hash-usage"] and r.tier2 == "skipped"
    assert runs(shared) == before
    full = await CodeShieldGuard(exhaustive=True).scan_code(code, "python")
    assert {f.rule for f in full.findings} == {"insecure-md5-hash-usage", "insecure-subprocess-using-shell"}
    # with a severity mapping, a semgrep ERROR rule (xxe: block) can escalate a regex warning (md5: warn)
    java = (
        JAVA_XXE.split("\n", 1)[1]
        .rsplit("```", 1)[0]
        .replace(
            "SAXParser p",
            'MessageDigest d = MessageDigest.getInstance("MD5");\n    SAXParser p',
        )
    )
    mapped = CodeShieldGuard(severity_actions={"error": "block", "warning": "warn"})
    m = await mapped.scan_code(java, "java")
    assert {f.rule for f in m.findings} == {
        "weak-md5-hashing",
        "xxe-insecure-sax-parser",
    } and m.action == "block"

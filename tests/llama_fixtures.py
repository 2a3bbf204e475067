"""Tiny GGUFs for the engine / Llama Guard / local upstream tests, built once per test process.

Built by scripts/make_tiny_gguf.py with the real Llama 3 vocabulary (from the llama-cpp-python
sdist) and the Llama Guard 3 chat template; a few MB each, about a second to write.
Use them from a test module with `pytest_plugins = ["llama_fixtures"]`.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TRIGGER = " bomb"  # the rigged guard flags any prompt containing this token


@functools.cache
def _workdir() -> Path:
    d = Path(tempfile.mkdtemp(prefix="gg-tiny-gguf-"))
    atexit.register(shutil.rmtree, d, ignore_errors=True)
    return d


@functools.cache
def build(kind: str) -> Path:
    """kind: tiny (random, LG3-1B template) | rig (toy guard) | rig8b (LG3-8B template) | llama4 (stub)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from make_tiny_gguf import make_dense_llama4_stub, make_tiny_gguf
    finally:
        sys.path.pop(0)
    out = _workdir() / f"{kind}.gguf"
    if kind == "llama4":
        return make_dense_llama4_stub(out)
    if kind == "tiny":
        return make_tiny_gguf(out)
    if kind == "rig":
        return make_tiny_gguf(out, rig=[TRIGGER], rig_category="S1")
    if kind == "rig8b":
        return make_tiny_gguf(out, rig=[TRIGGER], rig_category="S9", template="lg3-8b")
    raise ValueError(kind)


@pytest.fixture(scope="session")
def tiny_gguf() -> Path:
    pytest.importorskip("llama_cpp")
    return build("tiny")


@pytest.fixture(scope="session")
def rig_gguf() -> Path:
    pytest.importorskip("llama_cpp")
    return build("rig")


@pytest.fixture(scope="session")
def llama4_stub_gguf() -> Path:
    pytest.importorskip("llama_cpp")
    return build("llama4")


@pytest.fixture(scope="session")
def rig8b_gguf() -> Path:
    pytest.importorskip("llama_cpp")
    return build("rig8b")

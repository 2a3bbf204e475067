"""A small run of scripts/loadtest.py (the full one is 500 streams for 60 s, run by hand): many
concurrent streams through a real `guardgate serve`, every token checked, memory reported."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def loadtest():
    spec = importlib.util.spec_from_file_location("loadtest", ROOT / "scripts" / "loadtest.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules["loadtest"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_checker_detects_loss_mixing_and_reordering() -> None:
    lt = loadtest()
    r = lt.Report(path="x", streams=1, seconds=0)
    load = lt.Load("", r, 4, 0, 0, 1)
    want = lt.expected_text(3, 1, 4)  # s3r1t0 s3r1t1 s3r1t2 s3r1t3
    load.check(3, 1, want, want)
    assert (r.tokens_lost, r.tokens_mixed, r.tokens_garbled) == (0, 0, 0)
    load.check(3, 1, want, "s3r1t0 s3r1t1 s3r1t3")  # one lost
    assert r.tokens_lost == 1
    load.check(3, 1, want, "s3r1t0 s3r1t1 s9r1t2 s3r1t2 s3r1t3")  # another stream's token
    assert r.tokens_mixed == 1
    load.check(3, 1, want, "s3r1t1 s3r1t0 s3r1t2 s3r1t3")  # reordered
    assert r.tokens_garbled == 1
    assert r.tokens_expected == 16


@pytest.mark.parametrize("path", ["relay", pytest.param("gate", marks=pytest.mark.slow)])
@pytest.mark.slow
def test_small_load_is_exact(path: str) -> None:
    lt = loadtest()
    r = asyncio.run(lt.run(streams=50, seconds=3, path=path, chunks=12, chunk_delay_ms=20, timeout=20, grace=20,
                           warmup=1))
    print(lt.summary(r))
    assert r.clean, lt.summary(r)
    assert r.requests >= 100
    assert r.peak_concurrency == 50
    assert r.tokens_expected == 12 * r.requests
    assert 0 < r.rss_kib_start <= r.rss_kib_peak
    assert r.rss_kib_end - r.rss_kib_warm < 30 * 1024  # no runaway growth within a short run


@pytest.mark.slow
def test_small_load_of_json_answers_is_exact() -> None:
    """Non-stream answers of many lengths, 50 clients at once: each body whole and its own."""
    lt = loadtest()
    r = asyncio.run(lt.run(streams=50, seconds=3, path="relay", chunks=12, timeout=20, grace=20, warmup=1,
                           answers="json"))
    print(lt.summary(r))
    assert r.clean, lt.summary(r)
    assert r.requests >= 100 and r.tokens_expected == 12 * r.requests


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_gateway_memory_flat_under_concurrent_guarded_streams() -> None:
    """200 guarded streams for 15 s: RSS after warm-up must not keep growing (a GC tuning that let
    objects alive across streams pile up grew it ~4 MiB/s here)."""
    lt = loadtest()
    r = asyncio.run(lt.run(streams=200, seconds=15, path="gate", chunks=20, chunk_delay_ms=50, timeout=30, grace=30,
                           warmup=5))
    print(lt.summary(r))
    assert r.clean, lt.summary(r)
    assert r.rss_kib_end - r.rss_kib_warm < 16 * 1024, lt.summary(r)

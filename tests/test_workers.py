"""`guardgate serve --workers 2` as a real process tree: one port, one config, shared reload, summed
metrics, one audit file, SIGTERM drain, a dead worker restarted, and the memory rate-limit store
refused (it would count per worker)."""

from __future__ import annotations

import concurrent.futures
import json
import re
import signal
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

pytest.register_assert_rewrite("workers_fixtures")
from workers_fixtures import access_pids, gateway_yaml, poll  # noqa: E402

pytest_plugins = ["workers_fixtures"]
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not sys.platform.startswith("linux"),
                                                   reason="--workers needs Linux SO_REUSEPORT")]


def regex_policy(path: Path, word: str) -> Path:
    path.write_text(textwrap.dedent(f"""
        name: guarded
        input:
          steps:
            - guard: regex
              patterns: [{{pattern: "{word}", category: banned}}]
              action: block
        """))
    return path


def metric_sum(text: str, name: str, *labels: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") and all(lb in line for lb in labels))


def fire(served: Any, texts: list[str], threads: int = 16) -> list[httpx.Response]:
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        return list(pool.map(served.chat, texts))


def test_reload_by_file_change_and_sighup_reaches_every_worker(serve, upstream, tmp_path: Path) -> None:
    pol = regex_policy(tmp_path / "guarded.yaml", "zebra")
    s = serve(gateway_yaml(tmp_path, upstream[1], policy=str(pol)))
    assert all(r.status_code == 400 for r in fire(s, ["a zebra"] * 8))
    assert all(r.status_code == 200 for r in fire(s, ["a giraffe"] * 8))
    time.sleep(0.01)  # a new mtime for the edit (ns clocks; harmless)
    regex_policy(pol, "giraffe")
    # Every worker watches the file: each logs its own reload (the worker log lines carry the pid).
    reloaded = poll(lambda: set(re.findall(r" (\d+) guardgate\.policy INFO policy guarded reloaded", s.log()))
                    if len(set(re.findall(r" (\d+) guardgate\.policy INFO policy guarded reloaded", s.log()))) >= 2
                    else None)
    assert reloaded == {str(p) for p in s.worker_pids()}
    results = fire(s, ["a giraffe"] * 24)
    assert [r.status_code for r in results] == [400] * 24  # whichever worker answered
    assert len(access_pids(s.log())) == 2  # and both did
    s.signal(signal.SIGHUP)
    hup = poll(lambda: set(re.findall(r" (\d+) guardgate\.policy INFO SIGHUP: reloading", s.log())) or None
               if len(set(re.findall(r" (\d+) guardgate\.policy INFO SIGHUP: reloading", s.log()))) >= 2 else None)
    assert hup == {str(p) for p in s.worker_pids()}


def test_metrics_are_sums_over_workers(serve, upstream, tmp_path: Path) -> None:
    pol = regex_policy(tmp_path / "guarded.yaml", "zebra")
    s = serve(gateway_yaml(tmp_path, upstream[1], policy=str(pol)))
    n = 40
    results = fire(s, ["a zebra" if i % 4 == 0 else "clean" for i in range(n)])
    assert sum(r.status_code == 400 for r in results) == n // 4
    assert len(access_pids(s.log())) == 2, "the requests should have been spread over both workers"
    for _ in range(6):  # whichever worker answers the scrape, the sums are over both
        text = s.get("/metrics", headers={"Connection": "close"}).text
        assert metric_sum(text, "guardgate_guard_verdicts_total", 'guard="regex"') == n
        assert metric_sum(text, "guardgate_guard_verdicts_total", 'guard="regex"', 'verdict="flagged"') == n // 4
        assert metric_sum(text, "guardgate_policy_actions_total", 'action="block"') == n // 4


def test_audit_lines_from_all_workers_are_whole_and_none_is_lost(serve, upstream, tmp_path: Path) -> None:
    pol = regex_policy(tmp_path / "guarded.yaml", "zebra")
    audit = tmp_path / "audit.jsonl"
    extra = f"audit: {{path: {audit}, content: true}}\n"
    s = serve(gateway_yaml(tmp_path, upstream[1], policy=str(pol), extra=extra))
    big = "x" * 20000  # each line far beyond PIPE_BUF (4096): one write(2) per line, under a lock
    n = 60
    results = fire(s, [f"{i} {big}" for i in range(n)])
    assert all(r.status_code == 200 for r in results)
    assert len(access_pids(s.log())) == 2
    lines = poll(lambda: (ls := audit.read_text().splitlines()) and len(ls) >= n and ls)
    records = [json.loads(line) for line in lines]  # a torn or interleaved line would not parse
    assert len(records) == n


def test_sigterm_drains_every_workers_streams(serve, upstream, tmp_path: Path) -> None:
    s = serve(gateway_yaml(tmp_path, upstream[1], extra="shutdown_grace_s: 20\n"), args=("--policy", "none"))
    bodies: list[str] = []

    def stream() -> str:
        with httpx.stream("POST", s.url + "/v1/chat/completions", timeout=30, headers={"Connection": "close"},
                          json={"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}) as r:
            return "".join(r.iter_text())

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        futs = [pool.submit(stream) for _ in range(16)]
        poll(lambda: len(upstream[0].requests) >= 16)  # every stream is in flight (on both workers)
        t0 = time.monotonic()
        s.signal(signal.SIGTERM)
        bodies = [f.result() for f in futs]
    assert s.proc.wait(30) == 0
    assert all(b.rstrip().endswith("data: [DONE]") and "w14" in b for b in bodies)  # each stream whole
    assert time.monotonic() - t0 < 20
    assert len(access_pids(s.log())) == 2


def test_a_dead_worker_is_restarted_and_logged(serve, upstream, tmp_path: Path) -> None:
    s = serve(gateway_yaml(tmp_path, upstream[1]), args=("--policy", "none"))
    before = s.worker_pids()
    assert len(before) == 2
    victim = before[0]
    import os

    os.kill(victim, signal.SIGKILL)
    poll(lambda: f"(pid {victim}) died with signal SIGKILL; restarting" in s.log())
    after = poll(lambda: (p := s.worker_pids()) and len(p) == 2 and victim not in p and p)
    assert before[1] in after
    poll(lambda: s.log().count("guardgate listening on") >= 3)
    assert all(r.status_code == 200 for r in fire(s, ["hi"] * 16))


def test_memory_rate_limits_are_refused_with_several_workers(serve, upstream, tmp_path: Path) -> None:
    extra = "keys:\n  - {name: team, key_env: TEAM_KEY, requests_per_minute: 10}\n"
    s = serve(gateway_yaml(tmp_path, upstream[1], extra=extra), env={"TEAM_KEY": "gk-team-key-123"}, wait=False)
    assert s.proc.wait(60) == 2
    assert "limits.store: memory would be counted per worker" in s.log()
    # with one worker the same file runs
    one = serve(gateway_yaml(tmp_path, upstream[1], extra=extra, name="one.yaml"), workers=1,
                env={"TEAM_KEY": "gk-team-key-123"}, wait=False)
    poll(lambda: "guardgate listening on" in one.log(), 60)
    assert one.proc.poll() is None

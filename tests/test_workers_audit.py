"""The audit log shared by worker processes: several processes append and rotate one file; every line
ends up whole in exactly one of the files, none is lost."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest

from gateway.workers.audit import SharedAuditLog


def _writer(path: str, who: int, n: int, max_bytes: int) -> None:
    log = SharedAuditLog(path, max_bytes=max_bytes, backups=1000)
    for i in range(n):
        log.write({"who": who, "i": i, "pad": "x" * (100 + (i * 37) % 9000)})  # some lines past PIPE_BUF
    log.close()


@pytest.mark.parametrize("max_bytes", [0, 64 * 1024])
def test_processes_share_one_log_and_its_rotation(tmp_path: Path, max_bytes: int) -> None:
    path = tmp_path / "audit.jsonl"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(path), w, 150, max_bytes)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    files = [path, *sorted(tmp_path.glob("audit.jsonl.*"))]
    files = [f for f in files if not f.name.endswith(".lock")]
    seen = set()
    for f in files:
        for line in f.read_text().splitlines():
            rec = json.loads(line)  # a torn or interleaved line would not parse
            seen.add((rec["who"], rec["i"]))
        if max_bytes:
            assert f.stat().st_size <= max_bytes
    assert seen == {(w, i) for w in range(3) for i in range(150)}
    assert (len(files) > 3) == bool(max_bytes)  # rotated (many times) only with a size bound

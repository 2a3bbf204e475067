"""The audit log: one JSON line per request, appended, with optional size-based rotation.

Records carry request text only under the "content" key, which is dropped unless the log was
opened with `include_content=True` (prompts and answers may be sensitive).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Any, TextIO

log = logging.getLogger("guardgate.audit")


class AuditLog:
    """Append-only JSONL writer. `max_bytes` > 0 rotates path → path.1 → ... → path.<backups>."""

    def __init__(self, path: str | os.PathLike[str], *, include_content: bool = False, max_bytes: int = 0,
                 backups: int = 5) -> None:
        self.path = Path(path)
        self.include_content = include_content
        self.max_bytes = max_bytes
        self.backups = max(1, backups)
        self._fh: TextIO | None = None
        self._lock = threading.Lock()  # records may come from worker threads (guardgate check, tests)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def _open(self) -> TextIO:
        if self._fh is None:
            self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (kept open between writes)
        return self._fh

    def write(self, record: dict[str, Any]) -> None:
        if not self.include_content and "content" in record:
            record = {k: v for k, v in record.items() if k != "content"}
        line = json.dumps(record, ensure_ascii=False, separators=(",", ":"), default=str) + "\n"
        with self._lock:
            try:
                fh = self._open()
                if self.max_bytes and fh.tell() and fh.tell() + len(line.encode()) > self.max_bytes:
                    self._rotate()
                    fh = self._open()
                fh.write(line)
                fh.flush()
            except OSError:
                log.exception("audit log %s: write failed", self.path)

    def _rotate(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        for i in range(self.backups - 1, 0, -1):
            src = self.path.with_name(f"{self.path.name}.{i}")
            if src.exists():
                os.replace(src, self.path.with_name(f"{self.path.name}.{i + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))

    def close(self) -> None:
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

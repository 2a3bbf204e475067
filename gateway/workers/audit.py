"""The audit log shared by the worker processes of one `guardgate serve --workers N`.

Every worker appends to the same file. Each line is one `write(2)` on a descriptor opened with
O_APPEND, under an exclusive `flock` on a lock file beside the log (`<path>.lock`, never rotated):
lines of different workers are never interleaved, whatever their length and file system, and the
size check, the rotation and the write of a line are one step for all workers. A worker that finds
the file rotated by another (its inode changed) opens the new one before writing.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from typing import Any

from gateway.policy.audit import AuditLog

log = logging.getLogger("guardgate.audit")


class SharedAuditLog(AuditLog):
    """`AuditLog` for many processes: locked, single-write appends; rotation safe across processes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._fd: int | None = None
        self._lock_fd: int | None = None

    def _descriptors(self) -> tuple[int, int]:
        if self._lock_fd is None:
            self._lock_fd = os.open(f"{self.path}.lock", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if self._fd is not None:
            try:
                same = os.fstat(self._fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # another worker rotated it
                os.close(self._fd)
                self._fd = None
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        return self._fd, self._lock_fd

    def write(self, record: dict[str, Any]) -> None:
        if not self.include_content and "content" in record:
            record = {k: v for k, v in record.items() if k != "content"}
        data = (json.dumps(record, ensure_ascii=False, separators=(",", ":"), default=str) + "\n").encode()
        with self._lock:
            try:
                fd, lock_fd = self._descriptors()
                fcntl.flock(lock_fd, fcntl.LOCK_EX)
                try:
                    fd, _ = self._descriptors()  # rotated while we waited for the lock?
                    size = os.fstat(fd).st_size
                    if self.max_bytes and size and size + len(data) > self.max_bytes:
                        self._rotate()
                        fd, _ = self._descriptors()
                    view = memoryview(data)
                    while view:  # one write(2) for the line; the loop only finishes a short write
                        view = view[os.write(fd, view) :]
                finally:
                    fcntl.flock(lock_fd, fcntl.LOCK_UN)
            except OSError:
                log.exception("audit log %s: write failed", self.path)

    def _rotate(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        super()._rotate()

    def close(self) -> None:
        with self._lock:
            for fd in (self._fd, self._lock_fd):
                if fd is not None:
                    os.close(fd)
            self._fd = self._lock_fd = None
        super().close()

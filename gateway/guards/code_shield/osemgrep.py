"""Running semgrep-core as `osemgrep`, and what both semgrep engines share: errors and hits."""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import logging
import os
import re
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from gateway.guards.code_shield.rules import SemgrepRule

LOG = logging.getLogger("gateway.guards.code_shield")

_LINKS: dict[str, str] = {}
_LINKS_LOCK = threading.Lock()


def osemgrep_path(binary: str) -> str:
    """A path named ``osemgrep`` that runs `binary` (semgrep-core), created once per binary.

    semgrep-core is a multi-call binary: it is the osemgrep CLI (``scan``, ``lsp``) only when the
    basename of its argv[0] is ``osemgrep`` (semgrep's own wrapper execs it with that argv[0]).
    Setting argv[0] apart from the program (``executable=``) does not survive every spawner: uvloop's
    ``subprocess_exec`` overwrites argv[0] with ``executable``, so under ``guardgate serve`` the binary
    ran as plain semgrep-core, rejected ``lsp``/``scan`` and tier 2 never ran. A link named
    ``osemgrep`` carries the name in the path itself, whatever starts the process. It lives in the
    cache dir (never in site-packages, which may be read-only), else in a private temp dir.
    """
    real = os.path.realpath(binary)
    with _LINKS_LOCK:
        link = _LINKS.get(real)
        if link is not None and os.path.realpath(link) == real:
            return link
        if os.path.basename(binary) == "osemgrep":
            _LINKS[real] = binary
            return binary
        sibling = os.path.join(os.path.dirname(real), "osemgrep")
        if os.path.realpath(sibling) == real and os.access(sibling, os.X_OK):
            _LINKS[real] = sibling  # a link semgrep (or codeshield) already made
            return sibling
        digest = hashlib.sha256(real.encode()).hexdigest()[:16]
        for parent in (cache_dir() / "bin" / digest, None):
            try:
                d = Path(parent) if parent is not None else Path(tempfile.mkdtemp(prefix="guardgate-osemgrep-"))
                if parent is None:
                    atexit.register(shutil.rmtree, str(d), True)
                d.mkdir(parents=True, exist_ok=True)
                link = str(d / "osemgrep")
                if os.path.realpath(link) != real:
                    tmp = f"{link}.{os.getpid()}.{threading.get_ident()}.tmp"
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(tmp)
                    os.symlink(real, tmp)
                    os.replace(tmp, link)  # atomic: a concurrent process sees the old or the new link
                _LINKS[real] = link
                return link
            except OSError as exc:
                LOG.debug("code_shield: no osemgrep link in %s: %s", parent or "a temp dir", exc)
        raise SemgrepError(f"cannot create an osemgrep link to {binary}")


class SemgrepError(RuntimeError):
    """semgrep failed or timed out; tier 2 produced no verdict."""


class SemgrepTimeout(SemgrepError):
    """semgrep did not answer in time (a slow batch, not a broken tier)."""


# `nosemgrep` / `nosem` comments make semgrep drop findings on that line: model output must not.
_NOSEM = re.compile(r"(?i)nosem")


@dataclass(frozen=True, slots=True)
class Hit:
    """One semgrep match: target index in the batch, rule, 1-based line and column, message."""

    target: int
    rule: SemgrepRule
    line: int
    col: int | None
    message: str = ""
    severity: str = ""


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(os.environ.get("GUARDGATE_CACHE_DIR") or os.path.join(base, "guardgate"))

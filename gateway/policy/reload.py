"""`PolicyStore`: the policies a server runs, by name, reloaded on SIGHUP and when a file changes.

A reload never leaves the server without a policy: a file that no longer loads is reported
(logged, and kept in `errors`) and the policy it defined keeps running. A policy replaced by a
reload closes its guards once the last request using it has finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import signal
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.guards.base import NO_RESOURCES, GuardResources
from gateway.policy.schema import Policy, PolicyError, load_policy
from gateway.policy.tokens import encoding
from gateway.yamlio import ConfigError

log = logging.getLogger("guardgate.policy")

SUFFIXES = (".yaml", ".yml")


@dataclass
class _File:
    path: Path
    digest: str = ""
    stat: tuple[int, int] = (0, 0)  # (mtime_ns, size)
    policy: Policy | None = None
    error: str | None = None


def _looks_like_path(name: str) -> bool:
    return name.endswith(SUFFIXES) or "/" in name or "\\" in name


class PolicyStore:
    """Policies loaded from files and directories (*.yaml, *.yml), selected by name.

    `required` names (or policy file paths) must load at construction, else `PolicyError`; other
    files in the directories that fail to load are logged and skipped. `builtins` are policies made
    in code (the `starter` policy): their names are reserved, a file defining one is rejected.
    """

    def __init__(self, *paths: str | Path, dirs: Iterable[str | Path] = (), required: Iterable[str] = (),
                 poll_interval: float = 2.0, builtins: Iterable[Policy] = ()) -> None:
        self.dirs = [Path(d) for d in dirs]
        self.explicit: list[Path] = []
        self.poll_interval = poll_interval
        self.errors: dict[str, str] = {}  # file → error of its last failed load
        self._files: dict[Path, _File] = {}
        self._by_name: dict[str, Policy] = {}
        self._aliases: dict[str, str] = {}  # path as given → policy name
        self._alias_keys: dict[str, Path] = {}  # path as given → resolved file key (no realpath per request)
        self._lock = asyncio.Lock()
        self._watcher: asyncio.Task[None] | None = None
        self._sighup = False
        self._started = False
        self.resources: GuardResources = NO_RESOURCES  # what guards get at start (set by `start`)
        self._builtins = list(builtins)
        self._dir_warned: set[Path] = set()
        for b in self._builtins:
            self._by_name[b.name] = b
        for p in paths:
            self._add_path(Path(p))
        required = list(required)
        self.required = required
        for name in required:
            if _looks_like_path(name) and name not in self._by_name:
                self._add_path(Path(name), alias=name)
        self._scan(initial=True, required=set(required))
        missing = [n for n in required if self._resolve(n) is None]
        if missing:
            known = ", ".join(sorted(self._by_name)) or "none"
            where = ", ".join(str(d) for d in self.dirs) or "the given files"
            msg = f"policy {', '.join(repr(m) for m in missing)} not found in {where} (known: {known})"
            if self.errors:
                msg += "; files that did not load:\n" + "\n".join(self.errors.values())
            raise PolicyError(msg)

    # ------------------------------------------------------------------ lookup

    def _add_path(self, p: Path, alias: str | None = None) -> None:
        if p.is_dir():
            self.dirs.append(p)
        else:
            self.explicit.append(p)
            if alias is not None:
                self._aliases[alias] = ""  # filled once loaded
            self._aliases.setdefault(str(p), "")

    def _resolve(self, name: str) -> Policy | None:
        p = self._by_name.get(name)
        if p is None and name in self._aliases:
            key = self._alias_keys.get(name)
            if key is None:
                key = self._alias_keys[name] = self._key(Path(name))
            f = self._files.get(key)
            if f is not None and f.policy is not None:
                p = self._by_name.get(f.policy.name)
        return p

    def get(self, name: str) -> Policy:
        p = self._resolve(name)
        if p is None:
            raise KeyError(f"no policy named {name!r} (known: {', '.join(sorted(self._by_name)) or 'none'})")
        return p

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._resolve(name) is not None

    def in_use(self) -> list[Policy]:
        """The policies the server runs: the required ones (every policy when none is required). The
        others in the directories are validated but never started: their models are not loaded."""
        if not self.required:
            return self.policies()
        found = (self._resolve(n) for n in self.required)
        return list({id(p): p for p in found if p is not None}.values())

    def names(self) -> list[str]:
        return sorted(self._by_name)

    def status(self) -> tuple[bool, dict[str, dict[str, dict[str, Any]]]]:
        """(ready, {policy: {step: state}}): not ready while some step's guard says it is failed."""
        report = {p.name: p.status() for p in self.policies()}
        ready = all(st.get("state") != "failed" for steps in report.values() for st in steps.values())
        return ready, report

    def policies(self) -> list[Policy]:
        return [self._by_name[n] for n in self.names()]

    # ------------------------------------------------------------------ loading

    @staticmethod
    def _key(p: Path) -> Path:
        try:
            return p.resolve()
        except OSError:
            return p.absolute()

    def _candidates(self) -> list[Path]:
        out: list[Path] = []
        for d in self.dirs:
            try:
                out += sorted(f for f in d.iterdir() if f.suffix in SUFFIXES and f.is_file())
            except OSError as e:
                if d not in self._dir_warned:  # once, not at every poll of the watcher
                    self._dir_warned.add(d)
                    log.warning("policy directory %s: %s", d, e.strerror)
        out += self.explicit
        return out

    def _scan(self, initial: bool = False,
              required: set[str] | None = None) -> list[tuple[_File, Policy | None]]:
        """Re-read changed files. Returns [(file, old policy)] for each file whose policy was replaced."""
        changed: list[tuple[_File, Policy | None]] = []
        fatal: list[str] = []
        seen: set[Path] = set()
        for path in self._candidates():
            key = self._key(path)
            if key in seen:
                continue
            seen.add(key)
            f = self._files.get(key) or _File(path)
            try:
                st = path.stat()
                raw = path.read_bytes()
            except OSError as e:
                msg = f"{path}: cannot read: {e.strerror}"
                if initial and path in self.explicit:
                    fatal.append(msg)
                elif f.policy is not None and f.error != msg:
                    log.error("%s; keeping policy %s", msg, f.policy.name)
                f.error = msg
                self.errors[str(path)] = msg
                self._files[key] = f
                continue
            f.stat = (st.st_mtime_ns, st.st_size)
            digest = hashlib.sha256(raw).hexdigest()
            if digest == f.digest:
                continue
            f.digest = digest
            try:
                new = load_policy(path)
                owner = self._by_name.get(new.name)
                if owner is not None and (owner in self._builtins or self._key(Path(owner.file or "")) != key):
                    raise PolicyError(f"duplicate policy name {new.name!r} (also defined in {owner.file})",
                                      str(path), None)
            except (PolicyError, ConfigError) as e:
                f.error = str(e)
                self.errors[str(path)] = str(e)
                self._files[key] = f
                if initial:
                    req = required or set()
                    name_hit = path.stem in req or str(path) in req or any(
                        self._key(Path(r)) == key for r in req if _looks_like_path(r))
                    if path in self.explicit or name_hit:
                        fatal.append(str(e))
                    else:
                        log.warning("policy file skipped: %s", e)
                elif f.policy is not None:
                    log.error("policy reload rejected, keeping the running policy %s: %s", f.policy.name, e)
                else:
                    log.error("policy file rejected: %s", e)
                continue
            self.errors.pop(str(path), None)
            f.error = None
            old = f.policy
            if old is not None and old.name != new.name:
                self._by_name.pop(old.name, None)
            f.policy = new
            self._files[key] = f
            self._by_name[new.name] = new
            for alias in self._aliases:
                if self._key(Path(alias)) == key:
                    self._aliases[alias] = new.name
            changed.append((f, old))
            if not initial:
                log.info("policy %s %s from %s", new.name, "reloaded" if old else "loaded", path)
        for key, f in self._files.items():
            if key not in seen and f.policy is not None and f.error is None:
                f.error = f"{f.path}: file removed"
                log.warning("policy file %s was removed; keeping policy %s until restart",
                            f.path, f.policy.name)
        if fatal:
            raise PolicyError("\n".join(fatal))
        return changed

    async def reload(self) -> list[str]:
        """Re-read every file that changed; start the new policies, retire the ones they replace.

        Returns the errors of files that were rejected (their previous policy keeps running).
        """
        async with self._lock:
            before = dict(self.errors)
            changed = self._scan()
            for f, old in changed:
                assert f.policy is not None
                if self._started and any(p is f.policy for p in self.in_use()):
                    await f.policy.start(self.resources)
                if old is not None:
                    old.retire()
            return [e for k, e in self.errors.items() if before.get(k) != e]

    def _stats_changed(self) -> bool:
        seen = set()
        for path in self._candidates():
            key = self._key(path)
            seen.add(key)
            f = self._files.get(key)
            try:
                st = path.stat()
            except OSError:
                if f is not None and f.error is None:
                    return True
                continue
            if f is None or f.stat != (st.st_mtime_ns, st.st_size):
                return True
        return any(k not in seen and f.error is None for k, f in self._files.items())

    # ------------------------------------------------------------------ lifecycle

    async def start(self, watch: bool = True, sighup: bool = True,
                    resources: GuardResources = NO_RESOURCES) -> None:
        """Start the guards of the policies in use with `resources` (also those of policies a reload
        brings); then watch the files (mtime polling) and listen for SIGHUP."""
        encoding()  # load the tokenizer now, not on the first guarded request
        self._started = True
        self.resources = resources
        for p in self.in_use():
            await p.start(resources)
        loop = asyncio.get_running_loop()
        if sighup and hasattr(signal, "SIGHUP"):
            try:
                loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
                self._sighup = True
            except (RuntimeError, ValueError, NotImplementedError):  # not the main thread, or no signals
                log.debug("SIGHUP reload not available in this thread")
        if watch and self.poll_interval > 0:
            self._watcher = asyncio.create_task(self._watch())

    def _on_sighup(self) -> None:
        log.info("SIGHUP: reloading policies")
        asyncio.get_running_loop().create_task(self.reload())

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            try:
                if self._stats_changed():
                    await self.reload()
            except Exception:
                log.exception("policy watcher")

    async def aclose(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None
        if self._sighup:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            self._sighup = False
        closed: set[int] = set()
        for b in self._builtins:
            closed.add(id(b))
            await b.aclose()
        for f in self._files.values():
            if f.policy is not None and id(f.policy) not in closed:
                closed.add(id(f.policy))
                await f.policy.aclose()

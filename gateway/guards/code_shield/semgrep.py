"""The semgrep client: CodeShield's tier 2, as a long-lived `osemgrep lsp` server or one process per batch.

Both engines run the multi-call `semgrep-core` binary as `osemgrep` (see `osemgrep_path`).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import signal
import tempfile
import threading
import weakref
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.guards.code_shield.rules import RuleSet, SemgrepRule

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


# A rule of ours and a target it must match: the self-test proving tier 2 finds what it should.
CANARY_RULE = SemgrepRule(
    id="guardgate-canary",
    language="python",
    cwe="",
    severity="info",
    description="guardgate self-test",
    raw={"id": "guardgate-canary", "languages": ["python"], "severity": "INFO", "message": "canary",
         "pattern": "guardgate_canary($X)"},
    prescan=None,
    key=-1,
)  # fmt: skip
CANARY_TARGET = ("guardgate_canary(1)\n", ".py")

_LIVE_SERVERS: weakref.WeakSet[_LspServer] = weakref.WeakSet()
_RECYCLE_AFTER = 20_000  # batches per server before a fresh one (its RSS creeps up: docs/performance.md)


def _current_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


@atexit.register
def _kill_servers() -> None:
    for srv in list(_LIVE_SERVERS):
        srv.kill()


class _LspServer:
    """`osemgrep lsp` with the whole rule set loaded: scanning a file costs milliseconds, not a
    process start (docs/performance.md, CodeShield). Files are written to a private workspace dir,
    announced (workspace/didCreateFiles), opened (textDocument/didOpen; the server answers with
    textDocument/publishDiagnostics), then closed and deleted. One batch at a time."""

    def __init__(self, binary: str, rules: Sequence[SemgrepRule], env: dict[str, str]) -> None:
        self.binary, self.rules, self.env = binary, list(rules), env
        self.by_id = {f"r{r.key}": r for r in self.rules}
        self.ws = tempfile.mkdtemp(prefix="guardgate-cs-lsp-")
        self.proc: asyncio.subprocess.Process | None = None
        self.dead: str | None = None
        self._reader: asyncio.Task[None] | None = None
        self._diags: dict[str, asyncio.Future[list[dict[str, Any]]]] = {}
        self._replies: dict[int, asyncio.Future[Any]] = {}
        self._ready = asyncio.Event()
        self._lock = asyncio.Lock()
        self._seq = 0
        self.scans = 0
        _LIVE_SERVERS.add(self)

    @property
    def usable(self) -> bool:
        """Alive, and not due for recycling (a busy server finishes its batch first)."""
        return self.dead is None and (self.scans < _RECYCLE_AFTER or self._lock.locked())

    async def start(self, timeout: float) -> None:
        with open(os.path.join(self.ws, "rules.json"), "w", encoding="utf-8") as f:
            json.dump({"rules": [dict(r.raw, id=rid) for rid, r in self.by_id.items()]}, f)
        try:
            self.proc = await asyncio.create_subprocess_exec(
                osemgrep_path(self.binary), "lsp", cwd=self.ws, env=self.env,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL,
            )  # fmt: skip
        except OSError as exc:
            raise SemgrepError(f"cannot start osemgrep lsp: {exc}") from None
        self._reader = asyncio.create_task(self._read())
        uri = Path(self.ws).as_uri()
        options = {
            "scan": {"configuration": [os.path.join(self.ws, "rules.json")], "exclude": [], "include": [],
                     "jobs": 1, "maxMemory": 0, "maxTargetBytes": 5_000_000, "onlyGitDirty": False,
                     "ci": False},
            "trace": {"server": "off"}, "metrics": {"enabled": False}, "doHover": False,
        }  # fmt: skip
        try:
            await asyncio.wait_for(
                self._request("initialize", {"processId": os.getpid(), "rootUri": uri, "capabilities": {},
                                             "workspaceFolders": [{"uri": uri, "name": "guardgate"}],
                                             "initializationOptions": options}),
                timeout,
            )  # fmt: skip
            self._notify("initialized", {})
            await asyncio.wait_for(self._ready.wait(), timeout)
        except TimeoutError:
            raise SemgrepError(f"osemgrep lsp did not load the rules within {timeout:g}s") from None
        if self.dead:
            raise SemgrepError(f"osemgrep lsp: {self.dead}")

    async def scan(self, targets: Sequence[tuple[str, str]], rules: Sequence[SemgrepRule], timeout: float) -> list[Hit]:
        wanted = {f"r{r.key}" for r in rules}
        async with self._lock:
            if self.dead or self.proc is None or self.proc.stdin is None:
                raise SemgrepError(f"semgrep server gone: {self.dead}")
            self.scans += 1
            loop = asyncio.get_running_loop()
            self._seq += 1
            paths = [os.path.join(self.ws, f"s{self._seq}_{i}{ext}") for i, (_, ext) in enumerate(targets)]
            uris = [Path(p).as_uri() for p in paths]
            futs = []
            try:
                for path, (code, _) in zip(paths, targets, strict=True):
                    with open(path, "w", encoding="utf-8") as f:
                        f.write(code)
                self._notify("workspace/didCreateFiles", {"files": [{"uri": u} for u in uris]})
                for uri, (code, ext) in zip(uris, targets, strict=True):
                    fut: asyncio.Future[list[dict[str, Any]]] = loop.create_future()
                    self._diags[uri] = fut
                    futs.append(fut)
                    doc = {"uri": uri, "languageId": ext.lstrip("."), "version": 1, "text": code}
                    self._notify("textDocument/didOpen", {"textDocument": doc})
                await self.proc.stdin.drain()
                try:
                    results = await asyncio.wait_for(asyncio.gather(*futs), timeout)
                except TimeoutError:
                    self.kill()  # a wedged server is replaced on the next batch
                    raise SemgrepTimeout(f"semgrep timed out after {timeout:g}s") from None
            finally:
                for uri in uris:
                    self._diags.pop(uri, None)
                if self.dead is None:
                    for uri in uris:
                        self._notify("textDocument/didClose", {"textDocument": {"uri": uri}})
                    self._notify("workspace/didDeleteFiles", {"files": [{"uri": u} for u in uris]})
                for path in paths:
                    with contextlib.suppress(OSError):
                        os.remove(path)
        hits: list[Hit] = []
        for i, diags in enumerate(results):
            for d in diags:
                rid = str(d.get("code", "")).rsplit(".", 1)[-1]
                if rid in wanted:
                    start = (d.get("range") or {}).get("start") or {}
                    hits.append(Hit(i, self.by_id[rid], int(start.get("line", 0)) + 1,
                                    int(start.get("character", 0)) + 1, str(d.get("message") or "")))  # fmt: skip
        return hits

    def kill(self) -> None:
        """Stop the server now (sync: also from atexit, or for a loop that is already closed)."""
        if self.dead is None:
            self.dead = "stopped"
        reader = self._reader
        if reader is not None and not reader.done():
            loop = reader.get_loop()
            if _current_loop() is loop:
                reader.cancel()  # the reader kills and reaps the process on its own loop
                return
            if loop.is_running():  # another thread's loop: let it clean up its transports too
                loop.call_soon_threadsafe(reader.cancel)
        self._finish()

    def _finish(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, OSError):
                os.kill(proc.pid, signal.SIGKILL)
        here = _current_loop()
        for fut in [*self._diags.values(), *self._replies.values()]:
            if not fut.done() and fut.get_loop() is here:
                fut.set_exception(SemgrepError(f"semgrep server {self.dead}"))
        if here is not None and self._reader is not None and self._reader.get_loop() is here:
            self._ready.set()
        shutil.rmtree(self.ws, ignore_errors=True)
        _LIVE_SERVERS.discard(self)

    # JSON-RPC over stdio ------------------------------------------------------

    def _send(self, msg: dict[str, Any]) -> None:
        if self.proc is None or self.proc.stdin is None or self.proc.stdin.is_closing():
            return
        body = json.dumps(msg).encode()
        self.proc.stdin.write(b"Content-Length: %d\r\n\r\n%b" % (len(body), body))

    def _notify(self, method: str, params: dict[str, Any]) -> None:
        self._send({"jsonrpc": "2.0", "method": method, "params": params})

    def _request(self, method: str, params: dict[str, Any]) -> asyncio.Future[Any]:
        self._seq += 1
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._replies[self._seq] = fut
        self._send({"jsonrpc": "2.0", "id": self._seq, "method": method, "params": params})
        return fut

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        out = self.proc.stdout
        try:
            while True:
                length = None
                while True:
                    line = await out.readline()
                    if not line:
                        raise EOFError
                    line = line.strip()
                    if not line:
                        break
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                if length is None:
                    continue
                msg = json.loads(await out.readexactly(length))
                method = msg.get("method")
                if method is not None and "id" in msg:  # a request from the server: acknowledge it
                    self._send({"jsonrpc": "2.0", "id": msg["id"], "result": None})
                elif method == "textDocument/publishDiagnostics":
                    params = msg.get("params") or {}
                    fut = self._diags.pop(str(params.get("uri")), None)
                    if fut is not None and not fut.done():
                        fut.set_result(list(params.get("diagnostics") or []))
                elif method == "semgrep/rulesRefreshed":
                    self._ready.set()
                elif method is None and msg.get("id") in self._replies:
                    fut = self._replies.pop(msg["id"])
                    if not fut.done():
                        fut.set_result(msg.get("result"))
        except (EOFError, asyncio.IncompleteReadError, ValueError, OSError) as exc:
            if self.dead is None:
                self.dead = f"exited ({type(exc).__name__})"
            self._finish()
        except asyncio.CancelledError:  # kill(), or the loop shutting down: reap on this loop
            self.dead = self.dead or "stopped"
            proc = self.proc
            if proc is not None and proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                with contextlib.suppress(BaseException):
                    await asyncio.wait_for(proc.wait(), 5)
            # close the pipes now, on a live loop: a transport left for the GC after its loop closed
            # would complain from __del__ (asyncio.subprocess.Process exposes no close())
            transport = getattr(proc, "_transport", None)
            if transport is not None:
                transport.close()
            self.proc = proc
            self._finish()
            raise


class SemgrepRunner:
    """Runs semgrep-core as `osemgrep` (what the `semgrep` wrapper itself does): a long-lived language
    server per event loop, or one `osemgrep scan` process per batch."""

    def __init__(self, binary: str, timeout_s: float = 10.0, concurrency: int = 2, mode: str = "server") -> None:
        self.binary = binary
        self.timeout_s = timeout_s
        self.concurrency = max(1, concurrency)
        self.mode = mode  # "server": one long-lived osemgrep lsp per event loop; "process": one per batch
        self.server_rules: list[SemgrepRule] = []  # what a server loads (every rule it may be asked for)
        self.server_error: str | None = None  # why the server could not start (then: process mode)
        self._sems: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
            weakref.WeakKeyDictionary()
        )
        self._servers: dict[asyncio.AbstractEventLoop, _LspServer] = {}
        self._start_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
            weakref.WeakKeyDictionary()
        )
        self.runs = 0  # tier-2 batches sent to semgrep
        self.processes = 0  # semgrep processes started (one per batch in process mode)
        self.failure: str | None = None  # why tier 2 does not work now (self-test or last batch); None: it does
        self.tested = False  # the self-test ran
        self.wrong_answers = False  # the self-test got an answer without the canary finding

    @property
    def engine(self) -> str:
        """What batches go to: "server" (this loop's osemgrep lsp) or "process" (one per batch)."""
        return "server" if self.mode == "server" and self.server_error is None else "process"

    def status(self) -> dict[str, Any]:
        """The tier's state for /readyz: ready or failed (and why), and the engine in use."""
        out: dict[str, Any] = {"state": "failed" if self.failure else "ready", "engine": self.engine}
        if self.failure:
            out["reason"] = self.failure
        if self.mode == "server" and self.server_error:
            out["server_error"] = self.server_error
        return out

    async def self_test(self) -> str | None:
        """Scan a canary that a rule of ours must match, on the engine batches use (starting the
        server). Returns why tier 2 does not work (None: it does), which `failure` keeps until a
        batch succeeds: a semgrep that starts but answers nothing useful is caught here, at start-up,
        not on the first insecure block."""
        self.tested = True
        try:
            hits, _ = await self._scan([CANARY_TARGET], [CANARY_RULE])
        except SemgrepError as exc:
            self.failure = f"self-test failed: {exc}"
            return self.failure
        if not any(h.rule.key == CANARY_RULE.key for h in hits):
            self.wrong_answers = True  # answers without errors, but wrong: later batches cannot clear it
            self.failure = "self-test failed: semgrep ran but did not report the canary finding"
        return self.failure

    @staticmethod
    def locate(explicit: str | None = None) -> str | None:
        """Path of semgrep-core: explicit, else the `semgrep` package's bin/, else PATH."""
        if explicit:
            return explicit if os.access(explicit, os.X_OK) else None
        try:
            spec = importlib.util.find_spec("semgrep")  # does not import the package
        except (ImportError, ValueError):
            spec = None
        for loc in (spec.submodule_search_locations or []) if spec else []:
            cand = Path(loc) / "bin" / "semgrep-core"
            if cand.is_file() and os.access(cand, os.X_OK):
                return str(cand)
        return shutil.which("semgrep-core")

    @staticmethod
    def _env() -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            SEMGREP_ENABLE_VERSION_CHECK="0",
            SEMGREP_SEND_METRICS="off",
            NO_COLOR="1",
        )
        return env

    def version(self) -> str | None:
        import subprocess

        try:
            out = subprocess.run(
                [self.binary, "-version"], capture_output=True, text=True, timeout=30, check=False
            ).stdout
        except (OSError, subprocess.SubprocessError):
            return None
        m = re.search(r"(\d+\.\d+\.\d+)", out)
        return m.group(1) if m else None

    def prefilter_formulas(self, rules: Sequence[SemgrepRule]) -> dict[int, Any]:
        """Semgrep's own prefilter formula for each rule (blocking; once per process, then cached).

        `-prefilter_of_rules` prints nothing at all when one rule of the file trips it (Java's
        ssrf_insecure_patterns does in 1.185), so rules are dumped per language and a group that
        fails is bisected; a rule that fails alone gets no prefilter (Meta's prescan gate applies).
        """
        groups: dict[str, list[SemgrepRule]] = {}
        for r in rules:
            groups.setdefault(r.language, []).append(r)
        out: dict[int, Any] = {}
        with ThreadPoolExecutor(max_workers=2) as pool:
            for part in pool.map(self._formulas_bisect, groups.values()):
                out.update(part)
        return out

    def _formulas_bisect(self, rules: list[SemgrepRule]) -> dict[int, Any]:
        got = self._formulas_once(rules)
        if got is not None:
            return got
        if len(rules) == 1:
            return {rules[0].key: None}
        mid = len(rules) // 2
        return self._formulas_bisect(rules[:mid]) | self._formulas_bisect(rules[mid:])

    def _formulas_once(self, rules: list[SemgrepRule]) -> dict[int, Any] | None:
        import subprocess

        tmp = tempfile.mkdtemp(prefix="guardgate-cs-")
        try:
            cfg = os.path.join(tmp, "rules.json")
            with open(cfg, "w", encoding="utf-8") as f:
                json.dump({"rules": [dict(r.raw, id=f"r{r.key}") for r in rules]}, f)
            proc = subprocess.run(
                [self.binary, "-prefilter_of_rules", cfg],
                capture_output=True,
                text=True,
                timeout=60,
                cwd=tmp,
                env=self._env(),
                check=False,
            )
            data = json.loads(proc.stdout)
        except (OSError, ValueError, subprocess.SubprocessError):
            return None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        out: dict[int, Any] = {}
        for entry in data if isinstance(data, list) else []:
            rid = str(entry.get("rule_id", ""))
            if rid.startswith("r") and rid[1:].isdigit():
                out[int(rid[1:])] = entry.get("filter")
        return out if len(out) == len(rules) else None

    def _semaphore(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        sem = self._sems.get(loop)
        if sem is None:
            sem = self._sems[loop] = asyncio.Semaphore(self.concurrency)
        return sem

    async def scan(self, targets: Sequence[tuple[str, str]], rules: Sequence[SemgrepRule]) -> tuple[list[Hit], int]:
        """Scan `targets` ((code, extension) pairs) with `rules`: one semgrep request for the batch.

        Returns ([Hit], number of semgrep errors reported) or raises SemgrepError. In "server"
        mode the batch goes to this event loop's long-lived `osemgrep lsp` (started on first use,
        restarted after a timeout); if that server cannot start, every batch falls back to one
        `osemgrep scan` process. `nosemgrep` markers in model output are neutralised first: the
        model must not be able to switch the scanner off.
        """
        targets = [(_NOSEM.sub(lambda m: "n0" + m.group(0)[2:], code), ext) for code, ext in targets]
        self.runs += 1
        return await self._scan(targets, rules)

    async def _scan(self, targets: Sequence[tuple[str, str]], rules: Sequence[SemgrepRule]) -> tuple[list[Hit], int]:
        """One batch on the engine in use; a failure other than a timeout marks the tier failed."""
        try:
            server = await self.warm()
            if server is not None:
                result = await server.scan(targets, rules, self.timeout_s), 0
            else:
                result = await self._scan_process(targets, rules)
        except SemgrepTimeout:
            raise
        except SemgrepError as exc:
            self.failure = str(exc)
            raise
        if not self.wrong_answers:
            self.failure = None
        return result

    async def warm(self) -> _LspServer | None:
        """This loop's semgrep server, started if needed; None in process mode or if it cannot start."""
        if self.mode != "server" or self.server_error is not None:
            return None
        try:
            return await self._server()
        except SemgrepError as exc:
            self.server_error = str(exc)
            LOG.warning("code_shield: semgrep server unavailable (%s); one process per batch instead", exc)
            return None

    async def _scan_process(
        self, targets: Sequence[tuple[str, str]], rules: Sequence[SemgrepRule]
    ) -> tuple[list[Hit], int]:
        by_id = {f"r{r.key}": r for r in rules}
        async with self._semaphore():
            tmp = tempfile.mkdtemp(prefix="guardgate-cs-")
            proc: asyncio.subprocess.Process | None = None
            try:
                names = []
                for i, (code, ext) in enumerate(targets):
                    name = f"b{i}{ext}"
                    with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                        f.write(code)
                    names.append(name)
                with open(os.path.join(tmp, "rules.json"), "w", encoding="utf-8") as f:
                    json.dump({"rules": [dict(r.raw, id=rid) for rid, r in by_id.items()]}, f)
                argv = [
                    osemgrep_path(self.binary), "scan", "--experimental", "--optimizations", "all", "--metrics", "off",
                    "--quiet", "--json", "--disable-version-check", "--jobs", "1",
                    "--timeout", str(max(1, int(self.timeout_s))), "--config", "rules.json", *names,
                ]  # fmt: skip
                self.processes += 1
                proc = await asyncio.create_subprocess_exec(
                    *argv,
                    cwd=tmp,
                    env=self._env(),
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                )
                try:
                    stdout, stderr = await asyncio.wait_for(proc.communicate(), self.timeout_s)
                except TimeoutError:
                    raise SemgrepTimeout(f"semgrep timed out after {self.timeout_s:g}s") from None
                try:
                    data = json.loads(stdout.decode("utf-8", "replace"))
                except ValueError:
                    tail = stderr.decode("utf-8", "replace").strip()[-300:]
                    raise SemgrepError(f"semgrep exited {proc.returncode} without JSON: {tail}") from None
            finally:
                if proc is not None and proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    with contextlib.suppress(Exception):
                        await asyncio.shield(proc.wait())
                shutil.rmtree(tmp, ignore_errors=True)
        index = {name: i for i, name in enumerate(names)}
        found: list[Hit] = []
        for res in data.get("results", []):
            path = os.path.basename(str(res.get("path", "")))
            rid = str(res.get("check_id", "")).rsplit(".", 1)[-1]
            if path in index and rid in by_id:
                start = res.get("start") or {}
                extra = res.get("extra") or {}
                found.append(
                    Hit(index[path], by_id[rid], int(start.get("line") or 1), start.get("col"),
                        str(extra.get("message") or ""), str(extra.get("severity") or ""))
                )  # fmt: skip
        errors = [e for e in data.get("errors", []) if str(e.get("level", "")).lower() == "error"]
        return found, len(errors)

    # long-lived server -----------------------------------------------------

    async def _server(self) -> _LspServer:
        loop = asyncio.get_running_loop()
        for other, srv in list(self._servers.items()):
            if other is not loop and other.is_closed():  # a finished test's or worker's loop
                srv.kill()
                del self._servers[other]
        srv = self._servers.get(loop)
        if srv is not None and srv.usable:
            return srv
        lock = self._start_locks.setdefault(loop, asyncio.Lock())
        async with lock:
            srv = self._servers.get(loop)
            if srv is not None and srv.usable:
                return srv
            if srv is not None:
                srv.kill()
            srv = _LspServer(self.binary, [*self.server_rules, CANARY_RULE], self._env())
            self.processes += 1
            try:
                await srv.start(max(15.0, self.timeout_s))
            except BaseException:
                srv.kill()
                raise
            self._servers[loop] = srv
            return srv

    async def aclose(self) -> None:
        """Stop every semgrep server this runner started (and wait for this loop's to exit)."""
        servers = list(self._servers.values())
        self._servers.clear()
        for srv in servers:
            srv.kill()
        loop = asyncio.get_running_loop()
        for srv in servers:
            reader = srv._reader
            if reader is not None and reader.get_loop() is loop:
                with contextlib.suppress(BaseException):
                    await reader


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(os.environ.get("GUARDGATE_CACHE_DIR") or os.path.join(base, "guardgate"))


def cached_prefilter_formulas(runner: SemgrepRunner, rules: RuleSet) -> dict[int, Any]:
    """Prefilter formulas, from the on-disk cache (keyed by the semgrep binary + rule text) or semgrep."""
    all_rules = rules.all_semgrep_rules
    st = os.stat(runner.binary)
    ident = [os.path.realpath(runner.binary), st.st_size, st.st_mtime_ns, [r.raw for r in all_rules]]
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir() / f"codeshield-prefilters-{digest}.json"
    try:
        with open(path, encoding="utf-8") as f:
            cached = json.load(f)
        return {int(k): v for k, v in cached.items()}
    except (OSError, ValueError):
        pass
    formulas = runner.prefilter_formulas(all_rules)
    if len(formulas) == len(all_rules):
        try:  # best effort: an unwritable cache only costs start-up time
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({str(k): v for k, v in formulas.items()}), encoding="utf-8")
            os.replace(tmp, path)
        except OSError:
            pass
    return formulas

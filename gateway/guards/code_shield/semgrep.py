"""The semgrep client: CodeShield's tier 2, as a long-lived `osemgrep lsp` server (`lsp.py`) or one
process per batch.

Both engines run the multi-call `semgrep-core` binary as `osemgrep` (`osemgrep.py`: the link, the
errors and hits they share).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import weakref
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from gateway.guards.code_shield.lsp import _LspServer
from gateway.guards.code_shield.osemgrep import _NOSEM, Hit, SemgrepError, SemgrepTimeout, cache_dir, osemgrep_path
from gateway.guards.code_shield.rules import RuleSet, SemgrepRule

LOG = logging.getLogger("gateway.guards.code_shield")


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

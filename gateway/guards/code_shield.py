"""CodeShield on fenced code blocks, as they stream: Meta's rule set, our driver.

Rules come from the installed `codeshield` package's data files (``rules/config.yaml``,
``rules/regex/*.yaml``, ``rules/semgrep/_generated_/<lang>_<usecase>.json``), read without
importing ``codeshield.cs``: importing it needs a semgrep binary and creates an ``osemgrep`` symlink
inside site-packages (fails on a read-only install). What the driver does differently from
``CodeShield.scan_code`` (reference/guards.md §3):

- Tier 1, regex: every enabled pattern compiled once at start-up and run in-process on each block,
  in the block's own language (C++ and Objective-C also get C's rules, every language the
  language-agnostic secret rules), with Meta's comment filter. A rule reports its first match that
  is not on a comment line (Meta's driver gives up if its first match is commented out).
- Tier 2, semgrep: run by us, without ``--project-root /`` (which makes semgrep >= 1.101 scan
  nothing), one request per batch of blocks (all blocks that closed in one check, any languages),
  its own timeout, files only in a private temp dir that is always removed. By default the batch
  goes to a long-lived ``osemgrep lsp`` (one per event loop, all rules loaded once: milliseconds
  per batch instead of a 0.1-0.4 s start of the 260 MB binary); ``semgrep_mode: process`` (and the
  automatic fallback when the server cannot start) runs one ``osemgrep scan`` per batch. A rule is
  sent to semgrep only if it can match: semgrep's own prefilter for that rule (computed once with
  ``semgrep-core -prefilter_of_rules``, a necessary condition) matches the block, or, for rules
  without one, one of the language's ``prescan_regex``es matches (Meta's gate). Tier 2 is also
  skipped when it cannot change the outcome: the block is already flagged by tier 1 and no
  candidate rule's severity maps to a stronger action (``exhaustive: true`` runs it anyway, for
  complete findings; Meta's driver skips semgrep on any regex hit).
- Severities are normalised (error / warning / advice / info; semgrep's upper-case strings too:
  Meta's driver compares ``"ERROR"`` with ``"error"`` and never blocks on a semgrep finding) and
  mapped to actions by ``severity_actions``.
- If semgrep is not installed tier 2 is reported as not run in ``Verdict.details["tier2"]``, never as
  a pass; a semgrep crash or timeout on a block that needed it is a guard error (``on_error``).
  ``nosemgrep`` comments in the scanned code are neutralised (a model could otherwise write them).

The stream check keeps a `FenceTracker`: each check feeds the new text, scans the blocks that
closed (and the unterminated one on the final check) and, with ``hold_code_blocks``, asks the gate
to hold text from the start of the open block (``Verdict.hold_from``) so prose flows and code is
released only after it was scanned. Text that is JSON (tool-call arguments) is also scanned value by
value: string values under code-like keys, or that contain fences or look like code.
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
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from gateway.guards.base import Guard, GuardConfigError, GuardInput, StreamCheck, register
from gateway.guards.code_fences import CodeBlock, FenceTracker, detect_language, normalize_language
from gateway.types import Message, Verdict

__all__ = [
    "CodeShieldGuard",
    "CodeShieldOptions",
    "CodeShieldStream",
    "Finding",
    "RuleSet",
    "ScanItem",
    "ScanResult",
    "SemgrepRunner",
    "find_rules_dir",
]

LOG = logging.getLogger(__name__)

ACTIONS = ("block", "redact", "warn", "log", "ignore")
_ACTION_RANK = {a: i for i, a in enumerate(reversed(ACTIONS))}  # ignore=0 ... block=4
SEVERITIES = ("error", "warning", "advice", "info")
# Meta's intent (its driver only reaches "block" for regex errors): error -> block, the rest -> warn.
DEFAULT_SEVERITY_ACTIONS = {"error": "block", "warning": "warn", "advice": "warn", "info": "warn"}
_SEVERITY_RANK = {"error": 3, "warning": 2, "advice": 1, "info": 0}
_SEMGREP_SEVERITY = {"ERROR": "error", "WARNING": "warning", "INFO": "info", "INVENTORY": "info"}

# CodeShield's supported languages: what `scan_code(language=None)` iterates over.
SUPPORTED_LANGUAGES = ("c", "cpp", "csharp", "java", "javascript", "php", "python", "rust")
# Languages with semgrep in CodeShield's analyzer map (PHP has rules but Meta does not run them).
DEFAULT_SEMGREP_LANGUAGES = ("c", "cpp", "csharp", "java", "javascript", "python")
_EXTENSIONS = {
    "c": ".c",
    "cpp": ".cpp",
    "csharp": ".cs",
    "java": ".java",
    "javascript": ".js",
    "typescript": ".ts",
    "php": ".php",
    "python": ".py",
}
AGNOSTIC = "language_agnostic"


def _words(s: str) -> frozenset[str]:
    return frozenset(s.split())


# Option keys the policy layer may pass along with a step; accepted and not ours to validate.
_GENERIC_KEYS = _words(
    "guard action notice on_error timeout timeout_ms timeout_s mode name id description stage stages enabled model"
)
# JSON keys whose string values are code (tool-call arguments of code-running / file-editing tools).
_CODE_KEYS = _words(
    "code source source_code sourcecode script program snippet patch diff function body query sql "
    "python javascript js command cmd shell bash commands file_content file_contents new_content "
    "new_str old_str contents text_to_insert replacement"
)
_SHELL_KEYS = frozenset({"command", "cmd", "shell", "bash", "commands"})


# --------------------------------------------------------------------------- rules


def find_rules_dir() -> Path | None:
    """The installed `codeshield` package's rules directory, located without importing it."""
    try:
        spec = importlib.util.find_spec("codeshield")
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    for loc in spec.submodule_search_locations or []:
        cand = Path(loc) / "insecure_code_detector" / "rules"
        if (cand / "config.yaml").is_file():
            return cand
    return None


@dataclass(frozen=True, slots=True)
class RegexRule:
    id: str
    source: str  # the rule file's language (c, cpp, language_agnostic, ...)
    cwe: str
    severity: str
    description: str
    pattern: re.Pattern[str]


@dataclass(slots=True)
class SemgrepRule:
    id: str
    language: str  # the _generated_ file's language
    cwe: str
    severity: str
    description: str
    raw: dict[str, Any]
    prescan: re.Pattern[str] | None  # Meta's metadata.prescan_regex
    prefilter: Callable[[str], bool] | None = None  # semgrep's own necessary condition
    key: int = 0  # unique index in the rule set


@dataclass(slots=True)
class RuleSet:
    """CodeShield's rules for one usecase, compiled once."""

    usecase: str
    rules_dir: Path
    regex_by_file: dict[str, list[RegexRule]]
    semgrep_by_lang: dict[str, list[SemgrepRule]]
    skipped: list[str] = field(default_factory=list)  # rules that did not compile
    prefilters_loaded: bool = False
    _regex_cache: dict[str, tuple[RegexRule, ...]] = field(default_factory=dict)

    @classmethod
    def load(cls, rules_dir: Path | str | None = None, usecase: str = "codeshield") -> RuleSet:
        root = Path(rules_dir) if rules_dir else find_rules_dir()
        if root is None or not (root / "config.yaml").is_file():
            raise GuardConfigError(
                "CodeShield rules not found: install the `codeshield` package "
                "(pip install 'guardgate[codeshield]') or set rules_dir"
            )
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        with open(root / "config.yaml", encoding="utf-8") as f:
            config = (yaml.load(f, Loader=loader) or {}).get("config", {})
        if usecase not in config:
            raise GuardConfigError(f"unknown CodeShield usecase {usecase!r} (known: {', '.join(config)})")
        enabled_cfg: dict[str, Any] = config[usecase] or {}
        skipped: list[str] = []

        def enabled(lang: str, analyzer: str) -> set[str]:
            entry = (enabled_cfg.get(lang) or {}).get(analyzer) or {}
            return set(entry.get("rules") or [])

        regex_by_file: dict[str, list[RegexRule]] = {}
        for path in sorted((root / "regex").glob("*.yaml")):
            lang = path.stem
            on = enabled(lang, "regex")
            with open(path, encoding="utf-8") as f:
                entries = yaml.load(f, Loader=loader) or []
            rules: list[RegexRule] = []
            for e in entries:
                pid = e.get("pattern_id")
                if pid is not None and pid not in on:  # Meta: rules without an id are always on
                    continue
                try:
                    pat = re.compile(e["rule"])
                except re.error as exc:
                    skipped.append(f"{lang}/{pid}: {exc}")
                    continue
                rules.append(
                    RegexRule(
                        id=pid or e["rule"],
                        source=lang,
                        cwe=str(e.get("cwe_id", "")),
                        severity=_norm_severity(e.get("severity", "warning")),
                        description=str(e.get("description", "")).strip(),
                        pattern=pat,
                    )
                )
            regex_by_file[lang] = rules

        semgrep_by_lang: dict[str, list[SemgrepRule]] = {}
        shared: dict[str, SemgrepRule] = {}  # C and C++ ship the same rules: share the objects
        key = 0
        for path in sorted((root / "semgrep" / "_generated_").glob(f"*_{usecase}.json")):
            lang = path.name[: -len(f"_{usecase}.json")]
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            out: list[SemgrepRule] = []
            for r in data.get("rules", []):
                ident = json.dumps(r, sort_keys=True)
                if ident in shared:
                    out.append(shared[ident])
                    continue
                meta = r.get("metadata") or {}
                prescan = None
                if meta.get("prescan_regex"):
                    try:
                        prescan = re.compile(meta["prescan_regex"])
                    except re.error as exc:
                        skipped.append(f"semgrep {lang}/{r.get('id')} prescan: {exc}")
                rule = SemgrepRule(
                    id=str(r.get("id")),
                    language=lang,
                    cwe=str(meta.get("cwe_id") or ""),
                    severity=_norm_severity(str(r.get("severity", "WARNING"))),
                    description=str(r.get("message", "")).strip(),
                    raw=r,
                    prescan=prescan,
                    key=key,
                )
                key += 1
                shared[ident] = rule
                out.append(rule)
            semgrep_by_lang[lang] = out
        return cls(usecase, root, regex_by_file, semgrep_by_lang, skipped)

    @property
    def all_semgrep_rules(self) -> list[SemgrepRule]:
        seen: dict[int, SemgrepRule] = {}
        for rules in self.semgrep_by_lang.values():
            for r in rules:
                seen.setdefault(r.key, r)
        return list(seen.values())

    def regex_for(self, language: str) -> tuple[RegexRule, ...]:
        """The regex rules CodeShield runs for `language` (same composition as Meta's `load`)."""
        hit = self._regex_cache.get(language)
        if hit is None:
            seen: dict[tuple[str, str], RegexRule] = {}
            for r in self._chain(language):
                seen.setdefault((r.source, r.id), r)
            hit = self._regex_cache[language] = tuple(seen.values())
        return hit

    def _chain(self, language: str) -> list[RegexRule]:
        own = list(self.regex_by_file.get(language, ())) if language != AGNOSTIC else []
        if language in ("cpp", "objective_c"):
            return own + self._chain("c")
        if language == "objective_cpp":
            return own + self._chain("objective_c") + self._chain("cpp")
        return own + list(self.regex_by_file.get(AGNOSTIC, ()))

    def has_language(self, language: str) -> bool:
        return language in self.regex_by_file and language != AGNOSTIC


def _norm_severity(s: str) -> str:
    s = s.strip()
    if s in _SEMGREP_SEVERITY:
        return _SEMGREP_SEVERITY[s]
    s = s.lower()
    return s if s in _SEVERITY_RANK else "warning"


# --------------------------------------------------------------------------- semgrep prefilters


def _compile_prefilter(node: Any) -> Callable[[str], bool] | None:
    """Turn a `semgrep-core -prefilter_of_rules` formula into a predicate (None = no filter).

    Conservative on purpose: identifier sets are treated as "any of them occurs as a substring",
    regexes are compiled with re.MULTILINE, and anything we cannot read lets the rule through.
    """
    if node == "None" or node is None:
        return None
    try:
        if isinstance(node, list) and node and node[0] == "Some":
            return _formula(node[1])
    except Exception:  # an unreadable formula must never drop a rule
        return None
    return None


def _formula(f: Any) -> Callable[[str], bool]:
    kind = f[0]
    if kind == "And":
        parts = [_formula(x) for x in f[1]]
        return lambda s: all(p(s) for p in parts)
    if kind == "Or":
        parts = [_formula(x) for x in f[1]]
        return lambda s: any(p(s) for p in parts)
    if kind == "Pred":
        pred = f[1]
        if pred[0] == "Idents":
            idents = [str(x) for x in pred[1]]
            return lambda s: any(i in s for i in idents)
        if pred[0] == "Regexp":
            try:
                rx = re.compile(pred[1], re.M)
            except re.error:
                return lambda s: True
            return lambda s: rx.search(s) is not None
    return lambda s: True


# --------------------------------------------------------------------------- semgrep runner


class SemgrepError(RuntimeError):
    """semgrep failed or timed out; tier 2 produced no verdict."""


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


_LIVE_SERVERS: weakref.WeakSet[_LspServer] = weakref.WeakSet()
_RECYCLE_AFTER = 20_000  # batches per server before a fresh one (its RSS creeps up ~4 KB a batch)


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
    process start (~0.1-0.4 s, a 260 MB binary). Files are written to a private workspace dir,
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
                "osemgrep", "lsp", executable=self.binary, cwd=self.ws, env=self.env,
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
                    raise SemgrepError(f"semgrep timed out after {timeout:g}s") from None
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
        server = await self.warm()
        if server is not None:
            return await server.scan(targets, rules, self.timeout_s), 0
        return await self._scan_process(targets, rules)

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
                    "osemgrep", "scan", "--experimental", "--optimizations", "all", "--metrics", "off",
                    "--quiet", "--json", "--disable-version-check", "--jobs", "1",
                    "--timeout", str(max(1, int(self.timeout_s))), "--config", "rules.json", *names,
                ]  # fmt: skip
                self.processes += 1
                proc = await asyncio.create_subprocess_exec(
                    *argv,
                    executable=self.binary,
                    cwd=tmp,
                    env=self._env(),
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                )
                try:
                    stdout, stderr = await asyncio.wait_for(proc.communicate(), self.timeout_s)
                except TimeoutError:
                    raise SemgrepError(f"semgrep timed out after {self.timeout_s:g}s") from None
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
            srv = _LspServer(self.binary, self.server_rules, self._env())
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


# --------------------------------------------------------------------------- findings


@dataclass(slots=True)
class Finding:
    rule: str
    cwe: str
    severity: str
    line: int  # 1-based line within the scanned code
    description: str
    analyzer: Literal["regex", "semgrep"]
    language: str  # the rule set that matched (python, c, language_agnostic, ...)
    action: str = "warn"
    offset: int | None = None  # char offset of that line in the whole text, when known
    column: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "rule": self.rule,
            "cwe": self.cwe,
            "severity": self.severity,
            "line": self.line,
            "analyzer": self.analyzer,
            "language": self.language,
            "action": self.action,
            "description": self.description,
        }
        if self.offset is not None:
            d["offset"] = self.offset
        if self.column is not None:
            d["column"] = self.column
        return d


Tier2Status = Literal["ran", "not_needed", "skipped", "not_run", "off", "error"]


@dataclass(slots=True)
class ScanResult:
    """What the scanner found in one piece of code."""

    language: str | None
    scanned_as: list[str]
    findings: list[Finding] = field(default_factory=list)
    tier2: Tier2Status = "not_needed"
    tier2_reason: str = ""
    latency_ms: float = 0.0

    @property
    def action(self) -> str:
        best = "ignore"
        for f in self.findings:
            if _ACTION_RANK[f.action] > _ACTION_RANK[best]:
                best = f.action
        return best

    @property
    def flagged(self) -> bool:
        return self.action != "ignore"

    @property
    def recommended_treatment(self) -> str:
        """Meta's treatment, computed as Meta meant it: block on any error-severity finding."""
        if not self.findings:
            return "ignore"
        return "block" if any(f.severity == "error" for f in self.findings) else "warn"


@dataclass(slots=True)
class ScanItem:
    """One piece of code to scan, located in the guarded text."""

    span: tuple[int, int]
    code: str
    language: str | None
    language_source: str
    label: str
    line_offsets: list[int] | None = None
    block_index: int | None = None

    @classmethod
    def from_block(cls, b: CodeBlock) -> ScanItem:
        return cls(
            span=b.span,
            code=b.code,
            language=b.language,
            language_source=b.language_source,
            label=f"code block {b.index + 1}" + (f" ({b.info.split()[0]})" if b.info else ""),
            line_offsets=list(b.line_offsets),
            block_index=b.index,
        )


# --------------------------------------------------------------------------- options


@dataclass(slots=True)
class CodeShieldOptions:
    """Policy-step options of the `code_shield` guard (see the module docstring)."""

    hold_code_blocks: bool = True
    severity_actions: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_SEVERITY_ACTIONS))
    severity_actions_set: bool = False  # the step configured severity_actions: details["action"] applies
    usecase: str = "codeshield"
    semgrep: Literal["auto", "required", "off"] = "auto"
    semgrep_timeout_s: float = 4.0  # below the policy step timeout (default 5 s): ours reports first
    semgrep_path: str | None = None
    semgrep_concurrency: int = 2
    semgrep_mode: Literal["server", "process"] = "server"
    semgrep_languages: tuple[str, ...] = DEFAULT_SEMGREP_LANGUAGES
    exhaustive: bool = False  # run tier 2 even when it cannot change the verdict (complete findings)
    detect_language: bool = True
    unknown_language: Literal["all", "agnostic"] = "all"
    tool_arguments: bool = True
    roles: tuple[str, ...] = ("tool",)
    rules_dir: str | None = None
    max_inline_chars: int = 65_536  # larger blocks run the regex tier in a worker thread

    @classmethod
    def parse(cls, options: dict[str, Any]) -> CodeShieldOptions:
        o = cls()
        known = (set(cls.__dataclass_fields__) - {"severity_actions_set"}) | {"semgrep_timeout_ms"}
        unknown = sorted(k for k in options if k not in known and k not in _GENERIC_KEYS)
        if unknown:
            raise GuardConfigError(
                f"code_shield: unknown option(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})"
            )
        for key in ("hold_code_blocks", "exhaustive", "detect_language", "tool_arguments"):
            if key in options:
                v = options[key]
                if not isinstance(v, bool):
                    raise GuardConfigError(f"code_shield: {key} must be true or false, got {v!r}")
                setattr(o, key, v)
        sa = options.get("severity_actions")
        if sa is not None:
            if not isinstance(sa, dict):
                raise GuardConfigError("code_shield: severity_actions must be a mapping severity -> action")
            for sev, act in sa.items():
                sv = str(sev).lower()
                if sv not in SEVERITIES:
                    known_sev = ", ".join(SEVERITIES)
                    raise GuardConfigError(f"code_shield: unknown severity {sev!r} in severity_actions ({known_sev})")
                o.severity_actions[sv] = _check_action(act, f"severity_actions.{sv}")
            o.severity_actions_set = True
        if "usecase" in options:
            o.usecase = str(options["usecase"])
        sg = options.get("semgrep", "auto")
        if sg is True:
            sg = "auto"
        elif sg is False:
            sg = "off"
        if sg not in ("auto", "required", "off"):
            raise GuardConfigError(f"code_shield: semgrep must be auto, required or off, got {sg!r}")
        o.semgrep = sg
        if "semgrep_timeout_s" in options or "semgrep_timeout_ms" in options:
            t = options.get("semgrep_timeout_s")
            t = float(t) if t is not None else float(options["semgrep_timeout_ms"]) / 1000.0
            if not t > 0:
                raise GuardConfigError("code_shield: semgrep_timeout_s must be > 0")
            o.semgrep_timeout_s = t
        if options.get("semgrep_path"):
            o.semgrep_path = str(options["semgrep_path"])
        mode = options.get("semgrep_mode", "server")
        if mode not in ("server", "process"):
            raise GuardConfigError(f"code_shield: semgrep_mode must be server or process, got {mode!r}")
        o.semgrep_mode = mode
        if "semgrep_concurrency" in options:
            o.semgrep_concurrency = max(1, int(options["semgrep_concurrency"]))
        if "semgrep_languages" in options:
            langs = tuple(normalize_language(str(x)) or str(x) for x in options["semgrep_languages"] or ())
            o.semgrep_languages = langs
        ul = options.get("unknown_language", "all")
        if ul not in ("all", "agnostic"):
            raise GuardConfigError(f"code_shield: unknown_language must be all or agnostic, got {ul!r}")
        o.unknown_language = ul
        if "roles" in options:
            o.roles = tuple(str(r) for r in options["roles"] or ())
        if options.get("rules_dir"):
            o.rules_dir = str(options["rules_dir"])
        if "max_inline_chars" in options:
            o.max_inline_chars = int(options["max_inline_chars"])
        return o


def _check_action(v: Any, where: str) -> str:
    s = str(v).lower()
    if s not in ACTIONS:
        raise GuardConfigError(f"code_shield: {where} must be one of {', '.join(ACTIONS)}, got {v!r}")
    return s


# --------------------------------------------------------------------------- the scanner


class CodeScanner:
    """Tier 1 in-process, tier 2 batched through one semgrep process."""

    def __init__(self, rules: RuleSet, opts: CodeShieldOptions, semgrep: SemgrepRunner | None,
                 semgrep_reason: str = "") -> None:  # fmt: skip
        self.rules = rules
        self.opts = opts
        self.semgrep = semgrep
        self.semgrep_reason = semgrep_reason
        self._gate_cache: dict[str, tuple[list[SemgrepRule], list[re.Pattern[str]]]] = {}

    # languages -------------------------------------------------------------

    def scan_languages(self, language: str | None) -> list[str]:
        """Rule sets to apply to code of `language` (canonical name, or None when unknown)."""
        if language is None:
            if self.opts.unknown_language == "all":
                return list(SUPPORTED_LANGUAGES)
            return [AGNOSTIC]
        if language == "typescript":
            return ["javascript"]
        if self.rules.has_language(language):
            return [language]
        return [AGNOSTIC]

    # tier 1 ----------------------------------------------------------------

    def regex_findings(self, code: str, languages: Iterable[str]) -> list[Finding]:
        out: list[Finding] = []
        seen: set[tuple[str, str]] = set()
        acts = self.opts.severity_actions
        for lang in languages:
            for rule in self.rules.regex_for(lang):
                if (rule.source, rule.id) in seen:
                    continue
                for m in rule.pattern.finditer(code):
                    pos = m.start()
                    ls = code.rfind("\n", 0, pos) + 1
                    if ls < pos and _is_comment_or_directive(code[ls:pos]):
                        continue  # Meta drops matches on comment lines
                    seen.add((rule.source, rule.id))
                    out.append(
                        Finding(
                            rule=rule.id,
                            cwe=rule.cwe,
                            severity=rule.severity,
                            line=code.count("\n", 0, pos) + 1,
                            description=rule.description,
                            analyzer="regex",
                            language=rule.source,
                            action=acts.get(rule.severity, "warn"),
                            column=pos - ls + 1,
                        )
                    )
                    break
        return out

    # tier 2 gate -----------------------------------------------------------

    def tier2_rules(self, code: str, language: str) -> list[SemgrepRule]:
        """Semgrep rules of `language` that can match `code` (empty: semgrep would find nothing new).

        A rule with a semgrep prefilter is kept iff the prefilter matches (exact necessary
        condition); a rule without one iff Meta's language-level prescan gate opens.
        """
        if language not in self.opts.semgrep_languages:
            return []
        rules = self.rules.semgrep_by_lang.get(language)
        if not rules:
            return []
        gate_open: bool | None = None
        out: list[SemgrepRule] = []
        for r in rules:
            if r.prefilter is not None:
                if r.prefilter(code):
                    out.append(r)
                continue
            if gate_open is None:
                prescans = [x.prescan for x in rules if x.prescan is not None]
                gate_open = not prescans or any(p.search(code) for p in prescans)
            if gate_open:
                out.append(r)
        return out

    def _may_escalate(self, res: ScanResult, wanted: list[tuple[str, list[SemgrepRule]]]) -> bool:
        """Whether a candidate semgrep rule could raise an already flagged block's action.

        Without `severity_actions` the policy step's own action applies to any flagged block, so
        nothing tier 2 finds can change what happens to it.
        """
        if not self.opts.severity_actions_set:
            return False
        acts = self.opts.severity_actions
        best = max(_ACTION_RANK[acts.get(r.severity, "warn")] for _, rules in wanted for r in rules)
        return best > _ACTION_RANK[res.action]

    # scanning --------------------------------------------------------------

    async def scan_items(self, items: Sequence[ScanItem]) -> list[ScanResult]:
        """Scan several pieces of code; every one that needs semgrep shares one process."""
        t0 = time.perf_counter()
        results: list[ScanResult] = []
        pending: list[tuple[int, str, str, list[SemgrepRule]]] = []  # (item, code, ext lang, rules)
        for i, item in enumerate(items):
            langs = self.scan_languages(item.language)
            if len(item.code) > self.opts.max_inline_chars:
                found = await asyncio.to_thread(self.regex_findings, item.code, langs)
            else:
                found = self.regex_findings(item.code, langs)
            res = ScanResult(language=item.language, scanned_as=langs, findings=found)
            results.append(res)
            if self.opts.semgrep == "off":
                res.tier2, res.tier2_reason = "off", "semgrep disabled by policy"
                continue
            wanted = [(lang, self.tier2_rules(item.code, lang)) for lang in langs]
            wanted = [(lang, rules) for lang, rules in wanted if rules]
            if not wanted:
                continue  # not_needed
            if res.flagged and not self.opts.exhaustive and not self._may_escalate(res, wanted):
                res.tier2, res.tier2_reason = "skipped", "tier 1 already decided"
                continue
            if self.semgrep is None:
                res.tier2, res.tier2_reason = "not_run", self.semgrep_reason or "semgrep not available"
                continue
            for lang, rules in wanted:
                ext = ".ts" if item.language == "typescript" else _EXTENSIONS.get(lang, ".txt")
                pending.append((i, item.code, ext, rules))
        if pending and self.semgrep is not None:
            await self._run_tier2(results, pending)
        dt = (time.perf_counter() - t0) * 1000.0
        for item, res in zip(items, results, strict=True):
            res.latency_ms = dt
            offs = item.line_offsets
            if offs:
                for f in res.findings:
                    if 1 <= f.line <= len(offs):
                        f.offset = offs[f.line - 1] + (f.column - 1 if f.column else 0)
        return results

    async def _run_tier2(
        self,
        results: list[ScanResult],
        pending: list[tuple[int, str, str, list[SemgrepRule]]],
    ) -> None:
        assert self.semgrep is not None
        union: dict[int, SemgrepRule] = {}
        for _, _, _, rules in pending:
            for r in rules:
                union.setdefault(r.key, r)
        targets = [(code, ext) for _, code, ext, _ in pending]
        try:
            found, n_errors = await self.semgrep.scan(targets, list(union.values()))
        except SemgrepError as exc:
            for i, *_ in pending:
                results[i].tier2, results[i].tier2_reason = "error", str(exc)
            return
        allowed = [{r.key for r in rules} for _, _, _, rules in pending]
        acts = self.opts.severity_actions
        for hit in found:
            rule = hit.rule
            if rule.key not in allowed[hit.target]:
                continue  # the batch shares one config; keep only what this target's gate allowed
            res = results[pending[hit.target][0]]
            sev = _norm_severity(hit.severity) if hit.severity else rule.severity
            if any(f.analyzer == "semgrep" and f.rule == rule.id and f.line == hit.line for f in res.findings):
                continue
            res.findings.append(
                Finding(
                    rule=rule.id,
                    cwe=rule.cwe,
                    severity=sev,
                    line=hit.line,
                    description=(hit.message or rule.description).strip(),
                    analyzer="semgrep",
                    language=rule.language,
                    action=acts.get(sev, "warn"),
                    column=hit.col,
                )
            )
        for i, *_ in pending:
            results[i].tier2 = "ran"
            if n_errors:
                results[i].tier2_reason = f"semgrep reported {n_errors} error(s)"


def _is_comment_or_directive(prefix: str) -> bool:
    s = prefix.strip()
    return s.startswith(("#", "//", "/*")) or s.endswith("*/")


# --------------------------------------------------------------------------- JSON (tool arguments)


_JSON_START = re.compile(r"\s*(?:\{\s*[\"}]|\[\s*[{\"\]\d-])")


class _JsonStrings:
    """Incrementally finds complete string tokens in streamed JSON text, with their keys."""

    def __init__(self) -> None:
        self.pos = 0
        self.last_key: str | None = None
        self.open_at: int | None = None  # offset of an incomplete string token

    def advance(self, text: str, final: bool) -> list[tuple[int, int, str, str | None]]:
        """Return [(start, end, decoded value, key)] for string values completed so far."""
        out: list[tuple[int, int, str, str | None]] = []
        n = len(text)
        i = self.pos
        self.open_at = None
        while True:
            q = text.find('"', i)
            if q < 0:
                self.pos = n
                return out
            j = q + 1
            while True:
                k = text.find('"', j)
                if k < 0:
                    self.open_at = q
                    self.pos = q
                    return out
                b = k - 1
                while b > q and text[b] == "\\":
                    b -= 1
                if (k - 1 - b) % 2 == 0:
                    break  # an even run of backslashes: the quote is real
                j = k + 1
            end = k + 1
            m = end
            while m < n and text[m] in " \t\r\n":
                m += 1
            if m >= n and not final:
                self.open_at = q  # cannot tell key from value yet
                self.pos = q
                return out
            try:
                value = json.loads(text[q:end])
            except ValueError:
                value = None
            if m < n and text[m] == ":":
                self.last_key = value if isinstance(value, str) else None
            elif isinstance(value, str):
                out.append((q, end, value, self.last_key))
            i = end


def _tool_language(tool: str | None) -> str | None:
    """A language hint from a tool's name (run_python, execute_javascript, bash, ...)."""
    t = (tool or "").lower()
    for word, lang in (("python", "python"), ("javascript", "javascript"), ("node", "javascript"),
                       ("typescript", "typescript"), ("php", "php"), ("java", "java"), ("bash", "shell"),
                       ("shell", "shell"), ("terminal", "shell")):  # fmt: skip
        if word in t:
            return lang
    return None


def _json_items(
    value: str, key: str | None, span: tuple[int, int], detect: bool, tool: str | None = None
) -> list[ScanItem]:
    """Code to scan inside one JSON string value (tool-call arguments, JSON answers)."""
    k = (key or "").lower()
    where = f"{'tool call ' + repr(tool) + ' ' if tool else ''}argument {key!r}"
    if "```" in value or "~~~" in value:
        tracker = FenceTracker(detect=detect)
        tracker.feed(value)
        tracker.finish()
        if tracker.blocks:
            return [
                ScanItem(span, b.code, b.language, b.language_source, f"fenced code in {where}") for b in tracker.blocks
            ]
    named = normalize_language(k) if k else None
    if named in SUPPORTED_LANGUAGES or named == "typescript":
        return [ScanItem(span, value, named, "key", where)]
    hint = _tool_language(tool) if k in _CODE_KEYS else None
    if hint and hint != "shell":
        return [ScanItem(span, value, hint, "tool", where)]
    guess = detect_language(value) if detect and ("\n" in value or len(value) > 40) else None
    if guess:
        return [ScanItem(span, value, guess, "detected", where)]
    if k in _CODE_KEYS:
        lang = "shell" if (k in _SHELL_KEYS or hint == "shell") else None
        return [ScanItem(span, value, lang, "key" if lang else "none", where)]
    return []


# --------------------------------------------------------------------------- document tracking

# The separator the stream gate puts before each tool call's arguments in the guarded text.
_TOOL_HEADER = re.compile(r"\[tool_call(?: ([^\]\n]*))?\] ?")


@dataclass(slots=True)
class _JsonSegment:
    base: int  # offset of the segment in the whole text
    tool: str | None
    scanner: _JsonStrings = field(default_factory=lambda: _JsonStrings())
    end: int | None = None  # set when the next tool call starts
    done: bool = False


class _Document:
    """Everything scannable in one growing text: fenced blocks, plus JSON string values of
    tool-call arguments (after the gate's ``[tool_call name]`` separators, or a text that is JSON)."""

    def __init__(self, detect: bool, tool_arguments: bool) -> None:
        self.tracker = FenceTracker(detect=detect)
        self.detect = detect
        self.tool_arguments = tool_arguments
        self.segments: list[_JsonSegment] = []
        self._decided = not tool_arguments  # whether the text as a whole is JSON is settled
        self._hdr_pos = 0

    def advance(self, text: str, final: bool) -> list[ScanItem]:
        items: list[ScanItem] = []
        fed = self.tracker.fed
        if len(text) > fed:
            items += [ScanItem.from_block(b) for b in self.tracker.feed(text[fed:])]
        if final:
            items += [ScanItem.from_block(b) for b in self.tracker.finish()]
        if not self.tool_arguments:
            return items
        if not self._decided:
            stripped = text.lstrip()
            if stripped:
                if stripped[0] not in "{[":
                    self._decided = True
                elif _JSON_START.match(text):
                    self.segments.append(_JsonSegment(0, None))
                    self._decided = True
                elif final or stripped[1:].strip():
                    self._decided = True  # "[link](...)" and friends: not JSON
        at = text.find("[tool_call", self._hdr_pos)
        if at >= 0:
            for m in _TOOL_HEADER.finditer(text, at):
                if self.segments and self.segments[-1].end is None:
                    self.segments[-1].end = m.start()
                self.segments.append(_JsonSegment(m.end(), m.group(1)))
                self._hdr_pos = m.end()
        self._hdr_pos = max(self._hdr_pos, len(text) - 200)  # a header may still be arriving
        for seg in self.segments:
            if seg.done:
                continue
            end = len(text) if seg.end is None else seg.end
            seg_final = final or seg.end is not None
            for a, b, value, key in seg.scanner.advance(text[seg.base : end], seg_final):
                items += _json_items(value, key, (seg.base + a, seg.base + b), self.detect, seg.tool)
            seg.done = seg_final
        return items

    def hold_from(self) -> int | None:
        held = [self.tracker.pending_fence_start()]
        held += [s.base + s.scanner.open_at for s in self.segments if not s.done and s.scanner.open_at is not None]
        cands = [h for h in held if h is not None]
        return min(cands) if cands else None


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(os.environ.get("GUARDGATE_CACHE_DIR") or os.path.join(base, "guardgate"))


def _prefilter_formulas(runner: SemgrepRunner, rules: RuleSet) -> dict[int, Any]:
    """Prefilter formulas, from the on-disk cache (keyed by the semgrep binary + rule text) or semgrep."""
    all_rules = rules.all_semgrep_rules
    st = os.stat(runner.binary)
    ident = [os.path.realpath(runner.binary), st.st_size, st.st_mtime_ns, [r.raw for r in all_rules]]
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    path = _cache_dir() / f"codeshield-prefilters-{digest}.json"
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


_SHARED_LOCK = threading.Lock()
_SHARED: dict[tuple[str | None, str, str | None], RuleSet] = {}


def _shared_rules(rules_dir: str | None, usecase: str, runner: SemgrepRunner | None) -> RuleSet:
    """Rules compiled once per process (per rules dir, usecase and semgrep binary), prefilters included."""
    key = (rules_dir, usecase, runner.binary if runner else None)
    with _SHARED_LOCK:
        hit = _SHARED.get(key)
        if hit is not None:
            return hit
        rules = RuleSet.load(rules_dir, usecase)
        if runner is not None:
            try:
                formulas = _prefilter_formulas(runner, rules)
                for r in rules.all_semgrep_rules:
                    r.prefilter = _compile_prefilter(formulas.get(r.key))
                rules.prefilters_loaded = True
            except Exception as exc:  # fall back to Meta's prescan gate for every rule
                LOG.warning("code_shield: semgrep prefilters unavailable (%s); using prescans", exc)
        _SHARED[key] = rules
        return rules


# --------------------------------------------------------------------------- the guard


@register("code_shield")
class CodeShieldGuard(Guard):
    """Meta's CodeShield rules on the code in answers (fenced blocks) and tool-call arguments."""

    name = "code_shield"
    stages = frozenset({"input", "stream", "output"})

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.opts = CodeShieldOptions.parse(options)
        self._scanner: CodeScanner | None = None
        self._lock = threading.Lock()
        self.startup_ms: float = 0.0

    # lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        """Load and compile the rules, locate semgrep, read its prefilters (once per process) and
        start this loop's semgrep server, so no request pays for it."""
        if self._scanner is None:
            await asyncio.to_thread(self._load)
        assert self._scanner is not None
        sg = self._scanner.semgrep
        if sg is not None:
            await sg.warm()

    def _load(self) -> CodeScanner:
        with self._lock:
            if self._scanner is not None:
                return self._scanner
            t0 = time.perf_counter()
            runner: SemgrepRunner | None = None
            reason = ""
            binary = None
            if self.opts.semgrep != "off":
                binary = SemgrepRunner.locate(self.opts.semgrep_path)
                if binary is None:
                    reason = "semgrep not installed (pip install semgrep) or semgrep-core not on PATH"
                    if self.opts.semgrep == "required":
                        raise GuardConfigError(f"code_shield: semgrep: required, but {reason}")
                else:
                    runner = SemgrepRunner(
                        binary, self.opts.semgrep_timeout_s, self.opts.semgrep_concurrency, self.opts.semgrep_mode
                    )
            rules = _shared_rules(self.opts.rules_dir, self.opts.usecase, runner)
            if runner is not None:
                langs = set(self.opts.semgrep_languages)
                runner.server_rules = [r for r in rules.all_semgrep_rules if r.language in langs or (
                    r.language == "c" and "cpp" in langs)]  # fmt: skip
            self._scanner = CodeScanner(rules, self.opts, runner, reason)
            self.startup_ms = (time.perf_counter() - t0) * 1000.0
            return self._scanner

    async def aclose(self) -> None:
        """Stop the semgrep servers this guard started."""
        if self._scanner is not None and self._scanner.semgrep is not None:
            await self._scanner.semgrep.aclose()

    async def scanner(self) -> CodeScanner:
        """The scanner, loading the rules on first use (the semgrep server then starts lazily)."""
        if self._scanner is None:
            await asyncio.to_thread(self._load)
        assert self._scanner is not None
        return self._scanner

    def describe(self) -> dict[str, Any]:
        """Rule counts and tier-2 availability (for `guardgate models`/health output)."""
        s = self._scanner
        if s is None:
            return {"loaded": False}
        return {
            "loaded": True,
            "usecase": s.rules.usecase,
            "rules_dir": str(s.rules.rules_dir),
            "regex_rules": {k: len(v) for k, v in s.rules.regex_by_file.items() if v},
            "semgrep_rules": {k: len(v) for k, v in s.rules.semgrep_by_lang.items()},
            "semgrep": s.semgrep.binary if s.semgrep else None,
            "semgrep_version": s.semgrep.version() if s.semgrep else None,
            "semgrep_reason": s.semgrep_reason,
            "semgrep_mode": (s.semgrep.mode if s.semgrep.server_error is None else "process") if s.semgrep else None,
            "semgrep_server_error": s.semgrep.server_error if s.semgrep else None,
            "prefilters": s.rules.prefilters_loaded,
            "skipped_rules": list(s.rules.skipped),
            "startup_ms": round(self.startup_ms, 1),
        }

    # one-shot checks ---------------------------------------------------------

    async def check(self, inp: GuardInput) -> Verdict:
        t0 = time.perf_counter()
        if inp.stage == "input":
            items: list[ScanItem] = []
            for i, m in enumerate(inp.messages):
                if m.role not in self.opts.roles:
                    continue
                for text in [m.text, *(c.arguments for c in m.tool_calls)]:
                    for it in _Document(self.opts.detect_language, self.opts.tool_arguments).advance(text, True):
                        it.label = f"message {i} {it.label}"
                        items.append(it)
            return await self._judge(t0, items, hold_from=None)
        doc = _Document(self.opts.detect_language, self.opts.tool_arguments)
        items = doc.advance(inp.text, final=inp.final)
        hold = doc.hold_from() if (self.opts.hold_code_blocks and not inp.final) else None
        return await self._judge(t0, items, hold_from=hold)

    async def scan_text(self, text: str) -> Verdict:
        """Scan a complete answer (or tool-call arguments): every fenced block, one semgrep batch."""
        return await self.check(GuardInput(stage="output", messages=[], text=text))

    async def scan_code(self, code: str, language: str | None = None) -> ScanResult:
        """Scan one snippet in `language` (canonical name or alias; None = detect, else all)."""
        lang = normalize_language(language) if language else None
        src = "info" if lang else "none"
        if lang is None and self.opts.detect_language:
            lang = detect_language(code)
            src = "detected" if lang else "none"
        item = ScanItem((0, len(code)), code, lang, src, "snippet")
        scanner = await self.scanner()
        return (await scanner.scan_items([item]))[0]

    def open_stream(self, messages: list[Message], request_id: str) -> CodeShieldStream:
        return CodeShieldStream(self, messages, request_id)

    # verdicts ----------------------------------------------------------------

    async def _judge(self, t0: float, items: list[ScanItem], hold_from: int | None) -> Verdict:
        if not items:
            return self.verdict(t0, hold_from=hold_from, details={"blocks_scanned": 0})
        scanner = await self.scanner()
        results = await scanner.scan_items(items)
        return self._verdict(t0, items, results, hold_from)

    def _verdict(self, t0: float, items: list[ScanItem], results: list[ScanResult], hold_from: int | None) -> Verdict:
        blocks = []
        flagged: list[tuple[ScanItem, ScanResult]] = []
        for item, res in zip(items, results, strict=True):
            blocks.append(
                {
                    "span": list(item.span),
                    "label": item.label,
                    "language": item.language,
                    "language_source": item.language_source,
                    "scanned_as": res.scanned_as,
                    "findings": len(res.findings),
                    "action": res.action,
                    "tier2": res.tier2,
                    **({"tier2_reason": res.tier2_reason} if res.tier2_reason else {}),
                }
            )
            if res.flagged:
                flagged.append((item, res))
        tier2 = _merge_tier2(results)
        details: dict[str, Any] = {"blocks_scanned": len(items), "blocks": blocks, "tier2": tier2}
        errors = [r.tier2_reason for r in results if r.tier2 == "error" and not r.flagged]
        not_run = [r for r in results if r.tier2 == "not_run" and not r.flagged]
        if not_run:
            details["tier2_not_run"] = not_run[0].tier2_reason
        if not flagged:
            error = errors[0] if errors else None
            if error is None and not_run and self.opts.semgrep == "required":
                error = f"semgrep tier not run: {not_run[0].tier2_reason}"
            return self.verdict(
                t0,
                flagged=False,
                score=0.0,
                hold_from=hold_from,
                details=details,
                error=f"code_shield tier 2 failed: {error}" if error else None,
            )
        findings: list[dict[str, Any]] = []
        for item, res in flagged:
            for f in res.findings:
                d = f.to_dict()
                d["span"] = list(item.span)
                d["block"] = item.label
                findings.append(d)
        findings.sort(
            key=lambda d: (
                -_ACTION_RANK[d["action"]],
                -_SEVERITY_RANK.get(d["severity"], 0),
                d["span"][0],
                d["line"],
            )
        )
        top = findings[0]
        first_item, first_res = min(flagged, key=lambda p: p[0].span[0])
        action = max((r.action for _, r in flagged), key=lambda a: _ACTION_RANK[a])
        cwes = sorted({f["cwe"] for f in findings if f["cwe"]})
        if self.opts.severity_actions_set:
            details["action"] = action  # the step asked the severity mapping to decide the action
        details.update(
            recommended_action=action,
            rule=top["rule"],
            cwe=top["cwe"],
            line=top["line"],
            severity=top["severity"],
            language=top["language"],
            analyzer=top["analyzer"],
            findings=findings,
            spans=[list(i.span) for i, _ in flagged],
            recommended_treatment=max(
                (r.recommended_treatment for _, r in flagged),
                key=lambda t: {"ignore": 0, "warn": 1, "block": 2}[t],
            ),
            notice=_notice(first_res),
            annotation=[f"{d['block']}: {d['rule']} {d['cwe']} line {d['line']} ({d['severity']})" for d in findings],
        )
        if errors:
            details["tier2_error"] = errors[0]
        reason = (
            f"insecure code in {first_item.label}: {top['cwe'] or top['rule']} {top['rule']} "
            f"({top['language']} line {top['line']}, {top['severity']})"
        )
        return self.verdict(
            t0,
            flagged=True,
            score=1.0,
            categories=cwes,
            reason=reason,
            span=first_item.span,
            hold_from=hold_from,
            details=details,
        )


def _merge_tier2(results: Sequence[ScanResult]) -> str:
    order = ("error", "not_run", "ran", "skipped", "off", "not_needed")
    states = {r.tier2 for r in results}
    for s in order:
        if s in states:
            return s
    return "not_needed"


def _notice(res: ScanResult) -> str:
    cwes = sorted({f.cwe for f in res.findings if f.cwe}) or ["insecure code"]
    rules = sorted({f.rule for f in res.findings})
    return f"[code removed by Guardgate CodeShield: {', '.join(cwes)} ({', '.join(rules)})]"


class CodeShieldStream(StreamCheck):
    """Per-stream state: a fence tracker fed with each new window."""

    guard: CodeShieldGuard

    def __init__(self, guard: CodeShieldGuard, messages: list[Message], request_id: str) -> None:
        super().__init__(guard, messages, request_id)
        self.doc = _Document(guard.opts.detect_language, guard.opts.tool_arguments)
        self.checks = 0

    async def check(self, text: str, window_start: int, final: bool) -> Verdict:
        """Feed `text[fed:]`; scan blocks that closed (and the open one when final).

        `text` is the whole answer so far and must only grow; offsets in the verdict (span,
        hold_from, finding offsets) index into it.
        """
        t0 = time.perf_counter()
        self.checks += 1
        g = self.guard
        items = self.doc.advance(text, final)
        hold = self.doc.hold_from() if (g.opts.hold_code_blocks and not final) else None
        if not items:
            return Verdict(guard=g.name, score=0.0, hold_from=hold, latency_ms=(time.perf_counter() - t0) * 1000.0)
        return await g._judge(t0, items, hold)

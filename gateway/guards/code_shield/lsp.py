"""`osemgrep lsp` as a long-lived server: CodeShield's tier 2 with the rule set loaded once."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import logging
import os
import shutil
import signal
import tempfile
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gateway.guards.code_shield.osemgrep import Hit, SemgrepError, SemgrepTimeout, osemgrep_path
from gateway.guards.code_shield.rules import SemgrepRule

LOG = logging.getLogger("gateway.guards.code_shield")
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

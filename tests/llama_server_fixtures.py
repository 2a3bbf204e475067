"""A real llama.cpp server (`llama-server`) on loopback, for Llama Guard's `remote` backend with
`api: llama_cpp`: found through GUARDGATE_LLAMA_SERVER, .peers/llama-server/bin/llama-server
(scripts/build_llama_server.sh, also run by scripts/install_peers.sh) or PATH. Used by
tests/test_llama_server_remote.py and bench/bench_guard_engine.py (part R)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MISSING = (
    "no llama-server binary: run `bash scripts/build_llama_server.sh` (installs "
    ".peers/llama-server/bin/llama-server), or set GUARDGATE_LLAMA_SERVER, or put llama-server on PATH"
)


def find_llama_server() -> str | None:
    """The llama-server binary to test against, or None."""
    env = os.environ.get("GUARDGATE_LLAMA_SERVER")
    if env:
        return env if os.access(env, os.X_OK) else None
    peer = ROOT / ".peers" / "llama-server" / "bin" / "llama-server"
    if os.access(peer, os.X_OK):
        return str(peer)
    return shutil.which("llama-server")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LlamaServer:
    """`llama-server -m model --parallel N` on 127.0.0.1 and a free port; `stop()` kills it."""

    def __init__(
        self,
        binary: str,
        model: Path,
        *,
        parallel: int = 2,
        ctx: int = 8192,
        threads: int = 2,
        extra: tuple[str, ...] = (),
    ) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = tempfile.NamedTemporaryFile(prefix="gg-llama-server-", suffix=".log", delete=False)  # noqa: SIM115
        self.args = [
            binary,
            "-m",
            str(model),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--parallel",
            str(parallel),
            "--ctx-size",
            str(ctx),
            "--threads",
            str(threads),
            "--threads-batch",
            str(threads),
            *extra,
        ]
        self.proc = subprocess.Popen(self.args, stdout=self._log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return Path(self._log.name).read_text(errors="replace")[-4000:]

    def wait_ready(self, timeout: float = 120.0) -> LlamaServer:
        from waits import wait_ready

        wait_ready(self.url, self.proc, timeout, self.log, path="/health")
        return self

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()
        Path(self._log.name).unlink(missing_ok=True)

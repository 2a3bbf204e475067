"""The supervisor of `guardgate serve --workers N`: N worker processes on one port, one guard engine.

The supervisor binds the port once with SO_REUSEPORT (so port 0 resolves to one port for all) and
never listens on it; every worker is a `guardgate serve` of its own that binds the same address
with SO_REUSEPORT and listens, and the kernel spreads new connections over the listening workers.
Each worker reads the same config and policy files, watches them, and reloads on SIGHUP (which the
supervisor forwards to all). When a policy the workers run has model guards (Prompt Guard, Llama
Guard), the supervisor first starts the machine's guard engine (`guardgate guards serve` on a Unix
socket) and hands its address to the workers ($GUARDGATE_GUARD_ENGINE), so each model is loaded
once and every worker's checks are batched together there; an engine given from outside (the same
variable already set) is used as it is.

A worker or engine that exits is logged and started again (after a short back-off when it keeps
dying at start). SIGTERM / SIGINT: every worker gets SIGTERM and drains its in-flight streams
within `shutdown_grace_s` (the aiohttp runner's shutdown), stragglers are killed after that, then
the engine stops. Linux only: elsewhere SO_REUSEPORT does not balance connections, so --workers > 1
is refused there (run one process per port behind a load balancer).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.config import GatewayConfig
from gateway.guard_engine.protocol import ENGINE_ENV
from gateway.workers.metrics import MULTIPROC_ENV, WORKER_ENV, mark_dead

log = logging.getLogger("guardgate.workers")

MODEL_GUARDS = ("prompt_guard", "llama_guard")
RESTART_BACKOFF_MAX_S = 5.0
ENGINE_START_TIMEOUT_S = 60.0


def resolve_workers(value: str) -> int:
    """`auto` (the cores this process may use) or a positive integer."""
    if value == "auto":
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # not Linux
            return os.cpu_count() or 1
    n = int(value)
    if n < 1:
        raise ValueError("--workers must be >= 1 or auto")
    return n


def refusal(cfg: GatewayConfig, workers: int) -> str | None:
    """Why this config cannot run with `workers` processes (None: it can)."""
    if workers <= 1:
        return None
    if not sys.platform.startswith("linux") or not hasattr(socket, "SO_REUSEPORT"):
        return (
            f"--workers {workers} needs Linux (SO_REUSEPORT balancing); run one process per port "
            "behind a load balancer instead"
        )
    limits_on = any(k.rates.any for k in cfg.keys) or any(r.rates.any for r in cfg.routes)
    if limits_on and cfg.limits.store == "memory":
        return (
            f"rate limits with limits.store: memory would be counted per worker ({workers} workers admit "
            f"up to {workers}x each limit); set limits: {{store: redis, url: redis://...}} or use --workers 1"
        )
    return None


def needs_engine(store: Any) -> bool:
    """Does a policy the workers run have a model guard that would use the machine's shared engine?"""
    if store is None:
        return False
    shared = os.environ.get(ENGINE_ENV)
    for policy in store.in_use():
        for step in policy.steps:
            if step.guard_name in MODEL_GUARDS and getattr(step.guard, "engine_url", None) == shared:
                return True
    return False


def engine_socket(rundir: Path) -> Path:
    return rundir / "engine.sock"


def plan_engine(load_store: Any) -> tuple[Path, bool]:
    """(run directory, start an engine?): the policies are loaded with $GUARDGATE_GUARD_ENGINE set to
    the engine this supervisor would start, and it is started when a model guard would use it. An
    engine already named in the environment (one per machine, or a remote one) is used as it is."""
    rundir = Path(tempfile.mkdtemp(prefix="guardgate-"))
    if os.environ.get(ENGINE_ENV):
        load_store()  # validate only
        return rundir, False
    os.environ[ENGINE_ENV] = f"unix:{engine_socket(rundir)}"
    try:
        start = needs_engine(load_store())
    except BaseException:
        del os.environ[ENGINE_ENV]
        shutil.rmtree(rundir, ignore_errors=True)
        raise
    if not start:
        del os.environ[ENGINE_ENV]
    return rundir, start


def reserve_port(host: str, port: int) -> socket.socket:
    """Bind (never listen) with SO_REUSEPORT: holds the port, and port 0 becomes one real port for all."""
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    s = socket.socket(family, kind, proto)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(addr)
    return s


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM if the supervisor dies (Linux prctl PR_SET_PDEATHSIG)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


@dataclass
class _Child:
    name: str
    argv: list[str]
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    quick_deaths: int = 0
    restart_at: float = 0.0
    restarts: int = field(default=0)

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv, env=self.env, preexec_fn=_die_with_parent)
        self.started = time.monotonic()

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else -1


class Supervisor:
    """Runs the workers (and the engine) until SIGTERM / SIGINT; returns the exit status."""

    def __init__(self, worker_args: list[str], cfg: GatewayConfig, workers: int, rundir: Path, engine: bool) -> None:
        """`engine`: start the machine's guard engine at `engine_socket(rundir)` (see `plan_engine`)."""
        self.cfg = cfg
        self.n = workers
        self.rundir = rundir
        self.engine_url = os.environ.get(ENGINE_ENV) or None
        self.sock = reserve_port(cfg.host, cfg.port)
        self.port = self.sock.getsockname()[1]
        metrics_dir = os.environ.get(MULTIPROC_ENV) or str(self.rundir / "metrics")
        Path(metrics_dir).mkdir(parents=True, exist_ok=True)
        for f in Path(metrics_dir).glob("*.db"):  # counters of an earlier run
            f.unlink()
        base_env = {**os.environ, MULTIPROC_ENV: metrics_dir, "GUARDGATE_WORKERS": str(workers)}
        if self.engine_url:
            base_env[ENGINE_ENV] = self.engine_url
        self.engine: _Child | None = None
        if engine:
            sock = str(engine_socket(rundir))
            self.engine = _Child(
                "guard engine",
                [sys.executable, "-m", "gateway.cli", "guards", "serve", "--socket", sock],
                dict(base_env),
            )
        argv = [sys.executable, "-m", "gateway.cli", "serve", *worker_args, "--workers", "1", "--port", str(self.port)]
        self.workers = [_Child(f"worker {i}", argv, {**base_env, WORKER_ENV: str(i)}) for i in range(workers)]
        self._stop = False
        self._hup = False

    # ---- signals

    def _on_stop(self, signum: int, frame: Any) -> None:
        self._stop = True

    def _on_hup(self, signum: int, frame: Any) -> None:
        self._hup = True

    # ---- running

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_hup)
        try:
            if self.engine is not None:
                self.engine.start()
                self._wait_engine()
            for w in self.workers:
                w.start()
            where = f"http://{self.cfg.host}:{self.port}"
            engine = (
                f"; guard engine {self.engine_url} (pid {self.engine.pid})"
                if self.engine
                else (f"; guard engine {self.engine_url}" if self.engine_url else "")
            )
            print(
                f"guardgate: {self.n} workers on {where} (SO_REUSEPORT; pids "
                f"{', '.join(str(w.pid) for w in self.workers)}; supervisor pid {os.getpid()}{engine})",
                file=sys.stderr,
                flush=True,
            )
            while not self._stop:
                if self._hup:
                    self._hup = False
                    log.info("SIGHUP: forwarding to %d workers", self.n)
                    for w in self.workers:
                        self._signal(w, signal.SIGHUP)
                if self.engine is not None:
                    self._tend(self.engine)
                for w in self.workers:
                    self._tend(w)
                time.sleep(0.1)
            return self._shutdown()
        finally:
            self.sock.close()
            shutil.rmtree(self.rundir, ignore_errors=True)

    def _wait_engine(self) -> None:
        assert self.engine is not None
        path = str(engine_socket(self.rundir))
        deadline = time.monotonic() + ENGINE_START_TIMEOUT_S
        while time.monotonic() < deadline and not self._stop:
            if self.engine.proc is not None and self.engine.proc.poll() is not None:
                raise RuntimeError(f"the guard engine exited at start ({self.engine.proc.returncode})")
            with socket.socket(socket.AF_UNIX) as s:
                try:
                    s.connect(path)
                    return
                except OSError:
                    time.sleep(0.05)
        log.error(
            "guard engine did not listen within %.0f s; workers start anyway (checks fail)", ENGINE_START_TIMEOUT_S
        )

    def _tend(self, child: _Child) -> None:
        """Restart `child` if it exited (logged; backing off when it keeps dying right after start)."""
        proc = child.proc
        now = time.monotonic()
        if proc is None:
            if now >= child.restart_at:
                child.start()
                child.restarts += 1
                log.warning("%s restarted (pid %d, restart %d)", child.name, child.pid, child.restarts)
            return
        rc = proc.poll()
        if rc is None:
            return
        how = f"signal {signal.Signals(-rc).name}" if rc < 0 else f"exit status {rc}"
        log.error("%s (pid %d) died with %s; restarting", child.name, proc.pid, how)
        mark_dead(proc.pid)
        child.quick_deaths = child.quick_deaths + 1 if now - child.started < 5.0 else 0
        backoff = min(RESTART_BACKOFF_MAX_S, 0.25 * 2**child.quick_deaths) if child.quick_deaths else 0.0
        child.restart_at = now + backoff
        child.proc = None

    @staticmethod
    def _signal(child: _Child, sig: int) -> None:
        if child.proc is not None and child.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                child.proc.send_signal(sig)

    def _shutdown(self) -> int:
        """SIGTERM to every worker; each drains within shutdown_grace_s; then the engine."""
        log.info("stopping %d workers (drain up to %.0f s)", self.n, self.cfg.shutdown_grace_s)
        for w in self.workers:
            self._signal(w, signal.SIGTERM)
        self._reap(self.workers, self.cfg.shutdown_grace_s + 5.0)
        if self.engine is not None:
            self._signal(self.engine, signal.SIGTERM)
            self._reap([self.engine], 10.0)
        return 0

    @staticmethod
    def _reap(children: list[_Child], within: float) -> None:
        deadline = time.monotonic() + within
        for c in children:
            if c.proc is None:
                continue
            try:
                c.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("%s (pid %d) did not stop within %.0f s: killed", c.name, c.pid, within)
                c.proc.kill()
                c.proc.wait()
            mark_dead(c.proc.pid)

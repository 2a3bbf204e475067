"""Guardgate next to the gateways users know: latency and throughput added, side by side, one run.

    python scripts/bench.py [--requests 1000] [--concurrency 32] [--seconds 4] [--rounds 3] [--chunks 20]
                            [--targets relay,gate-regex,nginx,litellm,portkey] [--client raw,aiohttp] [--json]
                            [--base DIR]

Everything on loopback, same scripted upstream (bench/fake_upstream.py, OpenAI dialect, a stream of
`--chunks` text chunks), same load, each target its own process:
  direct      the scripted upstream itself (the baseline every "added" figure is measured against)
  relay       guardgate serve → upstream (byte relay, no policy)
  gate-regex  guardgate serve --policy bench/regex-stream.yaml (decoded, stream gate, regex step)
  translated  guardgate serve → llama-dialect upstream (every event re-encoded; off by default)
  nginx       Debian's nginx, proxy_pass with buffering off, one worker (the practical floor)
  litellm     the LiteLLM proxy, one worker, defaults, the upstream as an openai-compatible model
  portkey     the Portkey AI gateway (`@portkey-ai/gateway`, Node), the upstream as a custom OpenAI host
  relay@base, gate-regex@base
              the same Guardgate targets run from another checkout (`--base DIR`, e.g. a `git archive`
              of the commit before a change): before/after figures from one run, side by side

Targets that are not installed are skipped, and the run says so. To install them:
  nginx    apt-get update && apt-get install -y nginx          (binary: nginx on PATH or /usr/sbin/nginx)
  litellm  python3 -m venv /tmp/litellm-venv && /tmp/litellm-venv/bin/pip install 'litellm[proxy]'
           (a separate venv, so its pinned dependencies never touch ours; or set LITELLM_BIN)
  portkey  npm install --prefix .peers/portkey @portkey-ai/gateway   (scripts/install_peers.sh; or set
           PORTKEY_DIR to a directory holding node_modules/@portkey-ai/gateway; needs node on PATH)
  wrk      apt-get install -y wrk   (optional: the max-RPS load generator; else an aiohttp client)

Latency: requests one at a time, in rounds over all targets in a shuffled order (machine noise hits
all alike), after a warm-up: a non-stream JSON request, and a stream (time to the first body byte =
TTFT, and time to the last byte). Each latency phase runs once per client: RawClient (blocking
sockets, one keep-alive connection per target; the goals use it) and aiohttp's (~0.4 ms of CPU per
request of its own, the heaviest process here, which moves the figures with where the scheduler
puts it; shown beside). "Added" p50 = the median over rounds of (target - direct) in that round;
added p99 = target p99 minus direct p99. LiteLLM's latency is measured in a second phase, with
direct and the relay again (see HEAVY); the relay/LiteLLM ratios use that phase's figures. Max RPS: `--concurrency`
connections for `--seconds`, non-stream and stream, in `--rounds` rounds over all targets (median).
Goals (issue 9): relay added p50 ≤ 2× nginx's and ≤ 0.05× LiteLLM's, relay max RPS ≥ 30× LiteLLM's.
Since issue 16 the relay is aiohttp's (no hand-written front): the 2× nginx goal is no longer met, on
purpose; docs/performance.md has the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
KINDS = ("json", "ttft", "stream")
BODY = {"model": "bench", "messages": [{"role": "user", "content": "Say something."}]}
# Targets whose work runs on after each answer (LiteLLM: success callbacks, spend and cost logging):
# in a shared rotation they slowed whichever target came next (relay and nginx both added ~0.1 ms
# more), so their latency is measured in a phase of their own, next to direct and the relay.
HEAVY = frozenset({"litellm"})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Target:
    name: str
    base: str = ""  # e.g. http://127.0.0.1:PORT/v1
    ready: str = ""  # URL that answers once it is up
    procs: list[subprocess.Popen] = field(default_factory=list)
    skipped: str = ""
    lat: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in KINDS})  # the client reported
    lat_by: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # client -> kind -> seconds
    rps: dict[str, float] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)  # sent with every request (portkey's routing)
    rps_errors: dict[str, int] = field(default_factory=dict)
    ref: Target | None = None  # the `direct` measured in the same latency phase (None: the main one)


def spawn(args: list[str], cwd: Path = ROOT, env: dict[str, str] | None = None) -> subprocess.Popen:
    log = tempfile.TemporaryFile()  # noqa: SIM115  (never an unread pipe: a chatty child would block)
    p = subprocess.Popen(args, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                         env={**os.environ, "PYTHONPATH": str(cwd), **(env or {})})
    p.log = log  # type: ignore[attr-defined]
    return p


def log_tail(p: subprocess.Popen, n: int = 1500) -> str:
    p.log.seek(0)  # type: ignore[attr-defined]
    return p.log.read().decode(errors="replace")[-n:]  # type: ignore[attr-defined]


async def wait_ready(t: Target, timeout: float) -> None:
    end = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < end:
            if any(p.poll() is not None for p in t.procs):
                t.skipped = "exited at start: " + " | ".join(log_tail(p, 600) for p in t.procs)
                return
            try:
                async with s.get(t.ready) as r:
                    if r.status < 500:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    t.skipped = f"not ready after {timeout:.0f} s"


# ---------------------------------------------------------------------------- targets

NGINX_CONF = """
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {dir}/body; proxy_temp_path {dir}/proxy; fastcgi_temp_path {dir}/fcgi;
  uwsgi_temp_path {dir}/uwsgi; scgi_temp_path {dir}/scgi;
  upstream fake {{ server 127.0.0.1:{up}; keepalive 256; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://fake;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_request_buffering off;
    }}
  }}
}}
"""

LITELLM_CONF = """
model_list:
  - model_name: bench
    litellm_params:
      model: openai/bench
      api_base: http://127.0.0.1:{up}/v1
      api_key: sk-bench-not-a-key
"""


def nginx_bin() -> str | None:
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.path.exists(p)), None)


def litellm_bin() -> str | None:
    for p in (os.environ.get("LITELLM_BIN"), "/tmp/litellm-venv/bin/litellm", shutil.which("litellm")):
        if p and os.path.exists(p):
            return p
    return None


def gateway_target(name: str, up: str, dialect: str = "openai", policy: str | None = None,
                   root: Path = ROOT) -> Target:
    port = free_port()
    cmd = [PY, "-m", "gateway.cli", "serve", "--upstream", up, "--upstream-dialect", dialect,
           "--port", str(port), "--log-level", "WARNING"]
    cmd += ["--policy", policy or "none"]  # none: the plain relay (serve guards with `starter` by default)
    return Target(name, f"http://127.0.0.1:{port}/v1", f"http://127.0.0.1:{port}/healthz", [spawn(cmd, root)])


def portkey_dir() -> Path | None:
    """Where `@portkey-ai/gateway` is installed: PORTKEY_DIR, else .peers/portkey (scripts/install_peers.sh)."""
    for d in (os.environ.get("PORTKEY_DIR"), str(ROOT / ".peers" / "portkey")):
        if d and (Path(d) / "node_modules/@portkey-ai/gateway/build/start-server.js").exists():
            return Path(d)
    return None


# @portkey-ai/gateway 1.15 appends its x-portkey-* headers to the upstream's fetch() Response, whose
# headers Node's fetch (undici) makes immutable: every stream then failed with a 500 ("immutable").
# This preload hands Portkey responses with their own, mutable headers (one Response object per call).
PORTKEY_FETCH_SHIM = """
const f = globalThis.fetch;
globalThis.fetch = async (...a) => {
  const r = await f(...a);
  return new Response(r.body, { status: r.status, statusText: r.statusText, headers: new Headers(r.headers) });
};
"""


def portkey_target(up_port: int, tmp: Path) -> Target:
    d, node = portkey_dir(), shutil.which("node")
    if d is None or node is None:
        return Target("portkey", skipped="not installed (npm install --prefix .peers/portkey @portkey-ai/gateway, "
                                         "or set PORTKEY_DIR; needs node on PATH)")
    port = free_port()
    shim = tmp / "portkey-fetch-shim.cjs"
    shim.write_text(PORTKEY_FETCH_SHIM)
    p = spawn([node, "--require", str(shim), "node_modules/@portkey-ai/gateway/build/start-server.js",
               f"--port={port}", "--headless"],
              cwd=d, env={"NODE_ENV": "production", "TRUSTED_CUSTOM_HOSTS": "127.0.0.1,localhost"})
    # Portkey routes by headers: the provider and, for a self-hosted OpenAI-compatible server, its base URL.
    headers = {"x-portkey-provider": "openai", "x-portkey-custom-host": f"http://127.0.0.1:{up_port}/v1",
               "Authorization": "Bearer sk-bench-not-a-key"}
    return Target("portkey", f"http://127.0.0.1:{port}/v1", f"http://127.0.0.1:{port}/", [p], headers=headers)


def nginx_target(up_port: int, tmp: Path) -> Target:
    exe = nginx_bin()
    if exe is None:
        return Target("nginx", skipped="not installed (apt-get install -y nginx)")
    d = tmp / "nginx"
    for sub in ("", "body", "proxy", "fcgi", "uwsgi", "scgi"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o755)
    port = free_port()
    (d / "nginx.conf").write_text(NGINX_CONF.format(dir=d, up=up_port, port=port))
    p = spawn([exe, "-p", str(d), "-c", str(d / "nginx.conf"), "-g", "daemon off;"])
    return Target("nginx", f"http://127.0.0.1:{port}/v1", f"http://127.0.0.1:{port}/v1/models", [p])


def litellm_target(up_port: int, tmp: Path) -> Target:
    exe = litellm_bin()
    if exe is None:
        return Target("litellm", skipped="not installed (see this script's docstring: pip install 'litellm[proxy]' "
                                         "into /tmp/litellm-venv, or set LITELLM_BIN)")
    d = tmp / "litellm"
    d.mkdir(exist_ok=True)
    (d / "config.yaml").write_text(LITELLM_CONF.format(up=up_port))
    port = free_port()
    # Defaults, one worker. Two env settings only let it start offline without a master key.
    env = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY": "true"}
    p = spawn([exe, "--config", str(d / "config.yaml"), "--host", "127.0.0.1", "--port", str(port),
               "--num_workers", "1"], cwd=d, env=env)
    return Target("litellm", f"http://127.0.0.1:{port}/v1", f"http://127.0.0.1:{port}/health/liveliness", [p])


async def start(want: list[str], chunks: int, tmp: Path,
                base: Path | None = None) -> tuple[Target, list[Target], list[Target]]:
    up_port = free_port()
    direct = Target("direct", f"http://127.0.0.1:{up_port}/v1", f"http://127.0.0.1:{up_port}/v1/models",
                    [spawn([PY, "bench/fake_upstream.py", "--port", str(up_port), "--chunks", str(chunks)])])
    up = direct.base
    targets: list[Target] = []
    for name in want:
        if name == "relay":
            targets.append(gateway_target("relay", up))
        elif name == "gate-regex":
            targets.append(gateway_target("gate-regex", up, policy="bench/regex-stream.yaml"))
        elif name == "translated":
            ll_port = free_port()
            t = gateway_target("translated", f"http://127.0.0.1:{ll_port}/v1", dialect="llama")
            t.procs.append(spawn([PY, "bench/fake_upstream.py", "--port", str(ll_port), "--chunks", str(chunks),
                                  "--dialect", "llama"]))
            targets.append(t)
        elif name == "nginx":
            targets.append(nginx_target(up_port, tmp))
        elif name == "litellm":
            targets.append(litellm_target(up_port, tmp))
        elif name == "portkey":
            targets.append(portkey_target(up_port, tmp))
        elif name in ("relay@base", "gate-regex@base"):
            if base is None:
                targets.append(Target(name, skipped="no --base checkout given"))
            else:
                policy = "bench/regex-stream.yaml" if name.startswith("gate-regex") else None
                targets.append(gateway_target(name, up, policy=policy, root=base))
        else:
            targets.append(Target(name, skipped="unknown target"))
    await wait_ready(direct, 30)
    if direct.skipped:
        raise RuntimeError(f"the scripted upstream did not start: {direct.skipped}")
    for t in targets:
        if not t.skipped:
            await wait_ready(t, 120 if t.name == "litellm" else 30)
    live = [t for t in targets if not t.skipped]
    return direct, live, [t for t in targets if t.skipped]


def stop(targets: list[Target]) -> None:
    for t in targets:
        for p in t.procs:
            if p.poll() is None:
                p.terminate()
    for t in targets:
        for p in t.procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()


# ---------------------------------------------------------------------------- measuring


async def one(session: aiohttp.ClientSession, base: str, stream: bool,
              headers: dict[str, str] | None = None) -> tuple[float, float]:
    t0 = time.perf_counter()
    ttft = 0.0
    async with session.post(base + "/chat/completions", json={**BODY, "stream": stream}, headers=headers) as r:
        if stream:
            async for _ in r.content.iter_any():
                if not ttft:
                    ttft = time.perf_counter() - t0
        else:
            await r.read()
        if r.status != 200:
            raise RuntimeError(f"{base}: HTTP {r.status}")
    return ttft, time.perf_counter() - t0


class RawClient:
    """The lightest client there is: one blocking keep-alive socket per target and kind, the request's
    bytes made once, the response read just far enough to know it ended (Content-Length or chunked). On 2
    cores the client's own CPU shares the machine with the servers: aiohttp's client spends ~0.4 ms
    of CPU per request, 2-3x the upstream's, and how the scheduler packs it next to each server moves
    that server's added latency by more than the server's own work does."""

    def __init__(self) -> None:
        self.socks: dict[str, socket.socket] = {}
        self.requests: dict[str, bytes] = {}

    def close(self) -> None:
        for s in self.socks.values():
            s.close()
        self.socks.clear()

    def one(self, base: str, stream: bool, retry: bool = True,
            headers: dict[str, str] | None = None) -> tuple[float, float]:
        """(time to the first body byte, time to the end) of one chat completion, in seconds."""
        key = f"{base} {stream}"
        u = urlsplit(base)
        req = self.requests.get(key)
        if req is None:
            body = json.dumps({**BODY, "stream": stream}).encode()
            extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items()).encode()
            req = self.requests[key] = (
                b"POST %s/chat/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n%s"
                b"Content-Length: %d\r\n\r\n" % (u.path.encode(), u.netloc.encode(), extra, len(body)) + body)
        s = self.socks.get(key)
        if s is None:
            s = self.socks[key] = socket.create_connection((u.hostname, u.port), timeout=30)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        t0 = time.perf_counter()
        try:
            s.sendall(req)
            first, end, close = self._read(s)
        except ConnectionError:  # a server closes a keep-alive connection now and then (nginx: 1000 requests)
            s.close()
            del self.socks[key]
            if not retry:
                raise
            return self.one(base, stream, retry=False, headers=headers)  # once, on a new connection
        if close:
            s.close()
            del self.socks[key]
        return first - t0, end - t0

    @staticmethod
    def _read(s: socket.socket) -> tuple[float, float, bool]:
        """(when the first body byte came, when the last did, whether the server closes)."""
        buf = b""
        while (i := buf.find(b"\r\n\r\n")) < 0:
            buf += RawClient._recv(s)
        head, rest = buf[:i].lower(), buf[i + 4:]
        if not head.startswith(b"http/1.1 200"):
            raise RuntimeError(f"HTTP {head[:40]!r}")
        close = b"\r\nconnection: close" in head
        first = time.perf_counter() if rest else 0.0
        if b"\r\ntransfer-encoding: chunked" in head:
            while True:  # chunk by chunk until the last (0-size) one and its CRLF
                while (j := rest.find(b"\r\n")) < 0:
                    rest += RawClient._recv(s)
                    first = first or time.perf_counter()
                size = int(rest[:j].split(b";")[0], 16)
                while len(rest) < j + 2 + size + 2:
                    rest += RawClient._recv(s)
                rest = rest[j + 2 + size + 2:]
                if size == 0:
                    return first, time.perf_counter(), close
        m = re.search(rb"\r\ncontent-length: *(\d+)", head)
        n = int(m.group(1)) if m else 0
        while len(rest) < n:
            rest += RawClient._recv(s)
            first = first or time.perf_counter()
        return first or time.perf_counter(), time.perf_counter(), close

    @staticmethod
    def _recv(s: socket.socket) -> bytes:
        data = s.recv(65536)
        if not data:
            raise ConnectionResetError("closed")
        return data


async def latency_with(client: str, targets: list[Target], n: int, warmup: int) -> None:
    """One latency phase with `client`; each target's figures go to lat_by[client]."""
    for t in targets:
        t.lat = {k: [] for k in KINDS}
    await latency(targets, n, warmup, client)
    for t in targets:
        t.lat_by[client] = t.lat


async def latency(targets: list[Target], n: int, warmup: int, client: str = "aiohttp") -> None:
    raw = RawClient() if client == "raw" else None
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:

        async def request(t: Target, stream: bool) -> tuple[float, float]:
            if raw is not None:
                return raw.one(t.base, stream, headers=t.headers)
            return await one(s, t.base, stream, t.headers)

        try:
            for t in targets:
                for stream in (False, True):
                    for _ in range(warmup):
                        await request(t, stream)
            rng = random.Random(9)
            order = list(targets)
            for _ in range(n):
                rng.shuffle(order)  # no target always goes first (or right after the slow one)
                for t in order:
                    _, total = await request(t, False)
                    t.lat["json"].append(total)
                    ttft, total = await request(t, True)
                    t.lat["ttft"].append(ttft)
                    t.lat["stream"].append(total)
        finally:
            if raw is not None:
                raw.close()


WRK_LUA = """
wrk.method = "POST"
wrk.body = {body}
wrk.headers["Content-Type"] = "application/json"
{headers}
"""


def wrk_rps(base: str, stream: bool, concurrency: int, seconds: float, tmp: Path,
            headers: dict[str, str] | None = None) -> tuple[float, int]:
    script = tmp / f"wrk-{'stream' if stream else 'json'}.lua"
    hl = "\n".join(f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}" for k, v in (headers or {}).items())
    script.write_text(WRK_LUA.format(body=json.dumps(json.dumps({**BODY, "stream": stream})), headers=hl))
    out = subprocess.run(["wrk", "-t1", f"-c{concurrency}", f"-d{seconds:g}s", "-s", str(script),
                          base + "/chat/completions"], capture_output=True, text=True, timeout=seconds + 60).stdout
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    bad = sum(int(x) for x in re.findall(r"Non-2xx or 3xx responses:\s+(\d+)", out))
    errs = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if errs:
        bad += sum(int(x) for x in errs.groups())
    return (float(m.group(1)) if m else 0.0), bad


async def aiohttp_rps(base: str, stream: bool, concurrency: int, seconds: float,
                      headers: dict[str, str] | None = None) -> tuple[float, int]:
    done = bad = 0
    end = time.perf_counter() + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        async def worker() -> None:
            nonlocal done, bad
            while time.perf_counter() < end:
                try:
                    await one(s, base, stream, headers)
                    done += 1
                except (RuntimeError, aiohttp.ClientError):
                    bad += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return done / (time.perf_counter() - t0), bad


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] * 1000 if xs else float("nan")


def ratio(a: float, b: float) -> float:
    return a / b if b else float("inf")


# ---------------------------------------------------------------------------- report


def added_of(t: Target, direct: Target, chunks: int) -> dict[str, float]:
    ref = t.ref or direct
    ad = {}
    for k in KINDS:
        # p50: the median of per-round differences (target and direct measured back to back in the
        # same round), which cancels slow drifts in machine load; p99: p99 minus p99
        diffs = [x - y for x, y in zip(t.lat[k], ref.lat[k], strict=True)]
        ad[f"{k}_p50"] = pct(diffs, 0.5)
        ad[f"{k}_p99"] = pct(t.lat[k], 0.99) - pct(ref.lat[k], 0.99)
    ad["per_chunk"] = ad["stream_p50"] / (chunks + 2)
    return ad


def latency_report(direct: Target, targets: list[Target], heavy_phase: dict[str, Target], a: argparse.Namespace,
                   client: str) -> dict[str, dict[str, float]]:
    """The latency table, the added figures and the ratios of one client's phases."""
    every = [direct, *targets, *heavy_phase.values()]
    for t in [*every, *(t.ref for t in every if t.ref is not None)]:
        t.lat = t.lat_by.get(client, t.lat)
    print(f"\nlatency, {client} client ({'RawClient: blocking sockets' if client == 'raw' else 'aiohttp'}), ms:")
    print(f"{'target':<12}{'json p50':>10}{'p99':>8}{'ttft p50':>10}{'p99':>8}{'strm p50':>10}{'p99':>8}")
    for t in [direct, *targets]:
        print(f"{t.name:<12}" + "".join(f"{pct(t.lat[k], 0.5):>10.2f}{pct(t.lat[k], 0.99):>8.2f}" for k in KINDS))
    added: dict[str, dict[str, float]] = {}
    print("added by each gateway, ms (target minus direct), p50 / p99:")
    for t in [*targets, *heavy_phase.values()]:
        ad = added_of(t, direct, a.chunks)
        name = t.name if t in targets else f"{t.name}*"
        added[name] = ad
        print(f"  {name:<12} json +{ad['json_p50']:.2f} / +{ad['json_p99']:.2f}   ttft +{ad['ttft_p50']:.2f} / "
              f"+{ad['ttft_p99']:.2f}   stream +{ad['stream_p50']:.2f} / +{ad['stream_p99']:.2f} "
              f"({ad['per_chunk']:.3f} ms/chunk)")
    if heavy_phase:
        print(f"  (* measured again in {', '.join(sorted(HEAVY & set(added)))}'s own latency phase, next to it; "
              "see HEAVY in this script)")
    by = {t.name: t for t in targets}
    if "relay" in by:
        print("ratios (relay vs others):")
        for other in ("nginx", "litellm", "portkey", "gate-regex", "translated", "relay@base", "gate-regex@base"):
            if other not in by:
                continue
            o = added[other]
            rr = added["relay*"] if other in HEAVY and "relay*" in added else added["relay"]  # the same phase's
            print(f"  relay/{other:<11} added json p50 x{ratio(rr['json_p50'], o['json_p50']):.3f}  "
                  f"ttft p50 x{ratio(rr['ttft_p50'], o['ttft_p50']):.3f}  "
                  f"stream p50 x{ratio(rr['stream_p50'], o['stream_p50']):.3f}   "
                  f"max rps json x{ratio(by['relay'].rps['json'], by[other].rps['json']):.1f} "
                  f"stream x{ratio(by['relay'].rps['stream'], by[other].rps['stream']):.1f}")
    return added


def guarded_goals(added: dict[str, dict[str, float]], by: dict[str, Target], goals: dict[str, object]) -> None:
    """Issue 29: the regex-guarded path against the relay, and the relay against nginx; for the targets
    of this checkout and, beside them, of `--base` (before/after in one run)."""
    for sfx in ("", "@base"):
        relay, gate = f"relay{sfx}", f"gate-regex{sfx}"
        if relay not in added or gate not in added:
            continue
        r, g = added[relay], added[gate]
        rows = [("gate stream added p50 <= 2x relay's", ratio(g["stream_p50"], r["stream_p50"]), 2.0, True),
                ("gate max streams/s >= 0.5x relay's", ratio(by[gate].rps["stream"], by[relay].rps["stream"]),
                 0.5, False),
                ("gate json added p50 <= 1.5x relay's", ratio(g["json_p50"], r["json_p50"]), 1.5, True)]
        if "nginx" in added:
            rows.append(("relay json added p50 <= 7.5x nginx's", ratio(r["json_p50"], added["nginx"]["json_p50"]),
                         7.5, True))
        print(f"\nguarded path (issue 29), {relay} / {gate}:")
        for label, v, bound, at_most in rows:
            ok = v <= bound if at_most else v >= bound
            goals[f"{label}{sfx}"] = round(v, 3)
            print(f"  {label:<40} x{v:.2f} {'PASS' if ok else 'FAIL'}")


def report(direct: Target, targets: list[Target], skipped: list[Target], a: argparse.Namespace,
           rps_tool: str, heavy_phase: dict[str, Target]) -> dict:
    allt = [direct, *targets]
    clients = [c for c in a.client.split(",") if c]
    print(f"\nloopback, CPUs: {os.cpu_count()}; {a.requests} sequential requests per kind per target, interleaved, "
          f"with each client ({', '.join(clients)}); stream = {a.chunks} chunks; max RPS: {a.concurrency} "
          f"connections x {a.seconds:g} s, median of {a.rounds} rounds ({rps_tool})")
    for t in skipped:
        print(f"  skipped {t.name}: {t.skipped}")
    print(f"\n{'target':<12}{'rps json':>10}{'rps strm':>10}")
    for t in allt:
        print(f"{t.name:<12}{t.rps.get('json', 0):>10.0f}{t.rps.get('stream', 0):>10.0f}"
              + (f"  errors {t.rps_errors}" if any(t.rps_errors.values()) else ""))
    added_by = {c: latency_report(direct, targets, heavy_phase, a, c) for c in clients}
    added, others = added_by[clients[0]], {c: added_by[c] for c in clients[1:]}
    by = {t.name: t for t in targets}
    goals: dict[str, object] = {}
    if "relay" in by:
        print(f"\ngoals (issue 9; latency with the {clients[0]} client, the others' in parentheses):")

        def also(other: str, key: str = "relay") -> str:
            return "".join(f", {c} x{ratio(o.get(key, o['relay'])['json_p50'], o[other]['json_p50']):.2f}"
                           for c, o in others.items())

        r = added["relay"]
        if "nginx" in by:
            v = ratio(r["json_p50"], added["nginx"]["json_p50"])
            goals["relay_added_p50_vs_nginx"] = round(v, 3)
            print(f"  relay added p50 <= 2x nginx's ........ x{v:.2f} {'PASS' if v <= 2 else 'FAIL'}"
                  f"  (json; ttft x{ratio(r['ttft_p50'], added['nginx']['ttft_p50']):.2f}, "
                  f"stream x{ratio(r['stream_p50'], added['nginx']['stream_p50']):.2f}{also('nginx')})")
        else:
            print("  relay added p50 <= 2x nginx's ........ not measured (nginx skipped)")
        if "litellm" in by:
            r = added.get("relay*", added["relay"])
            lt = added["litellm"]
            v = ratio(r["json_p50"], lt["json_p50"])
            goals["relay_added_p50_vs_litellm"] = round(v, 4)
            print(f"  relay added p50 <= 0.05x LiteLLM's ... x{v:.3f} {'PASS' if v <= 0.05 else 'FAIL'}"
                  f"  (ttft x{ratio(r['ttft_p50'], lt['ttft_p50']):.3f}, "
                  f"stream x{ratio(r['stream_p50'], lt['stream_p50']):.3f}{also('litellm', 'relay*')})")
            for k in ("json", "stream"):
                v = ratio(by["relay"].rps[k], by["litellm"].rps[k])
                goals[f"relay_rps_{k}_vs_litellm"] = round(v, 1)
                print(f"  relay max RPS >= 30x LiteLLM's ({k:<6}) x{v:.1f} {'PASS' if v >= 30 else 'FAIL'}")
        else:
            print("  LiteLLM goals ......................... not measured (litellm skipped)")
    guarded_goals(added, by, goals)
    return {"added_ms": added_by, "rps": {t.name: t.rps for t in allt}, "goals": goals,
            "p50_ms": {c: {t.name: {k: pct(t.lat_by[c][k], 0.5) for k in KINDS} for t in allt} for c in clients},
            "skipped": {t.name: t.skipped for t in skipped}}


async def main_async(a: argparse.Namespace) -> dict:
    want = [w for w in a.targets.split(",") if w]
    with tempfile.TemporaryDirectory(prefix="gg-bench-") as tmpd:
        tmp = Path(tmpd)
        direct, targets, skipped = await start(want, a.chunks, tmp, a.base)
        try:
            light = [t for t in targets if t.name not in HEAVY]
            heavy = [t for t in targets if t.name in HEAVY]
            clients = [c for c in a.client.split(",") if c]
            for client in clients:
                await latency_with(client, [direct, *light], a.requests, a.warmup)
            heavy_phase: dict[str, Target] = {}
            if heavy:
                direct2 = Target("direct", direct.base)
                heavy_phase = {t.name: Target(t.name, t.base, ref=direct2) for t in light if t.name == "relay"}
                for t in heavy:
                    t.ref = direct2
                for client in clients:
                    await latency_with(client, [direct2, *heavy_phase.values(), *heavy], a.requests, a.warmup)
            tool = "wrk" if shutil.which("wrk") and not a.no_wrk else "aiohttp client"
            runs: dict[tuple[str, str], list[float]] = {}
            for rnd in range(a.rounds):  # rounds over all targets: a noisy neighbour hits them all alike
                # in a shuffled order per round, as the latency phase: no target always runs right after
                # the same one (a heavy peer's after-work slowed whichever came next)
                for t in random.Random(rnd).sample([direct, *targets], len(targets) + 1):
                    for k, stream in (("json", False), ("stream", True)):
                        if tool == "wrk":
                            rps, bad = wrk_rps(t.base, stream, a.concurrency, a.seconds, tmp, t.headers)
                        else:
                            rps, bad = await aiohttp_rps(t.base, stream, a.concurrency, a.seconds, t.headers)
                        runs.setdefault((t.name, k), []).append(rps)
                        t.rps_errors[k] = t.rps_errors.get(k, 0) + bad
                        if t.name in HEAVY:
                            await asyncio.sleep(2)  # let its after-work finish before the next target's run
            for t in [direct, *targets]:
                for k in ("json", "stream"):
                    t.rps[k] = sorted(runs[(t.name, k)])[len(runs[(t.name, k)]) // 2]  # median round
        finally:
            stop([direct, *targets])
        return report(direct, targets, skipped, a, tool, heavy_phase)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=1000, help="sequential requests per kind per target")
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=4.0, help="duration of each max-RPS run")
    ap.add_argument("--rounds", type=int, default=3, help="max-RPS rounds over all targets (median reported)")
    ap.add_argument("--chunks", type=int, default=20)
    ap.add_argument("--client", default="raw,aiohttp",
                    help="latency clients, in order (the first is the one the goals use): raw (RawClient), aiohttp")
    ap.add_argument("--targets", default="relay,gate-regex,nginx,litellm,portkey")
    ap.add_argument("--base", type=Path, default=None,
                    help="another checkout (e.g. `git archive` of the commit before a change) for relay@base and "
                         "gate-regex@base")
    ap.add_argument("--no-wrk", action="store_true", help="measure max RPS with the aiohttp client even if wrk exists")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON at the end")
    a = ap.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    out = asyncio.run(main_async(a))
    if a.json:
        print(json.dumps(out, default=lambda x: round(x, 4) if isinstance(x, float) else str(x)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

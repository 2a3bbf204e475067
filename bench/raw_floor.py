"""How low can a Python relay go? A floor measurement for issue 9's "≤ 2× nginx" goal.

    python bench/raw_floor.py [--requests 400]

Runs, side by side on loopback, non-stream JSON requests one at a time against:
  direct     bench/fake_upstream.py
  raw-py     the thinnest possible Python relay: uvloop, asyncio.Protocol, one pooled upstream
             connection per client connection, Content-Length bodies only, no header rewriting,
             no routing, no auth, no logging (not a product: a lower bound for any Python relay)
  guardgate  guardgate serve (byte relay)
  nginx      Debian's nginx, proxy_pass, keepalive upstream (skipped if not installed)
and prints the p50 each adds over direct. If raw-py alone adds more than 2× what nginx adds, the
goal is out of reach for a relay written in Python on this machine, whatever its design.

    --client raw   a blocking-socket client (one keep-alive connection per target, ~nothing of its
                   own on the CPU) instead of aiohttp's: what the proxies add, with less of the
                   client's own work competing for the 2 cores
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import bench as B  # scripts/bench.py: process helpers, nginx config


def _split_head(buf: bytes) -> tuple[int, int] | None:
    """(end of head, content length) once a whole head is in `buf`."""
    i = buf.find(b"\r\n\r\n")
    if i < 0:
        return None
    n = 0
    for line in buf[:i].split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"content-length":
            n = int(v)
    return i + 4, n


class _Upstream(asyncio.Protocol):
    def __init__(self) -> None:
        self.buf = b""
        self.waiter: asyncio.Future[bytes] | None = None

    def data_received(self, data: bytes) -> None:
        self.buf += data
        head = _split_head(self.buf)
        if head and len(self.buf) >= head[0] + head[1] and self.waiter and not self.waiter.done():
            msg, self.buf = self.buf[: head[0] + head[1]], self.buf[head[0] + head[1]:]
            self.waiter.set_result(msg)


class _Client(asyncio.Protocol):
    def __init__(self, up_port: int) -> None:
        self.up_port = up_port
        self.buf = b""
        self.up: tuple[asyncio.Transport, _Upstream] | None = None
        self.tasks: set[asyncio.Future[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        head = _split_head(self.buf)
        if head and len(self.buf) >= head[0] + head[1]:
            msg, self.buf = self.buf[: head[0] + head[1]], self.buf[head[0] + head[1]:]
            task = asyncio.ensure_future(self.forward(msg))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def forward(self, msg: bytes) -> None:
        if self.up is None:
            loop = asyncio.get_running_loop()
            self.up = await loop.create_connection(_Upstream, "127.0.0.1", self.up_port)  # type: ignore[assignment]
        tr, proto = self.up  # type: ignore[misc]
        proto.waiter = asyncio.get_running_loop().create_future()
        tr.write(msg)
        self.transport.write(await proto.waiter)  # type: ignore[attr-defined]


def serve_raw(port: int, up_port: int) -> None:
    import uvloop

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(lambda: _Client(up_port), "127.0.0.1", port)
        async with server:
            await server.serve_forever()

    uvloop.run(main())


async def latency(bases: dict[str, str], n: int) -> dict[str, list[float]]:
    body = {"model": "bench", "messages": [{"role": "user", "content": "hi"}]}
    out: dict[str, list[float]] = {k: [] for k in bases}
    async with aiohttp.ClientSession() as s:
        for _ in range(30):
            for base in bases.values():
                async with s.post(base + "/chat/completions", json=body) as r:
                    await r.read()
        for _ in range(n):
            for name, base in bases.items():
                t0 = time.perf_counter()
                async with s.post(base + "/chat/completions", json=body) as r:
                    await r.read()
                out[name].append(time.perf_counter() - t0)
    return out


def raw_latency(bases: dict[str, str], n: int) -> dict[str, list[float]]:
    """As `latency`, with one blocking keep-alive socket per target. nginx closes a client connection
    after 1000 requests (keepalive_requests), so a closed one is reopened."""
    import json
    import socket

    body = json.dumps({"model": "bench", "messages": [{"role": "user", "content": "hi"}]}).encode()
    req = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
           b"Content-Length: %d\r\n\r\n" % len(body) + body)
    ports = {name: int(base.rsplit(":", 1)[1].split("/")[0]) for name, base in bases.items()}
    socks: dict[str, socket.socket] = {}

    def one(name: str) -> float:
        s = socks.get(name)
        if s is None:
            s = socks[name] = socket.create_connection(("127.0.0.1", ports[name]), timeout=10)
        t0 = time.perf_counter()
        s.sendall(req)
        buf = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                s.close()
                del socks[name]
                return one(name)
            buf += chunk
            split = _split_head(buf)
            if split and len(buf) >= split[0] + split[1]:
                return time.perf_counter() - t0

    out: dict[str, list[float]] = {k: [] for k in bases}
    for _ in range(30):
        for name in bases:
            one(name)
    for _ in range(n):
        for name in bases:
            out[name].append(one(name))
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--raw-server":
        serve_raw(int(sys.argv[2]), int(sys.argv[3]))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--client", choices=("aiohttp", "raw"), default="aiohttp")
    a = ap.parse_args()
    up_port, raw_port, gg_port, ng_port = (B.free_port() for _ in range(4))
    procs = [subprocess.Popen([sys.executable, "bench/fake_upstream.py", "--port", str(up_port)], cwd=B.ROOT),
             subprocess.Popen([sys.executable, __file__, "--raw-server", str(raw_port), str(up_port)], cwd=B.ROOT),
             subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", "--upstream",
                               f"http://127.0.0.1:{up_port}/v1", "--port", str(gg_port), "--log-level", "WARNING",
                               "--policy", "none"],
                              cwd=B.ROOT)]
    bases = {"direct": f"http://127.0.0.1:{up_port}/v1", "raw-py": f"http://127.0.0.1:{raw_port}/v1",
             "guardgate": f"http://127.0.0.1:{gg_port}/v1"}
    tmp = Path(tempfile.mkdtemp(prefix="gg-floor-"))
    if B.nginx_bin():
        (tmp / "nginx.conf").write_text(B.NGINX_CONF.format(dir=tmp, up=up_port, port=ng_port))
        procs.append(subprocess.Popen([B.nginx_bin(), "-p", str(tmp), "-c", str(tmp / "nginx.conf"),
                                       "-g", "daemon off;"]))
        bases["nginx"] = f"http://127.0.0.1:{ng_port}/v1"
    try:
        time.sleep(3)
        lat = raw_latency(bases, a.requests) if a.client == "raw" else asyncio.run(latency(bases, a.requests))
    finally:
        for p in procs:
            p.terminate()
    d = lat["direct"]
    print(f"{a.requests} sequential non-stream requests per target, interleaved, {a.client} client; "
          f"CPUs: {os.cpu_count()}")
    for name, xs in lat.items():
        added = statistics.median([x - y for x, y in zip(xs, d, strict=True)]) * 1000
        print(f"  {name:<10} p50 {statistics.median(xs) * 1000:6.3f} ms   added p50 {added:+.3f} ms")


if __name__ == "__main__":
    main()

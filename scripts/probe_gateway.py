"""The slow probes of issue 24 against a real `guardgate serve`, at full size (tests/test_hardening.py has
the fast versions of every class).

    python scripts/probe_gateway.py [--rounds 5] [--conns 40] [--mib 4]

  memory     --conns connections each send --mib MiB of an 8 MB body and hang up, --rounds times, with
             no policy and with the starter policy: RSS must be back within 10% of the warm baseline
             within 5 s of the last connection closing.
  pool       max_connections 2 and two clients that never read their streams: a third request must be
             answered (served, or 503 with Retry-After) within the upstream's connect timeout; then,
             once send_timeout_s has cut the stalled clients, a fourth must be served.
  slow-head  a head trickled a byte every 3 s must be closed by head_timeout_s (set to 5 s here).
Prints one line per probe, PASS or FAIL with its figures; exits 1 if any failed.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from harness import Loop, ScriptedUpstream, oa_chunk, sse  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return int(f.read().split("VmRSS:")[1].split()[0]) / 1024


def serve(args: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", "--port", str(port), "--log-level",
                             "WARNING", *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/healthz").status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"gateway did not start: {args}")


def memory(up_url: str, policy: str, rounds: int, conns: int, mib: int) -> bool:
    proc, url = serve(["--upstream", up_url, "--policy", policy])
    try:
        port = int(url.rsplit(":", 1)[1])
        for _ in range(20):
            httpx.post(url + "/v1/chat/completions", json={"model": "m", "messages": [{"role": "user",
                                                                                       "content": "hi"}]})
        warm = peak = rss_mib(proc.pid)
        for _ in range(rounds):
            socks = []
            for _ in range(conns):
                c = socket.create_connection(("127.0.0.1", port))
                c.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: 8000000\r\n\r\n" + b"x" * (mib << 20))
                socks.append(c)
            time.sleep(0.5)
            peak = max(peak, rss_mib(proc.pid))
            for c in socks:
                c.close()
            time.sleep(1)
        t0 = time.monotonic()
        while rss_mib(proc.pid) > warm * 1.1 and time.monotonic() - t0 < 5:
            time.sleep(0.25)
        end = rss_mib(proc.pid)
        ok = end <= warm * 1.1
        print(f"{'PASS' if ok else 'FAIL'} memory ({policy}): warm {warm:.0f} MiB, peak {peak:.0f}, "
              f"5 s after {end:.0f} ({end / warm:.2f}x)")
        return ok
    finally:
        proc.terminate()
        proc.wait(10)


def pool(up: ScriptedUpstream, up_url: str) -> bool:
    async def endless(request, _up):  # type: ignore[no-untyped-def]
        from aiohttp import web

        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for _ in range(20_000):
            await resp.write(sse(oa_chunk({"content": "x" * 8000})))
        return resp

    up.handler = endless
    with tempfile.TemporaryDirectory() as d:
        conf = Path(d) / "gw.yaml"
        conf.write_text(json.dumps({"upstreams": {"main": {"base_url": up_url, "max_connections": 2,
                                                           "timeouts": {"connect": 2, "read": 30}}},
                                    "limits": {"send_timeout_s": 4}}))
        proc, url = serve(["--config", str(conf), "--policy", "none"])
    try:
        port = int(url.rsplit(":", 1)[1])
        body = json.dumps({"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}).encode()
        held = []
        for _ in range(2):
            s = socket.create_connection(("127.0.0.1", port))
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n" % len(body) + body)
            held.append(s)
        time.sleep(0.5)
        t0 = time.monotonic()
        r = httpx.post(url + "/v1/chat/completions", json={"model": "m", "messages": []}, timeout=30)
        third = time.monotonic() - t0
        ok3 = r.status_code == 200 or (r.status_code == 503 and "Retry-After" in r.headers)
        time.sleep(5)  # send_timeout_s cuts the two stalled clients
        up.handler = None
        r4 = httpx.post(url + "/v1/chat/completions", json={"model": "m", "messages": []}, timeout=30)
        ok = ok3 and third < 3 and r4.status_code == 200
        print(f"{'PASS' if ok else 'FAIL'} pool: third request {r.status_code} in {third:.2f} s "
              f"(connect timeout 2 s); after the send timeout a fourth got {r4.status_code}")
        for s in held:
            s.close()
        return ok
    finally:
        proc.terminate()
        proc.wait(10)


def slow_head(up_url: str) -> bool:
    with tempfile.TemporaryDirectory() as d:
        conf = Path(d) / "gw.yaml"
        conf.write_text(json.dumps({"upstreams": {"main": {"base_url": up_url}}, "limits": {"head_timeout_s": 5}}))
        proc, url = serve(["--config", str(conf), "--policy", "none"])
    try:
        s = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])))
        s.settimeout(3)
        t0 = time.monotonic()
        closed = None
        for b in b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n":
            try:
                s.send(bytes([b]))
                if s.recv(100) == b"":
                    closed = time.monotonic() - t0
                    break
            except TimeoutError:
                continue
            except OSError:
                closed = time.monotonic() - t0
                break
        ok = closed is not None and closed < 10
        print(f"{'PASS' if ok else 'FAIL'} slow-head: a byte every 3 s, closed after "
              f"{'never' if closed is None else f'{closed:.1f} s'} (head_timeout_s 5)")
        return ok
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--conns", type=int, default=40)
    ap.add_argument("--mib", type=int, default=4)
    a = ap.parse_args()
    loop = Loop()
    up = ScriptedUpstream()
    up.port = loop.serve(up.app())
    up_url = f"http://127.0.0.1:{up.port}/v1"
    try:
        results = [memory(up_url, "none", a.rounds, a.conns, a.mib), memory(up_url, "starter", a.rounds, a.conns,
                                                                            a.mib),
                   pool(up, up_url), slow_head(up_url)]
    finally:
        loop.close()
    return 0 if all(results) else 1


if __name__ == "__main__":
    raise SystemExit(main())

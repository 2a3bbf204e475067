"""The Python cost of one relayed request on the fast path, with no sockets.

    python bench/fastpath_cpu.py [--sdk-headers] [--requests 20000] [--profile]

Why: on loopback the relay's added latency moves by ±0.03 ms between runs, more than most single
changes to the hot path are worth; the CPU the fast path spends in Python per request is what such a
change moves, and measured in process with fake transports on both sides it is steady to ~0.3 us.
A `FrontProtocol` gets a whole request (the head aiohttp's client sends, or with `--sdk-headers`
the openai SDK's 17 headers), the pooled `UpstreamConnection` gets the upstream's JSON answer, and
the answer must come out on the client side. Prints the best of 5 runs, in microseconds per request;
`--profile` adds a cProfile table. On this project's 2-core machine, a microsecond here is about
two of added latency (bench/ab_relay.py).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import pstats
import time
from typing import Any

from gateway.config import GatewayConfig, Route, UpstreamConfig
from gateway.fastpath import FastFront
from gateway.server import Gateway
from gateway.upstreams.pool import UpstreamConnection

BODY = json.dumps({"model": "bench", "messages": [{"role": "user", "content": "hi"}]}).encode()
SDK_HEADERS = (b"X-Stainless-Lang: python\r\nX-Stainless-Package-Version: 1.99.9\r\nX-Stainless-OS: Linux\r\n"
               b"X-Stainless-Arch: x64\r\nX-Stainless-Runtime: CPython\r\nX-Stainless-Runtime-Version: 3.11.7\r\n"
               b"Authorization: Bearer sk-test\r\nX-Stainless-Async: false\r\nX-Stainless-Retry-Count: 0\r\n"
               b"X-Stainless-Read-Timeout: 600\r\nConnection: keep-alive\r\n")
ANSWER = json.dumps({"id": "chatcmpl-bench", "object": "chat.completion", "created": 1, "model": "bench",
                     "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"},
                                  "finish_reason": "stop"}]}).encode()
RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: %d\r\n"
            b"Date: Thu, 26 Nov 2026 08:00:00 GMT\r\nServer: Python/3.11 aiohttp/3.12\r\n\r\n" % len(ANSWER) + ANSWER)


def request(sdk: bool) -> bytes:
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:1234\r\nUser-Agent: Python/3.11 aiohttp/3.12\r\n"
            b"Accept: */*\r\nAccept-Encoding: gzip, deflate\r\n" + (SDK_HEADERS if sdk else b"")
            + b"Content-Length: %d\r\nContent-Type: application/json\r\n\r\n" % len(BODY) + BODY)


class FakeTransport:
    """Keeps what is written; never pushes back."""

    def __init__(self) -> None:
        self.out: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.out.append(data)

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def get_extra_info(self, *_: Any) -> None:
        return None


async def main_async(a: argparse.Namespace) -> None:
    cfg = GatewayConfig(upstreams={"default": UpstreamConfig(name="default", base_url="http://127.0.0.1:9/v1")},
                        routes=[Route(upstream="default")])
    gw = Gateway(cfg)
    await gw.start(None)  # type: ignore[arg-type]
    try:
        pool = gw.upstreams["default"].pool  # type: ignore[union-attr]
        assert pool is not None
        conn = UpstreamConnection(pool)
        upstream_side = FakeTransport()
        conn.connection_made(upstream_side)  # type: ignore[arg-type]
        pool._open.add(conn)
        pool._idle.append(conn)
        conn.idle_since = time.monotonic()
        client_side = FakeTransport()
        front = FastFront(gw, None)  # type: ignore[arg-type]
        proto = front()
        proto.connection_made(client_side)  # type: ignore[arg-type]
        req = request(a.sdk_headers)

        def one() -> None:
            proto.data_received(req)
            conn.data_received(RESPONSE)

        for _ in range(2000):
            one()
        assert upstream_side.out[-1].endswith(BODY) and client_side.out[-1].endswith(ANSWER), "not relayed"
        assert front.known_heads > 0 and front.handed_off == 0 and pool.known_heads > 0
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(a.requests):
                one()
            best = min(best, (time.perf_counter() - t0) / a.requests * 1e6)
            upstream_side.out.clear()
            client_side.out.clear()
        print(f"fast path, Python per relayed request ({'openai SDK' if a.sdk_headers else 'aiohttp'} head): "
              f"{best:.2f} us (best of 5 x {a.requests})")
        if a.profile:
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(a.requests):
                one()
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    finally:
        await gw.stop(None)  # type: ignore[arg-type]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sdk-headers", action="store_true", help="the openai SDK's head instead of aiohttp's")
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--profile", action="store_true")
    a = ap.parse_args()
    try:
        import uvloop
    except ImportError:
        asyncio.run(main_async(a))
    else:
        uvloop.run(main_async(a))


if __name__ == "__main__":
    main()

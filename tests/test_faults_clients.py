"""Client faults (issue 9): clients that read slowly and clients that vanish, on every path.

A slow reader must get every byte, with back-pressure reaching the upstream (the gateway does
not buffer a stream the client is not reading). A vanished client must cancel the upstream,
close the guards' stream checks and leave no task behind.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time

import policy_fakes  # noqa: F401  (registers the t_* guards)
import pytest
from aiohttp import web
from faults import PATHS, gateway_tasks, make_path_stack
from harness import oa_chunk, openai_text_stream, sse, stream_frames, wait_until
from policy_fakes import OPENED

TRACKED_POLICY = """
name: faults-tracked
input:
  steps:
    - guard: t_sleep
      seconds: {input_sleep}
      parallel_with_upstream: true
      timeout_ms: 20000
stream:
  check_every_tokens: 8
  max_unchecked_tokens: 0
  steps:
    - guard: regex
      patterns: ["(?i)forbidden phrase"]
      action: block
    - guard: t_phrase
      phrase: never-said
      action: block
"""


def open_stream(st, path: str, *, rcvbuf: int | None = None) -> socket.socket:
    host, port = st.url.removeprefix("http://").split(":")
    s = socket.socket()
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect: no autotuning
    s.connect((host, int(port)))
    prefix = "/llama/v1" if path == "translate" else "/v1"
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}).encode()
    s.sendall(f"POST {prefix}/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    return s


def read_all(s: socket.socket, timeout: float = 30, first: bytes = b"") -> bytes:
    s.settimeout(timeout)
    out = bytearray(first)
    while True:
        b = s.recv(1 << 20)
        if not b:
            return bytes(out)
        out += b
        if out.endswith(b"0\r\n\r\n"):  # last chunk of a chunked body
            return bytes(out)


def dechunk(raw: bytes) -> bytes:
    i = raw.index(b"\r\n\r\n") + 4
    assert b"chunked" in raw[:i].lower(), raw[:i]
    out = bytearray()
    while i < len(raw):
        j = raw.index(b"\r\n", i)
        n = int(raw[i:j], 16)
        if n == 0:
            break
        out += raw[j + 2:j + 2 + n]
        i = j + 4 + n
    return bytes(out)


# ---------------------------------------------------------------------------- slow readers

EVENT_TEXT = 32 * 1024
FILLER = "the quick brown fox jumps over the lazy dog " * (EVENT_TEXT // 44 + 1)


def big_stream_handler(total: int, written: list[int]):
    """An upstream that writes `total` bytes of text as fast as the gateway takes them."""

    async def handler(request: web.Request, up) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        head = openai_text_stream([])
        await resp.write(head[0])
        n = 0
        i = 0
        while n < total:
            piece = (f"[{i:06d}]" + FILLER)[:EVENT_TEXT]
            await resp.write(sse(oa_chunk({"content": piece})))
            n += len(piece)
            written[0] = n
            i += 1
        for f in head[1:]:
            await resp.write(f)
        await resp.write_eof()
        return resp

    return handler


@pytest.mark.parametrize("path", ["relay", "translate", pytest.param("gate", marks=pytest.mark.slow)])
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_slow_reader_gets_everything_and_back_pressure_reaches_upstream(make_stack, tmp_path, path: str) -> None:
    total = 32 << 20
    written = [0]
    st = make_path_stack(make_stack, path, tmp_path, big_stream_handler(total, written))
    s = open_stream(st, path, rcvbuf=16384)
    try:
        first = s.recv(1024)  # headers are out: the stream is flowing
        # the client stops reading; wait until the upstream is held back (its writes stop advancing)
        stalled_at, deadline = -1, time.monotonic() + 20
        while written[0] != stalled_at and time.monotonic() < deadline:
            stalled_at = written[0]
            time.sleep(0.4)
        # Kernel buffers (client rcvbuf, gateway sndbuf, gateway rcvbuf, upstream sndbuf) and the
        # gateway's bounded read-ahead hold some MiB (5-9 measured); the rest must wait in the upstream.
        assert written[0] == stalled_at < 24 << 20, (written[0], stalled_at)
        assert st.upstream.completed == 0
        print("upstream wrote", stalled_at >> 20, "MiB before back-pressure stopped it")
        body = dechunk(read_all(s, first=first))
    finally:
        s.close()
    assert written[0] == total
    if path == "translate":
        texts = [json.loads(line[6:])["event"]["delta"]["text"] for line in body.split(b"\n")
                 if line.startswith(b"data: ")]
    else:
        texts = [c["choices"][0]["delta"].get("content") or "" for line in body.split(b"\n")
                 if line.startswith(b"data: {") for c in [json.loads(line[6:])] if c.get("choices")]
    got = "".join(texts)
    assert len(got) == total
    assert got[:8] == "[000000]" and f"[{total // EVENT_TEXT - 1:06d}]" in got[-EVENT_TEXT:]


# ---------------------------------------------------------------------------- vanishing clients


def endless(delay: float = 0.02):
    frames = openai_text_stream([f"w{i} " for i in range(1000)])

    async def handler(request: web.Request, up) -> web.StreamResponse:
        return await stream_frames(request, frames, delay=delay)

    return handler


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("how", ["close", "reset"])
def test_vanishing_client_mid_stream_cancels_upstream(make_stack, tmp_path, path: str, how: str) -> None:
    OPENED.clear()
    st = make_path_stack(make_stack, path, tmp_path, endless(),
                         policy=TRACKED_POLICY.format(input_sleep=0))
    s = open_stream(st, path)
    s.settimeout(10)
    got = b""
    while b"w3 " not in got:  # text is flowing to the client
        got += s.recv(65536)
    if how == "reset":
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    s.close()
    # promptly: the endless upstream would stream for another ~20 s
    assert wait_until(lambda: st.upstream.disconnects == 1, timeout=5), "upstream was not cancelled"
    assert st.upstream.completed == 0
    assert wait_until(lambda: gateway_tasks(st) == [], timeout=3), gateway_tasks(st)
    if path == "gate":
        assert OPENED and all(c.closed for c in OPENED)  # every guard stream check was closed


def test_vanishing_client_during_input_check_cancels_upstream_and_guard(make_stack, tmp_path) -> None:
    """Client gone while the input guard runs (upstream call already in flight, speculatively)."""
    async def slow_headers(request: web.Request, up) -> web.StreamResponse:
        await asyncio.sleep(10)
        return web.json_response({})

    st = make_path_stack(make_stack, "gate", tmp_path, slow_headers,
                         policy=TRACKED_POLICY.format(input_sleep=10))
    s = open_stream(st, "gate")
    assert wait_until(lambda: len(st.upstream.requests) == 1, timeout=3)
    s.close()
    assert wait_until(lambda: st.upstream.disconnects == 1, timeout=3), "upstream was not cancelled"
    # the input guard task and the speculative upstream call are gone too
    assert wait_until(lambda: gateway_tasks(st) == [], timeout=3), gateway_tasks(st)


def test_client_vanishing_repeatedly_leaves_nothing(make_stack, tmp_path) -> None:
    """50 clients that hang up at random points: the gateway ends up with no task and no open upstream."""
    st = make_path_stack(make_stack, "gate", tmp_path, endless(0.002),
                         policy=TRACKED_POLICY.format(input_sleep=0))
    OPENED.clear()
    socks = []
    for i in range(50):
        s = open_stream(st, "gate")
        socks.append(s)
        if i % 5 == 0:
            s.recv(100)
        s.close()
    assert wait_until(lambda: st.upstream.disconnects + st.upstream.completed == len(st.upstream.requests),
                      timeout=10)
    assert wait_until(lambda: gateway_tasks(st) == [], timeout=5), gateway_tasks(st)
    assert all(c.closed for c in OPENED)

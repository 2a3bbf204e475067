"""The fast front (gateway/fastpath.py): what it serves itself, what it hands to aiohttp, and that a
client can't tell the two apart: the same raw request gives the same status, headers and body
bytes with `fast_path: true` and `fast_path: false`."""

from __future__ import annotations

import asyncio
import gzip
import json
import pathlib
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest
from aiohttp import web
from harness import oa_completion, openai_text_stream, raw_http, sse, stream_frames, wait_until

from gateway.fastpath import FastFront
from gateway.upstreams.pool import response_key

MSG = [{"role": "user", "content": "hi"}]
RID = "req-fixed-1"


def front_of(st: Any) -> FastFront:
    fronts = [s.front for r in st.loop.runners for s in r.sites if getattr(s, "front", None) is not None]
    assert len(fronts) == 1
    return fronts[0]


def http(st: Any, data: bytes, timeout: float = 5.0) -> bytes:
    return raw_http(st.url, data, timeout)


def post(path: str, body: Any, headers: bytes = b"", *, close: bool = True) -> bytes:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return (b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + b"X-Request-Id: " + RID.encode() + b"\r\n" + headers
            + b"Content-Length: %d\r\n" % len(raw) + (b"Connection: close\r\n" if close else b"") + b"\r\n" + raw)


def parse_response(resp: bytes) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (lower-cased names, Date dropped) and the de-chunked body."""
    head, _, rest = resp.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        if k.lower() != "date":
            headers[k.lower()] = v.strip()
    if headers.get("transfer-encoding") == "chunked":
        body = b""
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            n = int(size_line, 16)
            if n == 0:
                break
            body, rest = body + rest[:n], rest[n + 2:]
        return status, headers, body
    return status, headers, rest


# ---------------------------------------------------------------------------- upstream scenarios


async def h_gzip(request: web.Request, up: Any) -> web.StreamResponse:
    body = gzip.compress(json.dumps(oa_completion("zipped")).encode())
    return web.Response(body=body, headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})


async def h_429(request: web.Request, up: Any) -> web.StreamResponse:
    return web.json_response({"error": {"message": "slow down", "type": "rate_limit", "code": "rate"}},
                             status=429, headers={"Retry-After": "7", "X-Upstream-Thing": "kept"})


async def h_truncated(request: web.Request, up: Any) -> web.StreamResponse:
    return await stream_frames(request, openai_text_stream(["a", "b"])[:-1])  # no [DONE]


async def h_split(request: web.Request, up: Any) -> web.StreamResponse:
    data = b"".join(openai_text_stream(["one", " two", " three"]))
    return await stream_frames(request, [data[i:i + 7] for i in range(0, len(data), 7)])


async def h_hop(request: web.Request, up: Any) -> web.StreamResponse:
    return web.json_response({"ok": True}, headers={"Connection": "X-Secret-Hop", "X-Secret-Hop": "no",
                                                    "Keep-Alive": "timeout=5", "X-Guardgate-Request-Id": "forged"})


SCENARIOS = {
    "json": (None, post("/v1/chat/completions", {"model": "m", "messages": MSG})),
    "stream": (None, post("/v1/chat/completions", {"model": "m", "messages": MSG, "stream": True})),
    "gzip": (h_gzip, post("/v1/chat/completions", {"model": "m", "messages": MSG})),
    "429": (h_429, post("/v1/chat/completions", {"model": "m", "messages": MSG})),
    "truncated": (h_truncated, post("/v1/chat/completions", {"model": "m", "messages": MSG, "stream": True})),
    "split-events": (h_split, post("/v1/chat/completions", {"model": "m", "messages": MSG, "stream": True})),
    "hop-by-hop": (h_hop, post("/v1/embeddings", {"model": "m", "input": "x"})),
    "models": (None, b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Request-Id: " + RID.encode()
               + b"\r\nConnection: close\r\n\r\n"),
    "bad-json": (None, post("/v1/chat/completions", b'{"model": ')),
    "unknown-model": (None, post("/v1/chat/completions", {"model": "nope", "messages": MSG})),
    "no-key": (None, post("/v1/chat/completions", {"model": "m", "messages": MSG})),
    "llama-stream": (None, post("/llama/v1/chat/completions", {"model": "m", "messages": MSG, "stream": True})),
}


def _config(name: str, fast: bool) -> dict[str, Any]:
    cfg: dict[str, Any] = {"fast_path": fast}
    if name == "unknown-model":
        cfg["upstreams"] = {"main": {"base_url": "SCRIPTED"}}
        cfg["routes"] = [{"model": "m*", "upstream": "main"}]
    if name == "no-key":
        cfg["keys"] = [{"name": "team", "key_env": "GG_FP_TEST_KEY"}]
    return cfg


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_fast_and_aiohttp_paths_answer_alike(make_stack, monkeypatch, name: str) -> None:
    monkeypatch.setenv("GG_FP_TEST_KEY", "gk-secret-1")
    handler, request = SCENARIOS[name]
    answers, seen = [], []
    for fast in (True, False):
        st = make_stack(_config(name, fast), handler=handler)
        answers.append(parse_response(http(st, request)))
        if fast:  # once more: now its head is a remembered one (fastpath._Head), served without parsing,
            # and so is the upstream's answer when it is a plain JSON one (pool.heads)
            assert parse_response(http(st, request)) == answers[0]
            front = front_of(st)
            assert front.served + front.handed_off == 2 and front.known_heads == 1
            pool = st.gateway.upstreams["main"].pool
            assert pool.known_heads == (1 if name in ("json", "429", "hop-by-hop", "models") else 0)
        seen.append([(r.method, r.path, {k.lower(): v for k, v in r.headers.items() if k.lower() not in (
            "host", "x-guardgate-request-id")}, r.body) for r in st.upstream.requests])
    (fs, fh, fb), (ss, sh, sb) = answers
    assert fs == ss and fb == sb, (answers[0], answers[1])
    assert fh == sh, {k: (fh.get(k), sh.get(k)) for k in set(fh) | set(sh) if fh.get(k) != sh.get(k)}
    assert seen[0] == seen[1] * 2  # what the upstream received, too


# ---------------------------------------------------------------------------- remembered heads


def _sent(st: Any) -> list[tuple[str | None, bytes]]:
    return [(r.headers.get("Content-Length"), r.body) for r in st.upstream.requests]


def test_a_remembered_head_frames_each_body_by_its_own_length(stack) -> None:
    """Same head, bodies of other lengths: each is relayed whole with its own Content-Length, from the
    second on without parsing the head."""
    front = front_of(stack)
    bodies = [json.dumps({"model": "m", "messages": [{"role": "user", "content": "x" * n}]}).encode()
              for n in (1, 50, 3, 1000)]
    for body in bodies:
        status, _, out = parse_response(http(stack, post("/v1/chat/completions", body)))
        assert status == 200, out
    assert _sent(stack) == [(str(len(b)), b) for b in bodies]
    assert front.known_heads == 3 and len(front.heads) == 1


def test_a_remembered_head_with_its_body_in_pieces_or_a_second_request_behind(stack) -> None:
    """A known head whose body comes in later reads (httpx writes the head and the body apart) is
    served once the body is in; a known head with a second request behind it in the same read goes
    to the parser (and, pipelined, to aiohttp). All are answered, each body relayed whole."""
    front = front_of(stack)
    body = json.dumps({"model": "m", "messages": MSG}).encode()
    req = post("/v1/chat/completions", body, close=False)
    host, port = stack.url.removeprefix("http://").split(":")
    got = b""
    with socket.create_connection((host, int(port)), timeout=5) as s:
        for part in (req, req[:-30], req[-30:-10], req[-10:], req + post("/v1/chat/completions", body)):
            s.sendall(part)  # the first request makes the head known; then its body in three reads
            time.sleep(0.05)
        while chunk := s.recv(65536):
            got += chunk
    assert got.count(b"HTTP/1.1 200 OK") == 4
    assert _sent(stack) == [(str(len(body)), body)] * 4
    assert front.known_heads == 1 and front.served == 2 and front.handed_off == 1  # pipelined: aiohttp's


# ---------------------------------------------------------------------------- plans per remembered head


def test_a_head_s_plan_is_per_model_and_follows_a_policy_reload(make_stack, tmp_path) -> None:
    """Gateway.plan_relay keeps, per request head and model, the route and the relay decision. Each
    model keeps its own route (and an unknown one its 404, every time); when the policy the plan
    names is reloaded with a step that inspects, the very next request with that head goes to the
    aiohttp path and is guarded."""
    from faults import policy_store

    store, ppath = policy_store(tmp_path, "name: faults\n")  # no step: the byte relay serves it
    routes = [{"model": "a*", "upstream": "a", "policy": "faults"}, {"model": "b*", "upstream": "b"}]
    st = make_stack({"upstreams": {"a": {"base_url": "SCRIPTED"}, "b": {"base_url": "SCRIPTED"}}, "routes": routes},
                    policies=store)
    front, gw = front_of(st), st.gateway
    ask = post("/v1/chat/completions", {"model": "a1", "messages": MSG, "stream": True})
    for _ in range(2):
        assert parse_response(http(st, ask))[0] == 200
        for model, status in (("b1", 200), ("nope", 404)):
            req = post("/v1/chat/completions", {"model": model, "messages": MSG})
            assert parse_response(http(st, req))[0] == status
    assert len(front.heads) == 1  # one head (bar Content-Length) for all
    head = next(iter(front.heads.values()))
    assert set(head.plans) == {"a1", "b1"}  # 404s are never kept
    assert head.plans["a1"].route.upstream == "a" and head.plans["b1"].route.upstream == "b"
    assert front.served == 6 and front.handed_off == 0 and gw.upstreams["b"].pool.in_use == 0

    pathlib.Path(ppath).write_text("name: faults\nstream:\n  steps:\n    - guard: regex\n      patterns: ['Hello']\n"
                           "      action: block\n")
    assert st.loop.run(store.reload()) == []
    status, _, body = parse_response(http(st, ask))
    assert status == 200 and b"Hello there" not in body  # the stream gate held it back
    assert front.handed_off == 1


def test_an_invalid_key_is_refused_every_time_and_never_planned(make_stack, monkeypatch) -> None:
    monkeypatch.setenv("GG_FP_TEST_KEY", "gk-secret-1")
    st = make_stack({"keys": [{"name": "team", "key_env": "GG_FP_TEST_KEY"}]})
    front = front_of(st)
    for token, status in (("gk-wrong", 401), ("gk-secret-1", 200)):
        auth = b"Authorization: Bearer %s\r\n" % token.encode()
        req = post("/v1/chat/completions", {"model": "m", "messages": MSG}, auth)
        for _ in range(3):
            assert parse_response(http(st, req))[0] == status
    plans = sorted(len(h.plans) for h in front.heads.values())
    assert plans == [0, 1] and front.known_heads == 4


# ---------------------------------------------------------------------------- remembered response heads


class RawUpstream:
    """An upstream that answers the i-th request (over all connections) with the exact bytes of
    `answer(i)`: a list of parts, each its own write, 50 ms apart."""

    def __init__(self, answer: Callable[[int], list[bytes]]) -> None:
        self.answer = answer
        self.n = 0
        self.connections = 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        with conn:
            while True:
                while b"\r\n\r\n" not in buf:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                head, _, buf = buf.partition(b"\r\n\r\n")
                length = next((int(v) for k, _, v in (x.partition(b":") for x in head.split(b"\r\n")[1:])
                               if k.strip().lower() == b"content-length"), 0)
                while len(buf) < length:
                    buf += conn.recv(65536)
                buf = buf[length:]
                i, self.n = self.n, self.n + 1
                for k, part in enumerate(self.answer(i)):
                    if k:
                        time.sleep(0.05)
                    conn.sendall(part)


def answer(body: bytes, i: int, extra: bytes = b"") -> bytes:
    """A JSON answer whose head differs from the last one's in its Date and Content-Length alone."""
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nDate: Thu, 26 Nov 2026 10:00:%02d GMT\r\n"
            b"Content-Length: %d\r\nX-Upstream-Thing: kept\r\n%s\r\n" % (i % 60, len(body), extra) + body)


def test_response_key_cuts_out_the_length_digits_and_the_date() -> None:
    a, b = answer(b"{}", 1), answer(b'{"a": 12345}', 2)
    ka, kb = response_key(a, a.index(b"\r\n\r\n")), response_key(b, b.index(b"\r\n\r\n"))
    assert ka is not None and kb is not None and ka[0] == kb[0] and (ka[1], kb[1]) == (2, 12)
    assert ka[0] == (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nDate:", b"\r\nContent-Length: ",
                     b"\r\nX-Upstream-Thing: kept")
    two = answer(b"{}", 1, b"Content-Length: 2\r\n")  # a second length stays in the key: never a match
    assert response_key(two, two.index(b"\r\n\r\n"))[0] != ka[0]  # type: ignore[index]
    assert response_key(b"HTTP/1.1 204 No Content\r\nDate: x\r\n\r\n", 36) is None


def _json_bodies(n: int) -> list[bytes]:
    return [json.dumps(oa_completion("x" * (i * 37 % 101))).encode() for i in range(n)]


def test_a_remembered_response_head_frames_each_body_by_its_own_length(make_stack) -> None:
    """Answers with one head bar Date and Content-Length, bodies of other lengths: from the second on
    they are served from the remembered head, each body whole with its own length, the upstream's
    other headers kept, its Date and length replaced."""
    bodies = _json_bodies(5)
    up = RawUpstream(lambda i: [answer(bodies[i], i)])
    st = make_stack({"upstreams": {"main": {"base_url": up.url}}})
    with httpx.Client(base_url=st.url + "/v1") as c:
        for body in bodies:
            r = c.post("/chat/completions", json={"model": "m", "messages": MSG})
            assert r.status_code == 200 and r.content == body
            assert r.headers["content-length"] == str(len(body)) and r.headers["x-upstream-thing"] == "kept"
            assert "10:00" not in r.headers["date"] and r.headers["x-guardgate-request-id"]
    pool = st.gateway.upstreams["main"].pool
    assert pool.known_heads == 4 and len(pool.heads) == 1 and up.connections == 1


@pytest.mark.parametrize("case", ["close", "head-then-body", "interim", "per-answer-id", "chunked", "two-answers",
                                  "shouted-length"])
def test_response_heads_that_are_not_served_from_memory(make_stack, monkeypatch, case: str) -> None:
    """The parser frames these (they are never remembered, or a read holds more than one whole answer),
    and each client still gets its answer exactly. A pool that has seen HEADS_MAX heads (here 3) that
    differ (a hosted API's per-answer ids) forgets them and stops remembering."""
    monkeypatch.setattr("gateway.upstreams.pool.HEADS_MAX", 3)
    bodies = _json_bodies(4)

    def respond(i: int) -> list[bytes]:
        body = bodies[i]
        if case == "close":
            return [answer(body, i, b"Connection: close\r\n")]
        if case == "head-then-body":
            whole = answer(body, i)
            return [whole[:-len(body)], whole[-len(body):]]
        if case == "interim":  # with a length that frames the final answer as if it were a body
            final = answer(body, i)
            return [b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\nContent-Length: %d\r\n\r\n" % len(final) + final]
        if case == "per-answer-id":
            return [answer(body, i, b"X-Request-Id: up-%d\r\n" % i)]
        if case == "shouted-length":  # a spelling the key does not cut: the whole head is the key, no length
            return [answer(body, i).replace(b"Content-Length", b"CONTENT-LENGTH")]
        if case == "chunked":
            return [b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)]
        return [answer(body, i) + (answer(b"{}", i) if i == 2 else b"")]  # two-answers: one too many

    up = RawUpstream(respond)
    st = make_stack({"upstreams": {"main": {"base_url": up.url}}})
    pool = st.gateway.upstreams["main"].pool
    with httpx.Client(base_url=st.url + "/v1") as c:
        for body in bodies:
            r = c.post("/chat/completions", json={"model": "m", "messages": MSG})
            assert r.status_code == 200 and r.content == body
    if case == "two-answers":  # remembered after the 1st, served so the 2nd; the 3rd read holds two answers:
        # parsed, and the connection dropped for the extra one; the 4th, on a new one, served so again
        assert pool.known_heads == 2 and up.connections == 2
    elif case == "per-answer-id":
        assert pool.known_heads == 0 and not pool.heads and not pool.remembering
    else:
        assert pool.known_heads == 0 and not pool.heads
        assert up.connections == (4 if case == "close" else 1)


def test_a_request_head_that_spells_its_length_otherwise_is_served_but_not_remembered(stack) -> None:
    front = front_of(stack)
    bodies = [json.dumps({"model": "m", "messages": [{"role": "user", "content": "x" * n}]}).encode() for n in (1, 30)]
    for body in bodies:
        req = post("/v1/chat/completions", body).replace(b"Content-Length", b"CONTENT-LENGTH")
        assert parse_response(http(stack, req))[0] == 200
    assert front.heads == {} and front.known_heads == 0 and front.served == 2
    assert _sent(stack) == [(str(len(b)), b) for b in bodies]


@pytest.mark.parametrize("tweak", ["two-lengths", "over-limit", "long-head"])
def test_a_remembered_head_does_not_bypass_the_parser_s_checks(make_stack, tweak: str) -> None:
    """A head with two Content-Lengths is never remembered (aiohttp refuses each such request); a known
    head whose length is over the body limit goes to aiohttp too (413); a head over 4 KiB is served
    but not remembered (the memory they take stays small)."""
    st = make_stack({"limits": {"max_body_bytes": 1000}})
    front = front_of(st)
    body = json.dumps({"model": "m", "messages": MSG}).encode()
    if tweak == "two-lengths":
        req = post("/v1/chat/completions", body, b"Content-Length: %d\r\n" % len(body))
        for _ in range(2):
            assert parse_response(http(st, req))[0] == 400
        assert front.heads == {} and front.handed_off == 2
    elif tweak == "long-head":
        req = post("/v1/chat/completions", body, b"X-Pad: %s\r\n" % (b"p" * 4096))
        for _ in range(2):
            assert parse_response(http(st, req))[0] == 200
        assert front.heads == {} and front.served == 2
    else:
        assert parse_response(http(st, post("/v1/chat/completions", body)))[0] == 200
        big = json.dumps({"model": "m", "messages": MSG, "pad": "x" * 1000}).encode()
        assert parse_response(http(st, post("/v1/chat/completions", big)))[0] == 413
        assert front.known_heads == 0 and front.handed_off == 1
    assert len(st.upstream.requests) == {"two-lengths": 0, "over-limit": 1, "long-head": 2}[tweak]


def test_relay_requests_are_served_by_the_front_on_one_connection(stack) -> None:
    """Keep-alive: several requests, one client connection, all served without aiohttp."""
    front = front_of(stack)
    with httpx.Client(base_url=stack.url + "/v1") as c:
        for i in range(5):
            r = c.post("/chat/completions", json={"model": "m", "messages": MSG, "stream": i % 2 == 1})
            assert r.status_code == 200 and r.headers["x-guardgate-request-id"]
        assert len(front.conns) == 1  # one keep-alive connection, still ours
    assert front.served == 5 and front.handed_off == 0


def test_sdk_through_the_front(stack) -> None:
    client = stack.openai()
    assert client.chat.completions.create(model="m", messages=MSG).choices[0].message.content == "Hello there!"
    text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="m", messages=MSG, stream=True) if c.choices)
    assert text == "Hello there!"
    long = [{"role": "user", "content": "a longer question " * 20}]
    assert client.chat.completions.create(model="m", messages=long).choices[0].message.content == "Hello there!"
    front = front_of(stack)
    assert front.served == 3
    assert front.known_heads == 2  # the SDK's head repeats (bar Content-Length): parsed once
    assert [len(r.body) for r in stack.upstream.requests] == [int(r.headers["Content-Length"])
                                                              for r in stack.upstream.requests]


@pytest.mark.parametrize("request_bytes", [
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",  # not a dialect route
    b"GET /v1/models HTTP/1.0\r\nHost: x\r\n\r\n",  # HTTP/1.0
    b"GET /v1/mod%65ls HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",  # percent-escapes
    b"DELETE /v1/files/1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",  # other methods
    b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    b"2\r\n{}\r\n0\r\n\r\n",  # chunked request body
    b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nExpect: 100-continue\r\n"
    b"Connection: close\r\n\r\n{}",
])
def test_what_the_front_hands_to_aiohttp(stack, request_bytes: bytes) -> None:
    status, _, _ = parse_response(http(stack, request_bytes))
    assert status in (100, 200, 404)  # 100: aiohttp answers Expect first
    front = front_of(stack)
    assert front.handed_off == 1 and front.served == 0


def test_guarded_and_translated_requests_go_to_aiohttp(make_stack, tmp_path) -> None:
    from faults import REGEX_POLICY, policy_store

    store, ppath = policy_store(tmp_path, REGEX_POLICY)
    st = make_stack({"policy": ppath}, policies=store)
    st.openai().chat.completions.create(model="m", messages=MSG)
    assert front_of(st).handed_off == 1 and front_of(st).served == 0
    st2 = make_stack()
    st2.llama().chat.completions.create(model="m", messages=MSG)  # llama client, openai upstream
    assert front_of(st2).handed_off == 1 and front_of(st2).served == 0


def test_pipelined_requests_answered_in_order(stack) -> None:
    one = post("/v1/embeddings", {"model": "m", "input": "first"}, close=False)
    two = post("/v1/embeddings", {"model": "m", "input": "second"})
    resp = http(stack, one + two)
    assert resp.count(b"HTTP/1.1 200") == 2
    assert resp.index(b'"first"') < resp.index(b'"second"')


def test_a_stale_pooled_upstream_connection_is_retried_once(make_stack) -> None:
    """The upstream drops a reused keep-alive connection without answering (as a server does when
    its idle timeout fires just as the request arrives): the request goes out once more on a fresh
    connection and the client sees nothing of it. A fresh connection that fails is not retried."""
    calls: list[int] = []

    async def drop_second(request: web.Request, up: Any) -> web.StreamResponse:
        calls.append(request.transport.get_extra_info("peername")[1])
        if len(calls) == 2:  # the second request, on the pooled connection: hang up
            request.transport.close()
            raise asyncio.CancelledError
        return web.json_response(oa_completion("ok"))

    st = make_stack(handler=drop_second)
    client = st.openai(max_retries=0)
    pool = st.gateway.upstreams["main"].pool
    assert client.chat.completions.create(model="m", messages=MSG).choices[0].message.content == "ok"
    assert wait_until(lambda: len(pool._idle) == 1)
    assert client.chat.completions.create(model="m", messages=MSG).choices[0].message.content == "ok"
    assert len(calls) == 3 and calls[0] == calls[1] != calls[2]  # pooled, dropped, then a fresh connection


def test_client_gone_mid_stream_closes_the_upstream(make_stack) -> None:
    async def slow(request: web.Request, up: Any) -> web.StreamResponse:
        return await stream_frames(request, [sse({"choices": []})] * 100, delay=0.05)

    st = make_stack(handler=slow)
    host, port = st.url.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)))
    s.sendall(post("/v1/chat/completions", {"model": "m", "messages": MSG, "stream": True}))
    assert s.recv(100).startswith(b"HTTP/1.1 200")
    s.close()
    assert wait_until(lambda: st.upstream.disconnects == 1)
    assert front_of(st).served == 1
    pool = st.gateway.upstreams["main"].pool
    assert wait_until(lambda: not pool._open)


def test_metrics_count_fast_requests(stack) -> None:
    stack.openai().chat.completions.create(model="m", messages=MSG)
    text = httpx.get(stack.url + "/metrics").text
    line = [x for x in text.splitlines() if x.startswith("guardgate_requests_total{")
            and 'route="/v1/chat/completions"' in x]
    assert line and line[0].endswith(" 1.0") and 'status="200"' in line[0]


def test_upstream_unreachable_is_a_502_in_the_dialect(make_stack) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    st = make_stack({"upstreams": {"main": {"base_url": f"http://127.0.0.1:{dead}/v1", "timeouts": {"connect": 1}}}})
    with pytest.raises(openai.APIStatusError) as ei:
        st.openai(max_retries=0).chat.completions.create(model="m", messages=MSG)
    assert ei.value.status_code == 502 and ei.value.code == "upstream_unreachable"
    assert front_of(st).served == 1


def test_shutdown_lets_a_fast_stream_finish(make_stack) -> None:
    async def slow(request: web.Request, up: Any) -> web.StreamResponse:
        return await stream_frames(request, openai_text_stream(["a", "b", "c"]), delay=0.2)

    st = make_stack({"shutdown_grace_s": 5}, handler=slow)
    host, port = st.url.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)), timeout=5)
    s.sendall(post("/v1/chat/completions", {"model": "m", "messages": MSG, "stream": True}))
    assert s.recv(20).startswith(b"HTTP/1.1 200")
    front = front_of(st)
    fut = asyncio.run_coroutine_threadsafe(front.shutdown(5), st.loop.loop)
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    fut.result(5)
    assert b"data: [DONE]" in out and out.endswith(b"0\r\n\r\n")

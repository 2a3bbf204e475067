"""Upstream faults on every gateway path (issue 9): what the user's SDK sees, and that the
gateway lets go of the upstream and of its own tasks.

Paths: relay (byte relay), gate (decoded + regex stream step), translate (llama client ↔ openai
upstream). See tests/faults.py for the scripted faults.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import llama_api_client
import openai
import pytest
from aiohttp import web
from faults import (
    FULL,
    MSG,
    PATHS,
    big_event_frames,
    big_text,
    frames,
    gateway_tasks,
    h_drip,
    h_frames,
    h_reset,
    h_stall,
    h_status,
    make_path_stack,
    malformed_frames,
    read_stream,
    rst,
    truncated_at_boundary,
    truncated_mid_event,
)
from harness import oa_completion, stream_frames, wait_until
from waits import Hold


def no_leaks(st) -> None:
    """Every per-request task of the gateway (and the scripted upstream) has ended."""
    assert wait_until(lambda: gateway_tasks(st) == [], timeout=3), gateway_tasks(st)


def assert_clean_error(out, codes: set[str]) -> None:
    """The SDK raised its own API error (not a transport error), in the client's dialect."""
    assert out.error is not None, f"no error; text={out.text!r} finish={out.finish}"
    assert isinstance(out.error, (openai.APIError, llama_api_client.APIError))
    assert not isinstance(out.error, (openai.APIConnectionError, llama_api_client.APIConnectionError))
    assert out.code in codes, out.code
    assert FULL.startswith(out.text)  # what came before the fault is intact, nothing after it
    assert out.finish is None


# ---------------------------------------------------------------------------- mid-stream failures


@pytest.mark.parametrize("path", PATHS)
def test_reset_mid_stream(make_stack, tmp_path, path: str) -> None:
    st = make_path_stack(make_stack, path, tmp_path, h_reset())
    out = read_stream(st, path)
    assert_clean_error(out, {"upstream_error"})
    no_leaks(st)


@pytest.mark.parametrize("path", PATHS)
def test_stall_hits_read_timeout_and_cancels_upstream(make_stack, tmp_path, path: str) -> None:
    st = make_path_stack(make_stack, path, tmp_path, h_stall(), read_timeout=0.5)
    t0 = time.monotonic()
    out = read_stream(st, path)
    assert time.monotonic() - t0 < 15  # the 0.5 s read timeout, not the 30 s stall
    assert_clean_error(out, {"upstream_error"})
    # the gateway hung up on the stalled upstream: its handler was cancelled, not left sleeping 30 s
    assert wait_until(lambda: st.upstream.disconnects == 1, timeout=3)
    no_leaks(st)


@pytest.mark.parametrize("path", PATHS)
def test_slow_drip_is_delivered_whole(make_stack, tmp_path, path: str) -> None:
    st = make_path_stack(make_stack, path, tmp_path, h_drip(size=16, delay=0.001), read_timeout=1)
    out = read_stream(st, path)
    assert out.error is None
    assert out.text == FULL and out.finish == "stop"
    no_leaks(st)


def test_slow_drip_relay_is_byte_exact(make_stack, tmp_path) -> None:
    st = make_path_stack(make_stack, "relay", tmp_path, h_drip(size=1, delay=0.0))
    r = httpx.post(st.url + "/v1/chat/completions", json={"model": "m", "messages": MSG, "stream": True})
    assert r.content == b"".join(frames())


@pytest.mark.parametrize("path", PATHS)
def test_malformed_sse_event(make_stack, tmp_path, path: str) -> None:
    st = make_path_stack(make_stack, path, tmp_path, h_frames(malformed_frames()))
    if path == "relay":
        # The relay does not parse: the upstream's bytes reach the client exactly, then a clean end.
        r = httpx.post(st.url + "/v1/chat/completions", json={"model": "m", "messages": MSG, "stream": True},
                       timeout=10)
        assert r.content == b"".join(malformed_frames())
    else:
        out = read_stream(st, path)
        assert_clean_error(out, {"bad_upstream_response"})
        assert wait_until(lambda: st.upstream.completed + st.upstream.disconnects == 1)
    no_leaks(st)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.slow
def test_large_event_within_limit_passes(make_stack, tmp_path, path: str) -> None:
    st = make_path_stack(make_stack, path, tmp_path, h_frames(big_event_frames(2 << 20)))
    out = read_stream(st, path, timeout=30)
    assert out.error is None and out.finish == "stop"
    assert out.text == "tok0 tok1 " + big_text(2 << 20) + "tok2 tok3 "


@pytest.mark.parametrize("path", PATHS)
def test_oversized_event_is_a_clean_error(make_stack, tmp_path, path: str) -> None:
    st = make_path_stack(make_stack, path, tmp_path, h_frames(big_event_frames(17 << 20)))
    t0 = time.monotonic()
    out = read_stream(st, path, timeout=30)
    assert time.monotonic() - t0 < 10
    assert_clean_error(out, {"upstream_event_too_large"})
    no_leaks(st)


@pytest.mark.parametrize("path", PATHS)
def test_eof_inside_an_event(make_stack, tmp_path, path: str) -> None:
    st = make_path_stack(make_stack, path, tmp_path, h_frames(truncated_mid_event()))
    out = read_stream(st, path)
    assert_clean_error(out, {"upstream_error", "upstream_truncated"})
    no_leaks(st)


@pytest.mark.parametrize("path", PATHS)
def test_eof_without_terminator(make_stack, tmp_path, path: str) -> None:
    """Whole events, then a clean EOF with no finish and no [DONE]: the SDK alone would end quietly
    (wire_formats §0.5), so the gateway must make the cut visible."""
    st = make_path_stack(make_stack, path, tmp_path, h_frames(truncated_at_boundary()))
    out = read_stream(st, path)
    assert_clean_error(out, {"upstream_error", "upstream_truncated"})
    no_leaks(st)


# ---------------------------------------------------------------------------- error statuses


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("status", [500, 502, 503])
def test_upstream_5xx(make_stack, tmp_path, path: str, status: int) -> None:
    st = make_path_stack(make_stack, path, tmp_path, h_status(status))
    out = read_stream(st, path)
    assert out.error is not None and getattr(out.error, "status_code", None) == status
    if path == "gate":  # under a policy that checks answers, the upstream's words are replaced (#30)
        assert out.code == "upstream_error" and f"upstream answered HTTP {status}" in str(out.error)
    else:
        assert out.code == f"up{status}"
        assert "upstream failed" in str(out.error)
    assert len(st.upstream.requests) == 1  # max_retries=0: no retry storm from the gateway either


@pytest.mark.parametrize("path", PATHS)
def test_upstream_5xx_html_body(make_stack, tmp_path, path: str) -> None:
    st = make_path_stack(make_stack, path, tmp_path, h_status(502, body="<html><body>Bad Gateway</body></html>"))
    out = read_stream(st, path)
    assert out.error is not None and getattr(out.error, "status_code", None) == 502


@pytest.mark.parametrize("path", PATHS)
def test_upstream_429_retry_after(make_stack, tmp_path, path: str) -> None:
    st = make_path_stack(make_stack, path, tmp_path,
                         h_status(429, headers={"Retry-After": "3", "retry-after-ms": "3000"}))
    out = read_stream(st, path)
    assert isinstance(out.error, (openai.RateLimitError, llama_api_client.RateLimitError))
    assert out.error.response.headers["retry-after"] == "3"
    assert out.error.response.headers["retry-after-ms"] == "3000"
    assert out.code == ("upstream_error" if path == "gate" else "up429")


# ---------------------------------------------------------------------------- non-stream bodies


def h_json_then(fault: str):
    """A JSON answer whose body breaks half-way (reset) or never finishes (stall)."""

    async def handler(request: web.Request, up) -> web.StreamResponse:
        body = __import__("json").dumps(oa_completion("hello " * 200)).encode()
        resp = web.StreamResponse(headers={"Content-Type": "application/json", "Content-Length": str(len(body))})
        await resp.prepare(request)
        await resp.write(body[: len(body) // 2])
        await asyncio.sleep(0.05)
        if fault == "reset":
            rst(request)
        else:
            await asyncio.sleep(30)
        return resp

    return handler


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("fault,status", [("reset", 502), ("stall", 504)])
def test_non_stream_body_fault(make_stack, tmp_path, path: str, fault: str, status: int) -> None:
    st = make_path_stack(make_stack, path, tmp_path, h_json_then(fault), read_timeout=0.5)
    if path == "translate":
        with pytest.raises(llama_api_client.APIStatusError) as ei:
            st.llama().chat.completions.create(model="m", messages=MSG)
        assert ei.value.body["error"]["code"].startswith("upstream")
    else:
        with pytest.raises(openai.APIStatusError) as ei:
            st.openai().chat.completions.create(model="m", messages=MSG)
        assert ei.value.code.startswith("upstream")
    assert ei.value.status_code in (502, 504)
    if path == "relay":
        assert ei.value.status_code == status
    no_leaks(st)


# ---------------------------------------------------------------------------- connection reuse


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("late_eof", [False, True])
def test_upstream_connection_reused_after_a_clean_stream(make_stack, tmp_path, path: str, late_eof: bool) -> None:
    """A stream that ended cleanly hands its upstream connection back to the pool (no new TCP or TLS
    handshake per request, no reset seen by the upstream) on every path: also when the body's end
    comes well after [DONE] and the client (the SDKs do) hangs up at [DONE]; the client is not kept
    waiting for that end either (late_eof: the upstream ends its body only once the client has read
    the whole answer)."""
    ports: list[int] = []
    holds: list[Hold] = []
    eof_on_release: list[bool] = []

    async def handler(request: web.Request, up) -> web.StreamResponse:
        ports.append(request.transport.get_extra_info("peername")[1])
        resp = await stream_frames(request, frames(), eof=False)
        if late_eof:
            eof_on_release.append(await holds[len(ports) - 1].wait(timeout=10))
        await resp.write_eof()
        return resp

    st = make_path_stack(make_stack, path, tmp_path, handler)
    for i in range(3):
        holds.append(Hold())
        out = read_stream(st, path)  # returns before the upstream's end when late_eof
        holds[i].release()
        assert out.error is None and out.text == FULL
        assert wait_until(lambda i=i: st.upstream.completed == i + 1)
    assert eof_on_release == ([True] * 3 if late_eof else [])
    assert st.upstream.disconnects == 0
    assert len(set(ports)) == 1, ports
    no_leaks(st)

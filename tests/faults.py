"""Fault injection for the reliability tests: scripted upstream faults, the three gateway paths,
and one way to read a stream through the real SDKs whatever the client's dialect.

Paths (each a real gateway in front of a scripted OpenAI-dialect upstream):
  relay      openai SDK → /v1 → openai upstream, no policy: the byte relay
  gate       openai SDK → /v1 → openai upstream, policy with a regex stream step: decoded + stream gate
  translate  llama-api-client → /llama/v1 → openai upstream: decoded + re-encoded in the other dialect
"""

from __future__ import annotations

import asyncio
import socket
import struct
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import llama_api_client
import openai
from aiohttp import web
from harness import openai_text_stream, sse, stream_frames

PATHS = ("relay", "gate", "translate")
WORDS = [f"tok{i} " for i in range(40)]
FULL = "".join(WORDS)
MSG = [{"role": "user", "content": "tell me"}]

REGEX_POLICY = """
name: faults
stream:
  check_every_tokens: 8
  max_unchecked_tokens: 0
  steps:
    - guard: regex
      patterns: ["(?i)forbidden phrase"]
      action: block
"""


def policy_store(tmp_path: Path, body: str = REGEX_POLICY) -> tuple[Any, str]:
    from gateway.policy.chain import PolicyStore

    p = tmp_path / "faults-policy.yaml"
    p.write_text(textwrap.dedent(body).lstrip())
    return PolicyStore(required=[str(p)]), str(p)


def make_path_stack(make_stack: Callable[..., Any], path: str, tmp_path: Path, handler: Any, *,
                    read_timeout: float = 5.0, policy: str = REGEX_POLICY, audit: Any = None) -> Any:
    """A gateway for `path` whose openai-dialect upstream answers with `handler`."""
    up = {"main": {"base_url": "SCRIPTED", "dialect": "openai", "timeouts": {"connect": 2, "read": read_timeout}}}
    if path == "gate":
        store, ppath = policy_store(tmp_path, policy)
        return make_stack({"upstreams": up, "policy": ppath}, handler=handler, policies=store, audit=audit)
    return make_stack({"upstreams": up}, handler=handler)


# ---------------------------------------------------------------------------- reading a stream


@dataclass
class Outcome:
    """What a user's `for chunk in stream` loop saw."""

    text: str = ""
    finish: str | None = None  # finish_reason (openai) / stop_reason (llama)
    error: BaseException | None = None
    code: str | None = None  # error code the SDK exposes
    chunks: int = 0
    extra: list[Any] = field(default_factory=list)


def read_stream(st: Any, path: str, *, timeout: float = 20.0, **kw: Any) -> Outcome:
    """Stream one chat completion through the SDK of the path's client dialect."""
    out = Outcome()
    if path == "translate":
        client = st.llama(timeout=timeout)
        try:
            for c in client.chat.completions.create(model="m", messages=MSG, stream=True, **kw):
                out.chunks += 1
                ev = c.event
                out.text += ev.delta.text if ev.delta is not None and ev.delta.type == "text" else ""
                if ev.event_type == "complete":
                    out.finish = ev.stop_reason
        except llama_api_client.APIError as e:
            out.error = e
            body = e.body if isinstance(e.body, dict) else {}
            err = body.get("error") if isinstance(body.get("error"), dict) else body
            out.code = err.get("code") if isinstance(err, dict) else None
        finally:
            client.close()
        return out
    client = st.openai(timeout=timeout)
    try:
        for c in client.chat.completions.create(model="m", messages=MSG, stream=True, **kw):
            out.chunks += 1
            if c.choices:
                out.text += c.choices[0].delta.content or ""
                if c.choices[0].finish_reason:
                    out.finish = c.choices[0].finish_reason
    except openai.APIError as e:
        out.error = e
        out.code = e.code
    finally:
        client.close()
    return out


# ---------------------------------------------------------------------------- upstream faults


def frames(words: list[str] = WORDS) -> list[bytes]:
    return openai_text_stream(words, usage=True)


def rst(request: web.Request) -> None:
    """Drop the connection with a TCP RST (SO_LINGER 0), as a crashed upstream host would."""
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    if request.transport is not None:
        request.transport.abort()


def h_reset(after: int = 6) -> Any:
    async def handler(request: web.Request, up: Any) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        fs = frames()
        for f in fs[:after]:
            await resp.write(f)
        await resp.write(fs[after][:9])  # half an event, then the wire dies
        await asyncio.sleep(0.05)
        rst(request)
        return resp

    return handler


def h_stall(after: int = 6, sleep: float = 30.0) -> Any:
    async def handler(request: web.Request, up: Any) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for f in frames()[:after]:
            await resp.write(f)
        await asyncio.sleep(sleep)  # cancelled when the gateway gives up and disconnects
        return resp

    return handler


def h_drip(size: int = 5, delay: float = 0.001) -> Any:
    async def handler(request: web.Request, up: Any) -> web.StreamResponse:
        blob = b"".join(frames())
        return await stream_frames(request, [blob[i:i + size] for i in range(0, len(blob), size)], delay=delay)

    return handler


def h_status(status: int, headers: dict[str, str] | None = None, body: Any = None) -> Any:
    async def handler(request: web.Request, up: Any) -> web.StreamResponse:
        b = body if body is not None else {"error": {"message": f"upstream failed with {status}",
                                                     "type": "server_error", "param": None, "code": f"up{status}"}}
        if isinstance(b, (bytes, str)):
            return web.Response(body=b, status=status, headers=headers, content_type="text/html")
        return web.json_response(b, status=status, headers=headers)

    return handler


def h_frames(fs: list[bytes], eof: bool = True) -> Any:
    async def handler(request: web.Request, up: Any) -> web.StreamResponse:
        return await stream_frames(request, fs, eof=eof)

    return handler


def malformed_frames() -> list[bytes]:
    fs = frames()
    return [*fs[:5], b"data: {\"id\": oops not json\n\n", *fs[5:]]


def big_event_frames(n_bytes: int) -> list[bytes]:
    """A normal stream whose middle delta carries `n_bytes` of text in one event."""
    fs = frames(WORDS[:4])
    from harness import oa_chunk

    return [*fs[:3], sse(oa_chunk({"content": big_text(n_bytes)})), *fs[3:]]


def big_text(n: int) -> str:
    return ("lorem ipsum dolor sit amet " * (n // 27 + 1))[:n]


def truncated_mid_event() -> list[bytes]:
    fs = frames()
    return [*fs[:6], fs[6][:12]]  # clean EOF inside an event


def truncated_at_boundary() -> list[bytes]:
    fs = frames()
    return fs[:10]  # whole events, but no finish chunk and no [DONE]


# ---------------------------------------------------------------------------- loop introspection


PERMANENT = {"RequestHandler.start", "PolicyStore._watch"}  # idle keep-alive loops; the policy file watcher


def gateway_tasks(st: Any) -> list[str]:
    """Tasks alive in the servers' loop, minus idle keep-alive connection loops."""

    async def snap() -> list[str]:
        me = asyncio.current_task()
        out = []
        for t in asyncio.all_tasks():
            if t is me:
                continue
            name = getattr(t.get_coro(), "__qualname__", repr(t.get_coro()))
            if name in PERMANENT:
                continue
            out.append(name)
        return out

    return st.loop.run(snap())

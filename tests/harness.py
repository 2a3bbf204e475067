"""Test harness: a real scripted upstream and a real gateway, each an aiohttp server on loopback.

Both run in a background thread with its own event loop, so the sync SDK clients (which block)
and the async ones (in pytest's loop) both talk to them over real TCP, as a user would.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from waits import wait_until  # noqa: F401  (re-exported: tests import it from the harness)

from gateway.cli import serve_loop_policy

# ---------------------------------------------------------------------------- SSE scenarios

CHUNK_ID = "chatcmpl-abc123"
CREATED = 1700000000


def oa_chunk(delta: dict[str, Any], finish: str | None = None, *, model: str = "gpt-test",
             usage: Any = "absent", index: int = 0) -> dict[str, Any]:
    c: dict[str, Any] = {"id": CHUNK_ID, "object": "chat.completion.chunk", "created": CREATED, "model": model,
                         "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}]}
    if usage != "absent":
        c["usage"] = usage
    return c


def oa_usage_chunk(prompt: int, completion: int, model: str = "gpt-test") -> dict[str, Any]:
    return {"id": CHUNK_ID, "object": "chat.completion.chunk", "created": CREATED, "model": model, "choices": [],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                      "total_tokens": prompt + completion}}


def sse(obj: Any, eol: str = "\n") -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
    return f"data: {data}{eol}{eol}".encode()


def openai_text_stream(pieces: list[str], *, usage: bool = False, eol: str = "\n",
                       keepalive: bool = False) -> list[bytes]:
    """Frames of a plain OpenAI chat stream that says `pieces` in order."""
    frames = [sse(oa_chunk({"role": "assistant", "content": "", "refusal": None}), eol)]
    for i, p in enumerate(pieces):
        if keepalive and i % 3 == 1:
            frames.append(f": keep-alive{eol}{eol}".encode())
        frames.append(sse(oa_chunk({"content": p}), eol))
    frames.append(sse(oa_chunk({}, "stop"), eol))
    if usage:
        frames.append(sse(oa_usage_chunk(11, len(pieces)), eol))
    frames.append(sse("[DONE]", eol))
    return frames


def split_bytes(frames: list[bytes], size: int) -> list[bytes]:
    """Re-cut a byte stream into TCP-sized pieces that ignore event boundaries."""
    blob = b"".join(frames)
    return [blob[i:i + size] for i in range(0, len(blob), size)]


def oa_completion(text: str, model: str = "gpt-test", finish: str = "stop") -> dict[str, Any]:
    return {"id": "chatcmpl-xyz", "object": "chat.completion", "created": CREATED, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                         "logprobs": None, "finish_reason": finish}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}}


# ---------------------------------------------------------------------------- scripted upstream

Handler = Callable[[web.Request, "ScriptedUpstream"], Awaitable[web.StreamResponse]]


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    target: str = ""  # the raw request target, as it came on the wire

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class ScriptedUpstream:
    """An aiohttp server whose answers a test scripts: exact bytes, timing and faults."""

    handler: Handler | None = None
    requests: list[Recorded] = field(default_factory=list)
    disconnects: int = 0
    completed: int = 0
    port: int = 0

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.requests.append(Recorded(request.method, request.path, dict(request.headers), body, request.raw_path))
        try:
            resp = await (self.handler or default_handler)(request, self)
            self.completed += 1
            return resp
        except (asyncio.CancelledError, ConnectionResetError):
            self.disconnects += 1
            raise

    @property
    def last(self) -> Recorded:
        return self.requests[-1]


async def default_handler(request: web.Request, up: ScriptedUpstream) -> web.StreamResponse:
    """Echo-ish OpenAI upstream: models list, chat (stream or not), anything else as JSON."""
    if request.path.endswith("/models"):
        return web.json_response({"object": "list", "data": [
            {"id": "gpt-test", "object": "model", "created": CREATED, "owned_by": "test"}]})
    body = up.last.json() if up.last.body else {}
    if request.path.endswith("/chat/completions"):
        if body.get("stream"):
            inc = (body.get("stream_options") or {}).get("include_usage", False)
            return await stream_frames(request, openai_text_stream(["Hello", " there", "!"], usage=inc))
        return web.json_response(oa_completion("Hello there!"))
    return web.json_response({"object": "echo", "path": request.path, "body": body})


async def stream_frames(request: web.Request, pieces: list[bytes], delay: float = 0.0,
                        headers: dict[str, str] | None = None, eof: bool = True,
                        response: web.StreamResponse | None = None) -> web.StreamResponse:
    """Write `pieces` as an event stream (`delay` seconds apart: a scripted slow upstream); `response`
    goes on with one already started (e.g. by an earlier call with eof=False)."""
    resp = response
    if resp is None:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", **(headers or {})})
        await resp.prepare(request)
    for p in pieces:
        await resp.write(p)
        if delay:
            await asyncio.sleep(delay)
    if eof:
        await resp.write_eof()
    return resp


# ---------------------------------------------------------------------------- servers in a thread


class Loop:
    """An event loop in a daemon thread, for servers the tests talk to over TCP."""

    def __init__(self) -> None:
        self.loop = serve_loop_policy().new_event_loop()  # the loop `guardgate serve` runs
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.runners: list[web.AppRunner] = []

    def run(self, coro: Awaitable[Any], timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)  # type: ignore[arg-type]

    def serve(self, app: web.Application, **runner_kw: Any) -> int:
        async def start() -> int:
            runner = web.AppRunner(app, handler_cancellation=True, access_log=None, **runner_kw)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            self.runners.append(runner)
            return site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

        return self.run(start())

    def close(self) -> None:
        async def stop() -> None:
            for r in reversed(self.runners):
                await r.cleanup()

        try:
            self.run(stop(), timeout=30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)


def raw_http(base_url: str, data: bytes, timeout: float = 5) -> bytes:
    """Send raw bytes to a server, read until it closes (or resets, or goes quiet for `timeout`)."""
    host, port = base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except (ConnectionResetError, TimeoutError):
            pass
    return out


# ---------------------------------------------------------------------------- Llama API scenarios

LL_ID = "ll-resp-1"
EMPTY = {"type": "text", "text": ""}


def ll_event(event: dict[str, Any]) -> dict[str, Any]:
    return {"id": LL_ID, "event": event}


def llama_stream(pieces: list[str], *, tool: tuple[str, str, list[str]] | None = None,
                 prompt_tokens: int = 9) -> list[bytes]:
    """Frames of a native Llama stream: start, progress*, [tool-call fragments], complete, metrics."""
    frames = [sse(ll_event({"event_type": "start", "delta": EMPTY}))]
    for p in pieces:
        frames.append(sse(ll_event({"event_type": "progress", "delta": {"type": "text", "text": p}})))
    stop = "stop"
    if tool:
        call_id, name, arg_parts = tool
        frames.append(sse(ll_event({"event_type": "progress", "delta": {
            "type": "tool_call", "id": call_id, "function": {"name": name, "arguments": ""}}})))
        for a in arg_parts:
            frames.append(sse(ll_event({"event_type": "progress", "delta": {
                "type": "tool_call", "function": {"arguments": a}}})))
        stop = "tool_calls"
    frames.append(sse(ll_event({"event_type": "complete", "delta": EMPTY, "stop_reason": stop})))
    n = len(pieces) + (len(tool[2]) if tool else 0)
    frames.append(sse(ll_event({"event_type": "metrics", "delta": EMPTY, "metrics": [
        {"metric": "num_completion_tokens", "value": n, "unit": "tokens"},
        {"metric": "num_prompt_tokens", "value": prompt_tokens, "unit": "tokens"},
        {"metric": "num_total_tokens", "value": n + prompt_tokens, "unit": "tokens"}]})))
    return frames


def llama_completion(text: str, *, tool: tuple[str, str, str] | None = None,
                     prompt_tokens: int = 9, completion_tokens: int = 4) -> dict[str, Any]:
    msg: dict[str, Any] = {"role": "assistant", "content": {"type": "text", "text": text},
                           "stop_reason": "tool_calls" if tool else "stop"}
    if tool:
        msg["tool_calls"] = [{"id": tool[0], "function": {"name": tool[1], "arguments": tool[2]}}]
    return {"id": LL_ID, "completion_message": msg, "metrics": [
        {"metric": "num_completion_tokens", "value": completion_tokens, "unit": "tokens"},
        {"metric": "num_prompt_tokens", "value": prompt_tokens, "unit": "tokens"},
        {"metric": "num_total_tokens", "value": prompt_tokens + completion_tokens, "unit": "tokens"}]}


def openai_tool_stream(text: str, call_id: str, name: str, arg_parts: list[str],
                       usage: bool = True) -> list[bytes]:
    frames = [sse(oa_chunk({"role": "assistant", "content": "", "refusal": None}))]
    if text:
        frames.append(sse(oa_chunk({"content": text})))
    frames.append(sse(oa_chunk({"tool_calls": [{"index": 0, "id": call_id, "type": "function",
                                                "function": {"name": name, "arguments": ""}}]})))
    for a in arg_parts:
        frames.append(sse(oa_chunk({"tool_calls": [{"index": 0, "function": {"arguments": a}}]})))
    frames.append(sse(oa_chunk({}, "tool_calls")))
    if usage:
        frames.append(sse(oa_usage_chunk(11, 1 + len(arg_parts))))
    frames.append(sse("[DONE]"))
    return frames


def in_out_policy(path: Any, in_phrase: str, out_phrase: str, every: int = 4) -> str:
    """A policy file `p` that blocks `in_phrase` on input and `out_phrase` on the stream (regex)."""
    path.write_text(f"""name: p
input:
  steps:
    - guard: regex
      patterns: ["{in_phrase}"]
stream:
  check_every_tokens: {every}
  steps:
    - guard: regex
      patterns: ["{out_phrase}"]
""")
    return str(path)

"""`guardgate eval --via URL`: each record as a real request to a running Guardgate, scored by what
the client receives, so the figures are the deployed path's (route, endpoint mapping, dialect codec,
stream windows, notices), not only the guards'.

A record's messages go out in the chosen dialect (`--via-dialect`): `chat` (POST {prefix}/chat/
completions, prefix /v1 unless the URL has a path), `responses` ({prefix}/responses) or `llama`
(/llama/v1/chat/completions), streamed with `--stream`. What the client sees becomes the action:

  block   HTTP 400 with error code `content_filter` (the input stage refused it), or an answer that
          ends with finish/stop reason `content_filter` (`status: incomplete` in Responses): cut.
  redact  the answer the client got differs from the one the upstream sent, or the upstream got a
          prompt that differs from the record's (input masking). Knowable only with `--replay`.
  allow   the answer as sent.
  error   any other failure (HTTP error, connection): counted in `errors`, in no cell.

`--replay HOST:PORT` starts an OpenAI-compatible upstream that answers each request with the record's
`response` (or a fixed benign answer), one record at a time; point the gateway's upstream at it. Without
it the gateway's own upstream answers and only blocks can be seen.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

from gateway.evaluation.dataset import Record
from gateway.evaluation.runner import Result, progress
from gateway.types import Message

DIALECTS = ("chat", "responses", "llama")
DEFAULT_ANSWER = "Thanks, noted."
NO_PROMPT = "Please answer."
BLOCK = "content_filter"


@dataclass
class Replay:
    """The upstream a `--via` run scripts: answers the current record's response, remembers the prompt."""

    host: str = "127.0.0.1"
    port: int = 0
    answer: str = DEFAULT_ANSWER
    received: list[list[dict[str, Any]]] = field(default_factory=list)  # the messages of each call
    runner: web.AppRunner | None = None

    async def start(self) -> int:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.host, self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self.port

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.path.endswith("/models"):
            return web.json_response(
                {
                    "object": "list",
                    "data": [{"id": "eval", "object": "model", "created": 0, "owned_by": "guardgate-eval"}],
                }
            )
        body = await request.json() if request.can_read_body else {}
        self.received.append(list(body.get("messages") or []))
        if not body.get("stream"):
            return web.json_response(
                {
                    "id": "chatcmpl-eval",
                    "object": "chat.completion",
                    "created": 0,
                    "model": body.get("model", "eval"),
                    "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": self.answer}, "finish_reason": "stop"}
                    ],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                }
            )
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        words = self.answer.split(" ")
        pieces = [w + (" " if i < len(words) - 1 else "") for i, w in enumerate(words)]
        for delta in [{"role": "assistant", "content": ""}, *({"content": p} for p in pieces)]:
            await resp.write(_chunk(delta, None, body))
        await resp.write(_chunk({}, "stop", body))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


def _chunk(delta: dict[str, Any], finish: str | None, body: dict[str, Any]) -> bytes:
    c = {
        "id": "chatcmpl-eval",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": body.get("model", "eval"),
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return f"data: {json.dumps(c)}\n\n".encode()


def endpoint(url: str, dialect: str) -> str:
    """The request URL: the dialect's path under the URL's prefix (/v1 or /llama/v1 when it has none)."""
    parts = urlsplit(url)
    prefix = parts.path.rstrip("/") or ("/llama/v1" if dialect == "llama" else "/v1")
    tail = "/responses" if dialect == "responses" else "/chat/completions"
    return f"{parts.scheme}://{parts.netloc}{prefix}{tail}"


def _wire_messages(messages: list[Message]) -> list[dict[str, Any]]:
    return [{"role": m.role, "content": m.text} for m in messages]


def sent_messages(rec: Record) -> list[Message]:
    """What the request carries: the record's messages, or, for a response-only record, a neutral
    question (a request needs one; the answer is what the record is about)."""
    return rec.messages or [Message.of("user", NO_PROMPT)]


def request_body(rec: Record, dialect: str, model: str, stream: bool) -> dict[str, Any]:
    msgs = _wire_messages(sent_messages(rec))
    if dialect == "responses":
        return {
            "model": model,
            "input": [{"role": m["role"], "content": m["content"]} for m in msgs],
            "stream": stream,
            "store": False,
        }
    return {"model": model, "messages": msgs, "stream": stream}


@dataclass(slots=True)
class Seen:
    """What the client got: the text, whether the answer was cut, or the error."""

    text: str = ""
    cut: bool = False
    blocked_input: bool = False
    error: str | None = None


async def _sse_events(resp: aiohttp.ClientResponse) -> Any:
    """Each `data:` payload of an SSE body, parsed (the `[DONE]` sentinel ends it)."""
    buf = b""
    async for chunk in resp.content.iter_any():
        buf += chunk.replace(b"\r", b"")  # CRLF or LF line ends alike
        while b"\n\n" in buf:
            frame, buf = buf.split(b"\n\n", 1)
            data = b"".join(line[5:].lstrip() for line in frame.split(b"\n") if line.startswith(b"data:"))
            if not data or data == b"[DONE]":
                continue
            yield json.loads(data)


def _read_answer(dialect: str, obj: dict[str, Any], seen: Seen) -> None:
    """One non-stream answer body → text and cut."""
    if dialect == "chat":
        ch = (obj.get("choices") or [{}])[0]
        seen.text = str((ch.get("message") or {}).get("content") or "")
        seen.cut = ch.get("finish_reason") == BLOCK
    elif dialect == "llama":
        msg = obj.get("completion_message") or {}
        content = msg.get("content")
        seen.text = str(content.get("text", "") if isinstance(content, dict) else content or "")
        seen.cut = msg.get("stop_reason") == BLOCK
    else:
        seen.text = "".join(
            str(c.get("text", ""))
            for item in obj.get("output") or []
            if item.get("type") == "message"
            for c in item.get("content") or []
            if c.get("type") == "output_text"
        )
        seen.cut = obj.get("status") == "incomplete" and (obj.get("incomplete_details") or {}).get("reason") == BLOCK


def _read_event(dialect: str, ev: dict[str, Any], seen: Seen, text: list[str]) -> None:
    """One stream event → text pieces and cut."""
    if dialect == "chat":
        for ch in ev.get("choices") or []:
            if ch.get("index", 0) == 0:
                text.append(str((ch.get("delta") or {}).get("content") or ""))
                seen.cut |= ch.get("finish_reason") == BLOCK
        if isinstance(ev.get("error"), dict):  # a failure mid-stream, not a verdict
            seen.error = json.dumps(ev)[:300]
    elif dialect == "llama":
        if isinstance(ev.get("error"), dict):
            seen.error = json.dumps(ev)[:300]
        e = ev.get("event") or {}
        delta = e.get("delta") or {}
        if delta.get("type") == "text":
            text.append(str(delta.get("text", "")))
        seen.cut |= e.get("stop_reason") == BLOCK
    else:
        typ = ev.get("type")
        if typ == "response.output_text.delta":
            text.append(str(ev.get("delta", "")))
        elif typ == "response.incomplete":
            seen.cut |= ((ev.get("response") or {}).get("incomplete_details") or {}).get("reason") == BLOCK
        elif typ in ("error", "response.failed"):
            seen.error = json.dumps(ev)[:300]


async def send(
    session: aiohttp.ClientSession, url: str, dialect: str, body: dict[str, Any], headers: dict[str, str]
) -> Seen:
    seen = Seen()
    try:
        async with session.post(url, json=body, headers=headers) as resp:
            if resp.status >= 400:
                raw = await resp.read()
                try:
                    err = json.loads(raw).get("error") or {}
                except (ValueError, AttributeError):
                    err = {}
                if resp.status == 400 and isinstance(err, dict) and err.get("code") == BLOCK:
                    seen.blocked_input = True
                else:
                    seen.error = f"HTTP {resp.status}: {raw[:300].decode('utf-8', 'replace')}"
                return seen
            if not body.get("stream"):
                _read_answer(dialect, await resp.json(content_type=None), seen)
                return seen
            text: list[str] = []
            async for ev in _sse_events(resp):
                _read_event(dialect, ev, seen, text)
            seen.text = "".join(text)
    except (aiohttp.ClientError, TimeoutError, ValueError) as e:
        seen.error = f"{type(e).__name__}: {e}"
    return seen


def _text(content: Any) -> str:
    """A wire message's text, whether content is a string or a list of parts."""
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return "" if content is None else str(content)


def action_of(seen: Seen, rec: Record, sent_answer: str | None, upstream_got: list[dict[str, Any]] | None) -> str:
    """The action the client experienced (see the module docstring)."""
    if seen.error:
        return "error"
    if seen.blocked_input or seen.cut:
        return "block"
    sent = [m.text for m in sent_messages(rec)]
    if upstream_got is not None and sent != [_text(m.get("content")) for m in upstream_got]:
        return "redact"
    if sent_answer is not None and seen.text != sent_answer:
        return "redact"
    return "allow"


async def run_via(
    records: list[Record],
    url: str,
    *,
    dialect: str = "chat",
    stream: bool = False,
    positive_actions: tuple[str, ...],
    model: str = "eval",
    api_key: str | None = None,
    replay: Replay | None = None,
    timeout_s: float = 120.0,
) -> list[Result]:
    """Every record as one request, in order (one at a time: latencies are the path's, not a queue's)."""
    target = endpoint(url, dialect)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    out: list[Result] = []
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        with progress(len(records), url) as bar:
            for rec in records:
                if replay is not None:
                    replay.answer = rec.response if rec.response is not None else DEFAULT_ANSWER
                    replay.received.clear()
                t0 = time.perf_counter()
                seen = await send(session, target, dialect, request_body(rec, dialect, model, stream), headers)
                ms = (time.perf_counter() - t0) * 1000
                got = replay.received[-1] if replay is not None and replay.received else None
                action = action_of(seen, rec, replay.answer if replay is not None and got is not None else None, got)
                out.append(
                    Result(
                        record=rec, action=action, positive=action in positive_actions, latency_ms=ms, error=seen.error
                    )
                )
                bar.update(1)
    return out

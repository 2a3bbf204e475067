"""A fast scripted OpenAI/Llama-dialect upstream for benchmarks and load tests (loopback only).

    python bench/fake_upstream.py --port 9100 [--chunks 20] [--chunk-delay-ms 0] [--dialect openai|llama]

Chat completions: non-stream JSON, or an SSE stream of `--chunks` text chunks. A request may ask
for its own text with the header `X-Script-Text` (so a load test can check every stream's
content), and for a chunk count with `X-Script-Chunks`. Everything else answers a small JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json

from aiohttp import web

CREATED = 1700000000


def _oa(delta: dict, finish: str | None = None) -> bytes:
    c = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": CREATED, "model": "bench",
         "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
    return b"data: " + json.dumps(c, separators=(",", ":")).encode() + b"\n\n"


def _ll(event: dict) -> bytes:
    return b"data: " + json.dumps({"id": "ll-bench", "event": event}, separators=(",", ":")).encode() + b"\n\n"


def openai_frames(words: list[str]) -> list[bytes]:
    frames = [_oa({"role": "assistant", "content": "", "refusal": None})]
    frames += [_oa({"content": w}) for w in words]
    frames += [_oa({}, "stop"), b"data: [DONE]\n\n"]
    return frames


def llama_frames(words: list[str]) -> list[bytes]:
    e = {"type": "text", "text": ""}
    frames = [_ll({"event_type": "start", "delta": e})]
    frames += [_ll({"event_type": "progress", "delta": {"type": "text", "text": w}}) for w in words]
    frames.append(_ll({"event_type": "complete", "delta": e, "stop_reason": "stop"}))
    frames.append(_ll({"event_type": "metrics", "delta": e, "metrics": [
        {"metric": "num_completion_tokens", "value": len(words), "unit": "tokens"},
        {"metric": "num_prompt_tokens", "value": 5, "unit": "tokens"},
        {"metric": "num_total_tokens", "value": 5 + len(words), "unit": "tokens"}]}))
    return frames


def make_app(dialect: str, chunks: int, delay_s: float) -> web.Application:
    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        text = request.headers.get("X-Script-Text")
        n = int(request.headers.get("X-Script-Chunks", chunks))
        words = text.split(" ") if text else [f"w{i}" for i in range(n)]
        words = [w + " " for w in words[:-1]] + words[-1:]
        if not body.get("stream"):
            content = "".join(words)
            if dialect == "llama":
                return web.json_response({"id": "ll-bench", "completion_message": {
                    "role": "assistant", "content": {"type": "text", "text": content}, "stop_reason": "stop"},
                    "metrics": []})
            return web.json_response({"id": "chatcmpl-bench", "object": "chat.completion", "created": CREATED,
                                      "model": "bench", "choices": [{"index": 0, "message": {
                                          "role": "assistant", "content": content}, "finish_reason": "stop",
                                          "logprobs": None}],
                                      "usage": {"prompt_tokens": 5, "completion_tokens": len(words),
                                                "total_tokens": 5 + len(words)}})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for f in (llama_frames if dialect == "llama" else openai_frames)(words):
            await resp.write(f)
            if delay_s:
                await asyncio.sleep(delay_s)
        await resp.write_eof()
        return resp

    async def other(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "bench", "object": "model", "created": 0,
                                                              "owned_by": "bench"}]})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_route("*", "/{tail:.*}", other)
    return app


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=9100)
    ap.add_argument("--dialect", choices=("openai", "llama"), default="openai")
    ap.add_argument("--chunks", type=int, default=20)
    ap.add_argument("--chunk-delay-ms", type=float, default=0.0)
    a = ap.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    web.run_app(make_app(a.dialect, a.chunks, a.chunk_delay_ms / 1000), host="127.0.0.1", port=a.port,
                print=None, access_log=None)


if __name__ == "__main__":
    main()

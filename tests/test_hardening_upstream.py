"""Hardening, round three (issue 30): what the upstream writes besides the answer, slow readers and
the pool, and `on_stream_block: error`.

Through the uvloop server (the harness's `make_stack`) with the real SDKs (`openai`,
`llama-api-client`, pydantic-ai). Every byte a client receives is recorded by a tee transport under
its httpx client, so "the marker never reaches the client" is checked on the wire, not on what an
SDK chose to parse."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
from typing import Any

import httpx
import openai
import pytest
from aiohttp import web
from harness import (
    CREATED,
    llama_completion,
    llama_stream,
    oa_chunk,
    oa_completion,
    openai_text_stream,
    sse,
    stream_frames,
)
from waits import wait_until

from gateway.policy.reload import PolicyStore

MARK = "ZEBRAMARK"
MARK_RE = re.compile(MARK, re.IGNORECASE)

# --------------------------------------------------------------------------- a tee under the SDKs


class _TeeStream(httpx.SyncByteStream):
    def __init__(self, inner: Any, seen: bytearray) -> None:
        self.inner, self.seen = inner, seen

    def __iter__(self):
        for chunk in self.inner:
            self.seen += chunk
            yield chunk

    def close(self) -> None:
        self.inner.close()


class Tee(httpx.BaseTransport):
    """Every byte of every response (head and body) the client receives, in `seen`."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.seen = bytearray()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        resp = self.inner.handle_request(request)
        self.seen += f"{resp.status_code}\n".encode()
        for k, v in resp.headers.raw:
            self.seen += k + b": " + v + b"\n"
        return httpx.Response(
            resp.status_code,
            headers=resp.headers,
            stream=_TeeStream(resp.stream, self.seen),
            extensions=resp.extensions,
        )

    def close(self) -> None:
        self.inner.close()

    def text(self) -> str:
        # JSON escapes (\u005a...) would hide the marker from a plain search: decode what is JSON
        raw = self.seen.decode("utf-8", "replace")
        return raw + "\n" + raw.encode().decode("unicode_escape", "replace")


def sdk(stack: Any, kind: str, tee: Tee) -> Any:
    http = httpx.Client(transport=tee)
    if kind == "llama":
        return stack.llama(http_client=http)
    return stack.openai(http_client=http)


# --------------------------------------------------------------------------- a marking upstream

OUT_POLICY = f"""name: out
stream:
  check_every_tokens: 4
  steps:
    - guard: regex
      name: marker
      patterns: ["(?i){MARK}"]
"""


def _oa_answer(tool_id: str) -> dict[str, Any]:
    msg: dict[str, Any] = {"role": "assistant", "content": "Hello there"}
    finish = "stop"
    if tool_id:
        msg["tool_calls"] = [{"id": tool_id, "type": "function", "function": {"name": "f", "arguments": "{}"}}]
        finish = "tool_calls"
    return {
        "id": f"chatcmpl-{MARK}",
        "object": "chat.completion",
        "created": CREATED,
        "model": f"gpt-test-{MARK}",
        "system_fingerprint": f"fp_{MARK}",
        "service_tier": MARK,
        f"x_{MARK}": MARK,
        "note": MARK,
        "choices": [{"index": 0, "message": msg, "logprobs": None, "finish_reason": finish}],
        "usage": {
            "prompt_tokens": 3,
            "completion_tokens": 2,
            "total_tokens": 5,
            "note": MARK,
            "completion_tokens_details": {"reasoning_tokens": 0, MARK: 1, "x": MARK},
        },
    }


def _oa_chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    c = oa_chunk(delta, finish, model=f"gpt-test-{MARK}")
    c.update(id=f"chatcmpl-{MARK}", system_fingerprint=f"fp_{MARK}", service_tier=MARK, note=MARK)
    return c


def _oa_stream(tool_id: str, error: bool) -> list[bytes]:
    frames = [
        sse(_oa_chunk({"role": "assistant", "content": "", "refusal": None})),
        sse(_oa_chunk({"content": "Hello"})),
        sse(_oa_chunk({"content": " there"})),
    ]
    if error:
        return [*frames, sse({"error": {"message": f"failed: {MARK}", "type": MARK, "code": MARK}})]
    if tool_id:
        frames.append(
            sse(
                _oa_chunk(
                    {
                        "tool_calls": [
                            {
                                "index": 0,
                                "id": tool_id,
                                "type": "function",
                                "function": {"name": "f", "arguments": "{}"},
                            }
                        ]
                    }
                )
            )
        )
    frames.append(sse(_oa_chunk({}, "tool_calls" if tool_id else "stop")))
    usage = {
        **_oa_chunk({}),
        "choices": [],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5, "note": MARK},
    }
    return [*frames, sse(usage), sse("[DONE]")]


def _cmpl_answer() -> dict[str, Any]:
    return {
        "id": f"cmpl-{MARK}",
        "object": "text_completion",
        "created": CREATED,
        "model": MARK,
        "note": MARK,
        "choices": [{"text": "Hello there", "index": 0, "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5, "note": MARK},
    }


def _cmpl_stream(error: bool) -> list[bytes]:
    def chunk(text: str, finish: str | None = None) -> bytes:
        return sse(
            {
                "id": f"cmpl-{MARK}",
                "object": "text_completion",
                "created": CREATED,
                "model": MARK,
                "note": MARK,
                "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}],
            }
        )

    frames = [chunk("Hello"), chunk(" there")]
    if error:
        return [*frames, sse({"error": {"message": f"failed: {MARK}", "code": MARK}})]
    return [*frames, chunk("", "stop"), sse("[DONE]")]


def _ll_answer(tool_id: str) -> dict[str, Any]:
    a = llama_completion("Hello there", tool=(tool_id, "f", "{}") if tool_id else None)
    return {**a, "id": MARK, "note": MARK, f"x_{MARK}": {"y": MARK}}


def _ll_stream(tool_id: str, error: bool) -> list[bytes]:
    frames = llama_stream(["Hello", " there"], tool=(tool_id, "f", ["{}"]) if tool_id else None)
    frames = [f.replace(b'"ll-resp-1"', json.dumps(MARK).encode()) for f in frames]
    if error:
        err = {"error": {"message": f"failed: {MARK}", "code": MARK}, "title": MARK, "detail": MARK}
        return [*frames[:3], f"event: error\ndata: {json.dumps(err)}\n\n".encode()]
    return frames


def marking_handler(scenario: str, status: int = 400):
    """An upstream that puts MARK in every field it can: `error` (an HTTP error body and headers),
    `event` (a mid-stream error event), `meta` (ids, model, metadata, unknown fields, usage),
    `tool` (meta plus a tool call whose id carries MARK), `tool_id` (MARK only in a tool call's id),
    `bad` (a whole answer that does not decode, MARK where a decoder error would quote it)."""

    async def handle(request: web.Request, up: Any) -> web.StreamResponse:
        llama = getattr(up, "dialect", "openai") == "llama"
        if scenario == "error":
            err = {
                "error": {"message": f"you said {MARK}", "type": MARK, "param": MARK, "code": MARK},
                "title": MARK,
                "detail": MARK,
            }
            return web.json_response(
                err, status=status, headers={"Retry-After": MARK, "x-should-retry": MARK, f"x-{MARK}": MARK}
            )
        body = up.last.json()
        if scenario == "bad":  # an answer that does not decode, the marker where a decoder would quote it
            part = [{"type": MARK, "text": "x"}]
            if llama:
                return web.json_response({"id": "x", "completion_message": {"role": "assistant", "content": part}})
            return web.json_response(
                {
                    "id": "x",
                    "object": "chat.completion",
                    "model": "gpt-test",
                    "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": part}, "finish_reason": "stop"}
                    ],
                }
            )
        tool_id = {"tool": f"call_{MARK}", "tool_id": "call_TOOLID"}.get(scenario, "")
        event = scenario == "event"
        if request.path.endswith("/completions") and not request.path.endswith("/chat/completions"):
            frames = _cmpl_stream(event) if body.get("stream") else None
            answer: Any = _cmpl_answer()
        elif llama:
            frames = _ll_stream(tool_id, event) if body.get("stream") else None
            answer = _ll_answer(tool_id)
        else:
            frames = _oa_stream(tool_id, event) if body.get("stream") else None
            answer = _oa_answer(tool_id)
        if scenario == "tool_id":  # MARK only in the tool call's id

            def only_id(b: bytes) -> bytes:
                return b.replace(MARK.encode(), b"plain").replace(b"TOOLID", MARK.encode())

            if frames is not None:
                frames = [only_id(f) for f in frames]
            answer = json.loads(only_id(json.dumps(answer).encode()))
        if frames is not None:
            return await stream_frames(request, frames)
        return web.json_response(answer)

    return handle


@pytest.fixture
def marked(make_stack, tmp_path):
    p = tmp_path / "out.yaml"
    p.write_text(OUT_POLICY)

    def make(scenario: str, dialect: str = "openai", status: int = 400):
        st = make_stack(
            {"upstreams": {"main": {"base_url": "SCRIPTED", "dialect": dialect}}, "policy": str(p)},
            handler=marking_handler(scenario, status),
            policies=PolicyStore(required=[str(p)]),
        )
        st.upstream.dialect = dialect
        return st

    return make


# One call per dialect: (client kind, upstream dialect, call(client, stream) -> what the SDK gave back)
def _chat(c: Any, stream: bool) -> Any:
    r = c.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}], stream=stream)
    return [ch.model_dump_json() for ch in r] if stream else r.model_dump_json()


def _responses(c: Any, stream: bool) -> Any:
    r = c.responses.create(model="gpt-test", input="hi", stream=stream)
    return [ev.model_dump_json() for ev in r] if stream else r.model_dump_json()


def _completions(c: Any, stream: bool) -> Any:
    r = c.completions.create(model="gpt-test", prompt="hi", stream=stream)
    return [ch.model_dump_json() for ch in r] if stream else r.model_dump_json()


def _llama(c: Any, stream: bool) -> Any:
    r = c.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}], stream=stream)
    return [ch.model_dump_json() for ch in r] if stream else r.model_dump_json()


DIALECTS = {
    "chat": ("openai", "openai", _chat),
    "responses": ("openai", "openai", _responses),
    "completions": ("openai", "openai", _completions),
    "llama": ("llama", "llama", _llama),
}


def _call(st: Any, dialect: str, stream: bool) -> tuple[str, str]:
    """(what the client received on the wire, what the SDK returned or raised)."""
    kind, _, call = DIALECTS[dialect]
    tee = Tee()
    client = sdk(st, kind, tee)
    try:
        got = repr(call(client, stream))
    except Exception as e:  # the SDK's exception, as an application would log it
        got = f"{type(e).__name__}: {e} {getattr(e, 'body', '')}"
    return tee.text(), got


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("dialect", list(DIALECTS))
@pytest.mark.parametrize("scenario", ["error", "error500", "event", "meta", "tool", "tool_id", "bad"])
def test_the_upstreams_marker_never_reaches_the_client(marked, dialect: str, stream: bool, scenario: str) -> None:
    if scenario == "event" and not stream:
        pytest.skip("an error event is a stream's")
    if scenario == "bad" and (stream or dialect == "completions"):
        pytest.skip("an undecodable whole answer (the stream's are in `event`)")
    if scenario.startswith("tool") and dialect == "completions":
        pytest.skip("legacy completions have no tool calls")
    st = marked(
        "error" if scenario == "error500" else scenario, DIALECTS[dialect][1], 500 if scenario == "error500" else 400
    )
    wire, got = _call(st, dialect, stream)
    assert st.upstream.requests, "the request reached the upstream"
    assert not MARK_RE.search(wire), f"marker on the wire: {wire[MARK_RE.search(wire).start() - 200 :][:400]}"
    assert not MARK_RE.search(got), got
    if scenario.startswith("error"):
        assert "upstream answered HTTP" in got and "request " in got
    elif scenario == "meta":
        assert "Hello" in got and "there" in got  # the answer itself passed


def test_allowed_metadata_and_a_benign_tool_call_id_pass(make_stack, tmp_path) -> None:
    """What is on the allow list (a hex fingerprint, a known tier, known usage counts) and an id that
    passes the output steps reach the client unchanged."""
    p = tmp_path / "out.yaml"
    p.write_text(OUT_POLICY)

    async def handler(request: web.Request, up: Any) -> web.StreamResponse:
        a = _oa_answer("call_ok1")
        a.update(id="chatcmpl-1", model="gpt-test-2024-08-06", system_fingerprint="fp_abc123", service_tier="default")
        return web.json_response(a)

    st = make_stack(
        {"upstreams": {"main": {"base_url": "SCRIPTED"}}, "policy": str(p)},
        handler=handler,
        policies=PolicyStore(required=[str(p)]),
    )
    r = st.openai().chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}])
    assert r.system_fingerprint == "fp_abc123" and r.service_tier == "default"
    assert r.model == "gpt-test-2024-08-06"
    assert r.choices[0].message.tool_calls[0].id == "call_ok1"
    assert r.usage.completion_tokens_details.reasoning_tokens == 0
    assert r.id != "chatcmpl-1" and r.id.startswith("chatcmpl-")  # the gateway's own


def test_without_an_output_policy_the_upstreams_error_passes_as_it_came(make_stack) -> None:
    st = make_stack(handler=marking_handler("error"))
    with pytest.raises(openai.BadRequestError) as e:
        st.openai().chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}])
    assert MARK in e.value.message


# --------------------------------------------------------------------------- slow readers and the pool

BIG = 24 << 20  # more than the socket buffers between the gateway and a client that does not read


def _big_handler():
    """A non-stream chat answer of BIG bytes (chunked, no length) to `big`, a small one otherwise."""
    blob = json.dumps(oa_completion("x" * BIG)).encode()

    async def handler(request: web.Request, up: Any) -> web.StreamResponse:
        if b"big" not in (up.last.body or b""):
            return web.json_response(oa_completion("small"))
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})  # chunked: no length
        await resp.prepare(request)
        for i in range(0, len(blob), 1 << 20):
            await resp.write(blob[i : i + (1 << 20)])
        await resp.write_eof()
        return resp

    return handler


def _stalled_client(url: str) -> socket.socket:
    """A client that asks for a (big) non-stream chat answer and never reads it (a tiny receive buffer)."""
    host, port = url.removeprefix("http://").split(":")
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect((host, int(port)))
    body = json.dumps({"model": "gpt-test", "messages": [{"role": "user", "content": "big"}]}).encode()
    s.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    return s


@pytest.mark.parametrize("pool", [1, 2])
def test_clients_that_stop_reading_do_not_hold_the_pool(make_stack, pool: int) -> None:
    st = make_stack(
        {
            "upstreams": {
                "main": {"base_url": "SCRIPTED", "max_connections": pool, "timeouts": {"connect": 1, "read": 10}}
            },
            "limits": {"buffer_answer_bytes": 2 * BIG, "send_timeout_s": 60},
        },
        handler=_big_handler(),
    )
    stalled = [_stalled_client(st.url) for _ in range(2)]
    try:
        wait_until(lambda: len(st.upstream.requests) == 2, 5)
        wait_until(lambda: st.upstream.completed == 2, 5)  # both answers sent (or stuck behind their readers)
        # not 503 upstream_unavailable: no connection of the pool is held by a client that does not read
        r = st.openai(timeout=10).chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "hi"}]
        )
        assert r.choices[0].message.content == "small"
    finally:
        for s in stalled:
            s.close()


def test_a_client_that_stops_reading_still_gets_the_whole_answer_later(make_stack) -> None:
    st = make_stack(
        {
            "upstreams": {"main": {"base_url": "SCRIPTED", "max_connections": 1}},
            "limits": {"buffer_answer_bytes": 2 * BIG},
        },
        handler=_big_handler(),
    )
    s = _stalled_client(st.url)
    try:
        assert wait_until(lambda: st.upstream.completed == 1, 10)
        s.settimeout(10)
        got = 0
        while chunk := s.recv(1 << 20):
            got += len(chunk)
            if got > BIG:
                break
        assert got > BIG
    finally:
        s.close()


def test_a_chunked_answer_is_passed_on_as_it_arrives(make_stack) -> None:
    """Buffering never waits for the whole answer: the client gets the first part while the upstream
    still holds the rest (it sends the rest only once the client has the first part)."""
    got_first = threading.Event()

    async def handler(request: web.Request, up: Any) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "audio/mpeg"})
        await resp.prepare(request)
        await resp.write(b"first-part;")
        await asyncio.get_running_loop().run_in_executor(None, got_first.wait, 10)
        await resp.write(b"second-part")
        await resp.write_eof()
        return resp

    st = make_stack({"upstreams": {"main": {"base_url": "SCRIPTED"}}}, handler=handler)
    with httpx.stream(
        "POST",
        st.url + "/v1/audio/speech",
        json={"model": "m", "input": "x", "voice": "v"},
        headers={"Authorization": "Bearer k"},
        timeout=10,
    ) as r:
        parts = r.iter_bytes()
        first = next(parts)
        assert first.startswith(b"first-part;")
        got_first.set()
        assert first + b"".join(parts) == b"first-part;second-part"




# --------------------------------------------------------------------------- on_stream_block

CUT = "forbidden phrase"


def _cut_policy(tmp_path, on_stream_block: str | None) -> str:
    p = tmp_path / f"cut-{on_stream_block}.yaml"
    line = f"on_stream_block: {on_stream_block}\n" if on_stream_block else ""
    p.write_text(f"""name: cut
{line}stream:
  check_every_tokens: 2
  steps:
    - guard: regex
      name: phrase
      patterns: ["{CUT}"]
""")
    return str(p)


def _cut_handler():
    async def handler(request: web.Request, up: Any) -> web.StreamResponse:
        body = up.last.json()
        if getattr(up, "dialect", "openai") == "llama":
            return await stream_frames(request, llama_stream(["Sure: ", "a ", CUT, " and more", " text"]))
        if body.get("stream") and "prompt" in body:

            def chunk(text: str, finish: str | None = None) -> bytes:
                return sse(
                    {
                        "id": "cmpl-1",
                        "object": "text_completion",
                        "created": CREATED,
                        "model": "gpt-test",
                        "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}],
                    }
                )

            return await stream_frames(
                request,
                [chunk("Sure: "), chunk("a "), chunk(CUT), chunk(" and more"), chunk("", "stop"), sse("[DONE]")],
            )
        return await stream_frames(request, openai_text_stream(["Sure: ", "a ", CUT, " and more", " text"]))

    return handler


@pytest.fixture
def cut(make_stack, tmp_path):
    def make(on_stream_block: str | None, dialect: str = "openai"):
        p = _cut_policy(tmp_path, on_stream_block)
        st = make_stack(
            {"upstreams": {"main": {"base_url": "SCRIPTED", "dialect": dialect}}, "policy": p},
            handler=_cut_handler(),
            policies=PolicyStore(required=[p]),
        )
        st.upstream.dialect = dialect
        return st

    return make


def test_on_stream_block_error_the_openai_sdk_raises_with_the_policys_message(cut) -> None:
    st = cut("error")
    chunks = []
    with pytest.raises(openai.APIError) as e:
        for ch in st.openai().chat.completions.create(
            model="gpt-test", stream=True, messages=[{"role": "user", "content": "hi"}]
        ):
            chunks.append(ch)
    assert "blocked by policy 'cut'" in e.value.message
    assert e.value.code == "content_filter"
    assert not any(c.choices and c.choices[0].finish_reason for c in chunks)  # no finish before the error
    assert CUT not in "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_by_default_a_cut_stream_finishes_content_filter(cut) -> None:
    st = cut(None)
    chunks = list(
        st.openai().chat.completions.create(model="gpt-test", stream=True, messages=[{"role": "user", "content": "hi"}])
    )
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        "content_filter"
    ]


def test_on_stream_block_error_in_completions_and_llama(cut) -> None:
    st = cut("error")
    with pytest.raises(openai.APIError) as e:
        list(st.openai().completions.create(model="gpt-test", prompt="hi", stream=True))
    assert "blocked by policy 'cut'" in e.value.message
    import llama_api_client

    st = cut("error", "llama")
    with pytest.raises(llama_api_client.APIError) as le:
        list(st.llama().chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], stream=True))
    assert "blocked by policy 'cut'" in str(le.value)


def test_on_stream_block_error_in_responses_ends_with_an_error_event(cut) -> None:
    """The Responses API's own error shape is the `error` event (its SDK yields it; agent frameworks
    raise on it): it takes the place of `response.incomplete`."""
    st = cut("error")
    events = list(st.openai().responses.create(model="gpt-test", input="hi", stream=True))
    assert events[-1].type == "error" and "blocked by policy 'cut'" in events[-1].message
    assert not any(ev.type in ("response.incomplete", "response.completed") for ev in events)


def _pydantic_agent(st: Any) -> Any:
    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    model = OpenAIChatModel("gpt-test", provider=OpenAIProvider(base_url=st.url + "/v1", api_key="sk-x"))
    return Agent(model)


async def _run_stream(agent: Any) -> str:
    async with agent.run_stream("hi") as result:
        return "".join([t async for t in result.stream_text(delta=True)])


def test_on_stream_block_error_pydantic_ai_run_stream_raises(cut) -> None:
    pytest.importorskip("pydantic_ai")
    from pydantic_ai.exceptions import ModelAPIError

    st = cut("error")
    with pytest.raises(ModelAPIError) as e:
        asyncio.run(_run_stream(_pydantic_agent(st)))
    assert "blocked by policy 'cut'" in str(e.value)


def test_by_default_pydantic_ai_run_stream_sees_content_filter(cut) -> None:
    """pydantic-ai (2.x) turns a `content_filter` finish into its own ContentFilterError: unchanged."""
    pytest.importorskip("pydantic_ai")
    from pydantic_ai.exceptions import ContentFilterError

    st = cut(None)
    with pytest.raises(ContentFilterError):
        asyncio.run(_run_stream(_pydantic_agent(st)))


def test_a_translated_models_lists_error_is_the_gateways_own(marked) -> None:
    """A Llama API client listing models of an OpenAI upstream (translated): the upstream's error
    body is replaced like a chat answer's."""
    import llama_api_client

    st = marked("error", "openai")
    tee = Tee()
    with pytest.raises(llama_api_client.BadRequestError) as e:
        sdk(st, "llama", tee).models.list()
    assert not MARK_RE.search(tee.text()) and not MARK_RE.search(str(e.value))
    assert "upstream answered HTTP 400" in str(e.value)

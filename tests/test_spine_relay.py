"""The spine: the OpenAI SDK through Guardgate against a scripted upstream, byte relay path."""

from __future__ import annotations

import asyncio
import gzip
import json

import httpx
import openai
import pytest
from aiohttp import web
from harness import (
    oa_completion,
    openai_text_stream,
    split_bytes,
    stream_frames,
    wait_until,
)


def frames_json(frames: list[bytes]) -> list[dict]:
    """The chunk objects an SSE byte stream carries (what the SDK should hand the user)."""
    blob = b"".join(frames).replace(b"\r\n", b"\n")
    out = []
    for block in blob.split(b"\n\n"):
        for line in block.split(b"\n"):
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                out.append(json.loads(line[6:]))
    return out


SCENARIOS = {
    "plain": dict(pieces=["Hel", "lo", ", wor", "ld"], usage=False, eol="\n", keepalive=False, cut=0),
    "tcp_split_7": dict(pieces=["Once", " upon", " a", " time"], usage=True, eol="\n", keepalive=False, cut=7),
    "crlf_keepalive": dict(pieces=["a", "b", "c", "d", "e"], usage=True, eol="\r\n", keepalive=True, cut=0),
    "crlf_split_3": dict(pieces=["naïve ", "café ", "日本"], usage=True, eol="\r\n", keepalive=True, cut=3),
}


def scenario_handler(frames: list[bytes]):
    async def handler(request: web.Request, up) -> web.StreamResponse:
        return await stream_frames(request, frames, delay=0.001)

    return handler


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_sync_stream_chunks_equal_upstream(make_stack, name: str) -> None:
    sc = SCENARIOS[name]
    frames = openai_text_stream(sc["pieces"], usage=sc["usage"], eol=sc["eol"], keepalive=sc["keepalive"])
    wire = split_bytes(frames, sc["cut"]) if sc["cut"] else frames
    st = make_stack(handler=scenario_handler(wire))
    client = st.openai()
    stream = client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}],
                                            stream=True, stream_options={"include_usage": sc["usage"]})
    got = [c.model_dump(exclude_unset=True) for c in stream]
    assert got == frames_json(frames)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in got if c["choices"])
    assert text == "".join(sc["pieces"])
    # the request reached the upstream unchanged
    assert st.upstream.last.json()["messages"] == [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("name", ["tcp_split_7", "crlf_split_3"])
async def test_async_stream_chunks_equal_upstream(make_stack, name: str) -> None:
    sc = SCENARIOS[name]
    frames = openai_text_stream(sc["pieces"], usage=sc["usage"], eol=sc["eol"], keepalive=sc["keepalive"])
    st = make_stack(handler=scenario_handler(split_bytes(frames, sc["cut"])))
    client = st.async_openai()
    stream = await client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}],
                                                  stream=True)
    got = [c.model_dump(exclude_unset=True) async for c in stream]
    assert got == frames_json(frames)
    await client.close()


def test_stream_bytes_relayed_exactly(make_stack) -> None:
    frames = openai_text_stream(["x", "y"], usage=True, eol="\r\n", keepalive=True)
    st = make_stack(handler=scenario_handler(split_bytes(frames, 5)))
    r = httpx.post(st.url + "/v1/chat/completions", json={"model": "m", "messages": [], "stream": True})
    assert r.status_code == 200
    assert r.content == b"".join(frames)
    assert r.headers["content-type"].startswith("text/event-stream")
    assert "content-length" not in r.headers


def test_sync_and_async_non_stream(stack) -> None:
    c = stack.openai().chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}])
    assert c.model_dump(exclude_unset=True) == oa_completion("Hello there!")

    async def go() -> None:
        client = stack.async_openai()
        c2 = await client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}])
        assert c2.choices[0].message.content == "Hello there!"
        await client.close()

    asyncio.run(go())


def test_other_endpoints_relayed(stack) -> None:
    client = stack.openai()
    assert [m.id for m in client.models.list()] == ["gpt-test"]
    # Echo upstream: each call must arrive at the same path under the upstream base with the same body.
    for call, path in (
        (lambda: client.completions.create(model="m", prompt="p"), "/v1/completions"),
        (lambda: client.embeddings.with_raw_response.create(model="m", input="p"), "/v1/embeddings"),
        (lambda: client.moderations.with_raw_response.create(input="p"), "/v1/moderations"),
        (lambda: client.responses.with_raw_response.create(model="m", input="p"), "/v1/responses"),
        (lambda: client.post("/some/future/endpoint", body={"k": 1}, cast_to=object), "/v1/some/future/endpoint"),
    ):
        call()
        assert stack.upstream.last.path == path
        assert stack.upstream.last.method == "POST"


def test_openai_prefix_alias(stack) -> None:
    c = stack.openai(prefix="/openai/v1").chat.completions.create(model="gpt-test", messages=[])
    assert c.choices[0].message.content == "Hello there!"
    assert stack.upstream.last.path == "/v1/chat/completions"


def test_gzip_upstream_decoded_for_sse(make_stack) -> None:
    frames = openai_text_stream(["zip", "ped"])

    async def handler(request: web.Request, up) -> web.StreamResponse:
        return web.Response(body=gzip.compress(b"".join(frames)),
                            headers={"Content-Type": "text/event-stream", "Content-Encoding": "gzip"})

    st = make_stack(handler=handler)
    r = httpx.post(st.url + "/v1/chat/completions", json={"model": "m", "messages": [], "stream": True},
                   headers={"Accept-Encoding": "identity"})
    assert "content-encoding" not in r.headers
    assert r.content == b"".join(frames)
    assert "accept-encoding" not in {k.lower() for k in st.upstream.last.headers} or \
        st.upstream.last.headers.get("Accept-Encoding") != "identity"


def test_hop_by_hop_headers_dropped(stack) -> None:
    httpx.post(stack.url + "/v1/chat/completions", json={"model": "m", "messages": []},
               headers={"Connection": "keep-alive, X-Secret-Hop", "X-Secret-Hop": "1", "Keep-Alive": "timeout=5",
                        "X-Custom": "kept", "TE": "trailers"})
    h = {k.lower() for k in stack.upstream.last.headers}
    assert "x-secret-hop" not in h and "keep-alive" not in h and "te" not in h
    assert stack.upstream.last.headers.get("X-Custom") == "kept"


# ---------------------------------------------------------------------------- keys and auth


def test_gateway_keys(make_stack, monkeypatch) -> None:
    monkeypatch.setenv("GG_TEAM_KEY", "gk-team-secret")
    monkeypatch.setenv("GG_UPSTREAM_KEY", "sk-upstream-secret")
    st = make_stack({"upstreams": {"main": {"base_url": "SCRIPTED", "api_key_env": "GG_UPSTREAM_KEY"}},
                     "keys": [{"name": "team", "key_env": "GG_TEAM_KEY"}]})
    with pytest.raises(openai.AuthenticationError) as ei:
        st.openai(api_key="wrong").chat.completions.create(model="m", messages=[])
    assert ei.value.code == "invalid_api_key"
    assert st.upstream.requests == []
    c = st.openai(api_key="gk-team-secret").chat.completions.create(model="m", messages=[])
    assert c.choices[0].message.content == "Hello there!"
    assert st.upstream.last.headers["Authorization"] == "Bearer sk-upstream-secret"


def test_client_authorization_forwarded_without_keys(stack) -> None:
    stack.openai(api_key="sk-users-own").chat.completions.create(model="m", messages=[])
    assert stack.upstream.last.headers["Authorization"] == "Bearer sk-users-own"


def test_gateway_key_never_forwarded_even_without_upstream_key(make_stack, monkeypatch) -> None:
    monkeypatch.setenv("GG_TEAM_KEY", "gk-team-secret")
    st = make_stack({"upstreams": {"main": {"base_url": "SCRIPTED"}},
                     "keys": [{"name": "team", "key_env": "GG_TEAM_KEY"}]})
    st.openai(api_key="gk-team-secret").chat.completions.create(model="m", messages=[])
    assert "Authorization" not in st.upstream.last.headers


# ---------------------------------------------------------------------------- failures


def test_malformed_json_400(stack) -> None:
    r = httpx.post(stack.url + "/v1/chat/completions", content=b'{"model": "m", "messages": [',
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "invalid_json" and err["message"]
    assert stack.upstream.requests == []


def test_body_over_limit_413(make_stack) -> None:
    st = make_stack({"upstreams": {"main": {"base_url": "SCRIPTED"}}, "limits": {"max_body_bytes": 2000}})
    with pytest.raises(openai.APIStatusError) as ei:
        st.openai().chat.completions.create(model="m", messages=[{"role": "user", "content": "x" * 5000}])
    assert ei.value.status_code == 413
    assert ei.value.code == "request_too_large"
    assert st.upstream.requests == []


def test_unknown_route_and_model_404(make_stack) -> None:
    st = make_stack({"upstreams": {"main": {"base_url": "SCRIPTED"}},
                     "routes": [{"model": "gpt-*", "upstream": "main"}]})
    with pytest.raises(openai.NotFoundError) as ei:
        st.openai().chat.completions.create(model="claude-x", messages=[])
    assert ei.value.code == "model_not_found"
    r = httpx.get(st.url + "/nowhere/at/all")
    assert r.status_code == 404 and r.json()["error"]["message"]
    assert st.upstream.requests == []


def test_upstream_unreachable_502(make_stack) -> None:
    st = make_stack({"upstreams": {"main": {"base_url": "http://127.0.0.1:9/v1", "timeouts": {"connect": 1}}}})
    with pytest.raises(openai.InternalServerError) as ei:
        st.openai().chat.completions.create(model="m", messages=[])
    assert ei.value.status_code == 502
    assert ei.value.code == "upstream_unreachable"


def test_upstream_timeout_504(make_stack) -> None:
    async def slow(request: web.Request, up) -> web.StreamResponse:
        await asyncio.sleep(3)
        return web.json_response({})

    st = make_stack({"upstreams": {"main": {"base_url": "SCRIPTED", "timeouts": {"read": 0.3}}}}, handler=slow)
    with pytest.raises(openai.APIStatusError) as ei:
        st.openai().chat.completions.create(model="m", messages=[])
    assert ei.value.status_code == 504


@pytest.mark.parametrize("status,exc", [(429, openai.RateLimitError), (400, openai.BadRequestError),
                                        (418, openai.APIStatusError), (503, openai.InternalServerError)])
def test_upstream_errors_relayed(make_stack, status: int, exc: type) -> None:
    body = {"error": {"message": f"upstream says {status}", "type": "x", "param": None, "code": f"c{status}"}}

    async def handler(request: web.Request, up) -> web.StreamResponse:
        return web.json_response(body, status=status, headers={"Retry-After": "7", "x-request-id": "req-up-1"})

    st = make_stack(handler=handler)
    with pytest.raises(exc) as ei:
        st.openai().chat.completions.create(model="m", messages=[], stream=True)
    assert ei.value.status_code == status
    assert ei.value.body == body["error"]
    assert ei.value.response.headers["retry-after"] == "7"
    assert ei.value.request_id == "req-up-1"


def test_upstream_dies_mid_stream_gives_clean_error(make_stack) -> None:
    frames = openai_text_stream(["one", "two", "three"])

    async def handler(request: web.Request, up) -> web.StreamResponse:
        resp = await stream_frames(request, [frames[0], frames[1], frames[2][:10]], eof=False)
        request.transport.close()  # reset mid-event
        return resp

    st = make_stack(handler=handler)
    stream = st.openai().chat.completions.create(model="m", messages=[], stream=True)
    got = []
    with pytest.raises(openai.APIError) as ei:
        for c in stream:
            got.append(c)
    assert ei.value.code == "upstream_error"
    assert [c.choices[0].delta.content for c in got] == ["", "one"]


def test_client_disconnect_cancels_upstream(make_stack) -> None:
    frames = openai_text_stream([f"w{i} " for i in range(400)])

    async def handler(request: web.Request, up) -> web.StreamResponse:
        return await stream_frames(request, frames, delay=0.02)

    st = make_stack(handler=handler)
    with httpx.stream("POST", st.url + "/v1/chat/completions",
                      json={"model": "m", "messages": [], "stream": True}) as r:
        it = r.iter_raw()
        next(it)
    # The client is gone: the upstream must see its request cancelled long before 400 x 20 ms.
    assert wait_until(lambda: st.upstream.disconnects == 1, timeout=3)
    assert st.upstream.completed == 0


def test_healthz_readyz(stack) -> None:
    assert httpx.get(stack.url + "/healthz").json() == {"status": "ok"}
    r = httpx.get(stack.url + "/readyz")
    assert r.status_code == 200 and r.json()["ready"] is True and r.json()["policies"] == []

"""Both SDKs through Guardgate, with and without translation between dialects (issue 3)."""

from __future__ import annotations

import json

import llama_api_client
import openai
import pytest
from aiohttp import web
from harness import (
    llama_completion,
    llama_stream,
    oa_completion,
    openai_text_stream,
    openai_tool_stream,
    stream_frames,
)

TOOLS_LL = [{"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                              "parameters": {"type": "object", "properties": {
                                                  "city": {"type": "string"}}}}}]
HI = [{"role": "user", "content": "hi"}]
ARGS = ['{"ci', 'ty": "Par', 'is"}']


def handler_for(dialect: str, *, tool: bool = False):
    """A scripted upstream in `dialect` that streams or not as the request asks."""

    async def handler(request: web.Request, up) -> web.StreamResponse:
        body = up.last.json()
        if dialect == "llama":
            if body.get("stream"):
                frames = llama_stream(["Bon", "jour"], tool=("call_1", "get_weather", ARGS) if tool else None)
                return await stream_frames(request, frames)
            return web.json_response(llama_completion("Bonjour", tool=("call_1", "get_weather", "".join(ARGS))
                                                      if tool else None))
        if body.get("stream"):
            inc = (body.get("stream_options") or {}).get("include_usage", False)
            frames = (openai_tool_stream("Bonjour", "call_1", "get_weather", ARGS, usage=inc) if tool
                      else openai_text_stream(["Bon", "jour"], usage=inc))
            return await stream_frames(request, frames)
        c = oa_completion("Bonjour")
        if tool:
            c["choices"][0]["message"]["tool_calls"] = [{"id": "call_1", "type": "function", "function": {
                "name": "get_weather", "arguments": "".join(ARGS)}}]
            c["choices"][0]["finish_reason"] = "tool_calls"
        return web.json_response(c)

    return handler


# ---------------------------------------------------------------------------- llama-api-client


@pytest.mark.parametrize("upstream_dialect", ["llama", "openai"])
def test_llama_sdk_stream(make_stack, upstream_dialect: str) -> None:
    st = make_stack(handler=handler_for(upstream_dialect), dialect=upstream_dialect)
    stream = st.llama().chat.completions.create(model="Llama-4-Maverick", stream=True,
                                                messages=[{"role": "user", "content": "hello"}])
    chunks = list(stream)
    text = "".join(c.event.delta.text for c in chunks)  # every event carries a delta
    assert text == "Bonjour"
    types = [c.event.event_type for c in chunks]
    assert types[0] == "start" and types[-2:] == ["complete", "metrics"]
    complete = chunks[-2].event
    assert complete.stop_reason == "stop"
    metrics = {m.metric: m.value for m in chunks[-1].event.metrics}
    assert metrics["num_completion_tokens"] >= 2 and metrics["num_total_tokens"] == \
        metrics["num_prompt_tokens"] + metrics["num_completion_tokens"]
    sent = st.upstream.last.json()
    assert sent["model"] == "Llama-4-Maverick"
    assert sent["messages"][0]["role"] == "user"
    if upstream_dialect == "openai":
        assert sent["stream"] is True


@pytest.mark.parametrize("upstream_dialect", ["llama", "openai"])
async def test_llama_sdk_async_stream_tool_calls(make_stack, upstream_dialect: str) -> None:
    st = make_stack(handler=handler_for(upstream_dialect, tool=True), dialect=upstream_dialect)
    client = st.async_llama()
    stream = await client.chat.completions.create(model="m", stream=True, tools=TOOLS_LL,
                                                  messages=[{"role": "user", "content": "weather?"}])
    chunks = [c async for c in stream]
    tool_deltas = [c.event.delta for c in chunks if c.event.delta.type == "tool_call"]
    assert tool_deltas[0].id == "call_1" and tool_deltas[0].function.name == "get_weather"
    args = "".join(d.function.arguments or "" for d in tool_deltas)
    assert json.loads(args) == {"city": "Paris"}
    assert [c.event.stop_reason for c in chunks if c.event.event_type == "complete"] == ["tool_calls"]
    sent = st.upstream.last.json()
    tool_def = sent["tools"][0]
    assert tool_def["function"]["name"] == "get_weather"
    await client.close()


@pytest.mark.parametrize("upstream_dialect", ["llama", "openai"])
def test_llama_sdk_non_stream(make_stack, upstream_dialect: str) -> None:
    st = make_stack(handler=handler_for(upstream_dialect, tool=True), dialect=upstream_dialect)
    r = st.llama().chat.completions.create(model="m", tools=TOOLS_LL,
                                           messages=[{"role": "user", "content": "weather?"}])
    assert r.completion_message.content.text == "Bonjour"
    assert r.completion_message.stop_reason == "tool_calls"
    call = r.completion_message.tool_calls[0]
    assert call.id == "call_1" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    metrics = {m.metric: m.value for m in r.metrics}
    assert metrics["num_prompt_tokens"] > 0 and metrics["num_total_tokens"] > metrics["num_prompt_tokens"]


async def test_llama_sdk_async_non_stream_translated(make_stack) -> None:
    st = make_stack(handler=handler_for("openai"), dialect="openai")
    client = st.async_llama()
    r = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                             max_completion_tokens=64, temperature=0.2)
    assert r.completion_message.content.text == "Bonjour"
    sent = st.upstream.last.json()
    assert sent.get("max_completion_tokens", sent.get("max_tokens")) == 64
    assert sent["temperature"] == 0.2
    await client.close()


# ---------------------------------------------------------------------------- openai SDK → Llama upstream


def test_openai_sdk_to_llama_upstream_stream(make_stack) -> None:
    st = make_stack(handler=handler_for("llama", tool=True), dialect="llama")
    stream = st.openai().chat.completions.create(model="m", stream=True, stream_options={"include_usage": True},
                                                 messages=[{"role": "user", "content": "weather?"}],
                                                 tools=TOOLS_LL)
    chunks = list(stream)  # ends at [DONE] without errors
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Bonjour"
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert calls[0].id == "call_1" and calls[0].function.name == "get_weather"
    assert json.loads("".join(tc.function.arguments or "" for tc in calls)) == {"city": "Paris"}
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["tool_calls"]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == \
        chunks[-1].usage.prompt_tokens + chunks[-1].usage.completion_tokens
    sent = st.upstream.last.json()
    assert "stream_options" not in sent  # a Llama upstream has no such field


def test_openai_sdk_to_llama_upstream_no_usage_chunk_unless_asked(make_stack) -> None:
    st = make_stack(handler=handler_for("llama"), dialect="llama")
    chunks = list(st.openai().chat.completions.create(model="m", stream=True, messages=HI))
    assert all(c.choices for c in chunks)  # code indexing choices[0] must not crash


async def test_openai_async_sdk_to_llama_upstream_non_stream(make_stack) -> None:
    st = make_stack(handler=handler_for("llama"), dialect="llama")
    client = st.async_openai()
    c = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert c.choices[0].message.content == "Bonjour"
    assert c.choices[0].finish_reason == "stop"
    assert c.usage.prompt_tokens == 9 and c.usage.completion_tokens == 4
    await client.close()


def test_compat_route_speaks_openai(make_stack) -> None:
    st = make_stack(handler=handler_for("llama"), dialect="llama")
    c = st.openai(prefix="/llama/compat/v1").chat.completions.create(model="m", messages=HI)
    assert c.choices[0].message.content == "Bonjour"


# ---------------------------------------------------------------------------- errors both ways


def test_llama_route_errors_in_llama_shape(make_stack) -> None:
    st = make_stack({"upstreams": {"main": {"base_url": "SCRIPTED"}},
                     "routes": [{"model": "gpt-*", "upstream": "main"}]})
    with pytest.raises(llama_api_client.NotFoundError) as ei:
        st.llama().chat.completions.create(model="Llama-4", messages=[{"role": "user", "content": "hi"}])
    body = ei.value.body
    assert body["error"]["code"] == "model_not_found"
    assert body["title"] and body["detail"]


@pytest.mark.parametrize("status,exc", [(429, llama_api_client.RateLimitError),
                                        (400, llama_api_client.BadRequestError)])
def test_openai_upstream_error_translated_for_llama_client(make_stack, status: int, exc: type) -> None:
    async def handler(request: web.Request, up) -> web.StreamResponse:
        return web.json_response({"error": {"message": "slow down", "type": "x", "param": None,
                                            "code": "rate_limited"}}, status=status)

    st = make_stack(handler=handler, dialect="openai")
    with pytest.raises(exc) as ei:
        st.llama().chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert "slow down" in json.dumps(ei.value.body)


def test_llama_upstream_error_translated_for_openai_client(make_stack) -> None:
    async def handler(request: web.Request, up) -> web.StreamResponse:
        return web.json_response({"title": "Bad request", "detail": "messages must not be empty", "status": 400},
                                 status=400)

    st = make_stack(handler=handler, dialect="llama")
    with pytest.raises(openai.BadRequestError) as ei:
        st.openai().chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert "messages must not be empty" in ei.value.message


def test_llama_upstream_midstream_error_reaches_openai_client(make_stack) -> None:
    async def handler(request: web.Request, up) -> web.StreamResponse:
        frames = [*llama_stream(["partial"])[:2], b'{"error": {"message": "overloaded"}}\n\n']
        return await stream_frames(request, frames)

    st = make_stack(handler=handler, dialect="llama")
    with pytest.raises(openai.APIError) as ei:
        list(st.openai().chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], stream=True))
    assert "overloaded" in ei.value.message


def test_llama_models_list_translated(make_stack) -> None:
    st = make_stack(dialect="openai")
    models = st.llama().models.list()
    assert [m.id for m in models] == ["gpt-test"]

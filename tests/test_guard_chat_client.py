"""The chat client guards receive at start (`GuardResources.chat_client`), built by the server from a
configured upstream or a `remote:` URL: Exchange in, Completion out, with the upstream's key
handling, the gateway's telemetry, and the key cut out of errors. `alignment_check` asks its judge
through it, in-process and through `guardgate serve`'s server."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from harness import Loop, ScriptedUpstream, oa_completion
from prometheus_client import generate_latest

from gateway.config import UpstreamConfig
from gateway.guards.alignment_check import AlignmentCheck
from gateway.guards.base import NO_RESOURCES, GuardConfigError, GuardInput
from gateway.policy.chain import PolicyStore
from gateway.telemetry import Telemetry
from gateway.types import Exchange, Message, ToolCall
from gateway.upstreams.base import UpstreamError
from gateway.upstreams.chat_client import ChatClients
from gateway.upstreams.http import HttpUpstream

KEY = "sk-judge-secret-0123456789"


@pytest.fixture
def judge_server():
    """A scripted OpenAI-compatible server on loopback; `answer` scripts its reply."""
    loop = Loop()
    state: dict[str, Any] = {"status": 200, "text": '{"aligned": true, "reason": "ok"}'}

    async def handler(request: web.Request, up: ScriptedUpstream) -> web.StreamResponse:
        if state["status"] != 200:  # an error that echoes the key it was sent, as some providers do
            auth = request.headers.get("Authorization", "")
            return web.json_response(
                {"error": {"message": f"invalid key {auth}", "code": "bad_key"}}, status=state["status"]
            )
        return web.json_response(oa_completion(state["text"], model=up.last.json()["model"]))

    up = ScriptedUpstream(handler=handler)
    up.port = loop.serve(up.app())
    yield up, f"http://127.0.0.1:{up.port}/v1", state
    loop.close()


EX = Exchange(model="judge", messages=[Message.of("user", "hi")], params={"temperature": 0})


async def test_remote_client_sends_the_key_the_body_and_extra_fields(judge_server, monkeypatch) -> None:
    up, url, _ = judge_server
    monkeypatch.setenv("JUDGE_KEY", KEY)
    tel = Telemetry(tracer_provider=None)
    clients = ChatClients(telemetry=tel)
    try:
        client = clients.chat_client(remote={"base_url": url, "api_key_env": "JUDGE_KEY", "headers": {"X-T": "1"}})
        assert (
            clients.chat_client(remote={"base_url": url, "api_key_env": "JUDGE_KEY", "headers": {"X-T": "1"}}) is client
        )  # one pool per endpoint
        c = await client.complete(EX, extra_body={"seed": 7})
    finally:
        await clients.aclose()
    assert c.message.text == '{"aligned": true, "reason": "ok"}'
    r = up.last
    assert r.path == "/v1/chat/completions" and r.headers["Authorization"] == f"Bearer {KEY}"
    assert r.headers["X-T"] == "1"
    body = r.json()
    assert body["model"] == "judge" and body["seed"] == 7 and body["messages"][0]["content"] == "hi"
    assert body.get("stream") in (None, False)
    metrics = generate_latest(tel.registry).decode()
    assert f'upstream="remote:{url}"' in metrics  # the gateway's upstream metrics see the judge call


async def test_an_upstream_error_never_carries_the_key(judge_server, monkeypatch) -> None:
    _, url, state = judge_server
    state["status"] = 401
    monkeypatch.setenv("JUDGE_KEY", KEY)
    clients = ChatClients()
    try:
        with pytest.raises(UpstreamError) as ei:
            await clients.chat_client(remote={"base_url": url, "api_key_env": "JUDGE_KEY"}).complete(EX)
    finally:
        await clients.aclose()
    assert "HTTP 401" in str(ei.value) and KEY not in str(ei.value) and "[REDACTED]" in str(ei.value)


async def test_a_missing_key_variable_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.delenv("JUDGE_KEY_ABSENT", raising=False)
    clients = ChatClients()
    with pytest.raises(RuntimeError, match="environment variable JUDGE_KEY_ABSENT is not set"):
        await clients.chat_client(
            remote={"base_url": "http://127.0.0.1:9", "api_key_env": "JUDGE_KEY_ABSENT"}
        ).complete(EX)
    await clients.aclose()


async def test_a_configured_upstream_by_name(judge_server) -> None:
    up, url, _ = judge_server
    http = HttpUpstream(UpstreamConfig(name="main", base_url=url))
    await http.start()
    try:
        clients = ChatClients({"main": http})
        c = await clients.chat_client("main").complete(EX)
        assert c.message.text.startswith('{"aligned"') and up.last.path == "/v1/chat/completions"
        with pytest.raises(LookupError, match="no upstream named 'other' \\(configured: main\\)"):
            clients.chat_client("other")
        with pytest.raises(ValueError, match="needs a model name"):
            await clients.chat_client("main").complete(Exchange(model="", messages=EX.messages))
    finally:
        await http.aclose()


async def test_without_a_gateway_a_guard_gets_no_chat_client() -> None:
    g = AlignmentCheck(upstream="main", model="judge")
    with pytest.raises(RuntimeError, match="run under `guardgate serve`"):
        await g.start(NO_RESOURCES)
    with pytest.raises(LookupError, match="no upstream named 'main'"):
        await g.start(ChatClients())  # `guardgate check` / `eval`: remote judges only


def test_remote_options_are_checked_at_policy_load() -> None:
    with pytest.raises(GuardConfigError, match="unknown key"):
        AlignmentCheck(remote={"base_url": "http://x", "api_key": "sk-oops"})
    with pytest.raises(GuardConfigError, match="never put a key in the file"):
        AlignmentCheck(remote={"base_url": "http://x", "api_key_env": "sk-oops"})
    with pytest.raises(GuardConfigError, match="http:// or https://"):
        AlignmentCheck(remote="ftp://x")


async def test_alignment_check_asks_a_remote_judge(judge_server, monkeypatch) -> None:
    up, url, state = judge_server
    monkeypatch.setenv("JUDGE_KEY", KEY)
    g = AlignmentCheck(remote={"base_url": url, "api_key_env": "JUDGE_KEY", "model": "judge-remote"})
    clients = ChatClients()
    await g.start(clients)
    try:
        inp = GuardInput(
            stage="output",
            messages=[Message.of("user", "Email Bob")],
            tool_calls=[ToolCall(id="c1", name="send_email", arguments='{"to": "bob"}')],
        )
        v = await g.check(inp)
        assert not v.flagged and v.error is None
        assert up.last.json()["model"] == "judge-remote"
        state["text"] = '{"aligned": false, "reason": "not asked"}'
        v = await g.check(inp)
        assert v.flagged and v.categories == ["misaligned"]
    finally:
        await clients.aclose()


def test_a_remote_judge_through_the_gateway(make_stack, judge_server, tmp_path: Path, monkeypatch) -> None:
    """`guardgate serve`'s server builds the remote judge's client: a misaligned tool call is blocked."""
    judge, url, state = judge_server
    state["text"] = '{"aligned": false, "reason": "the user never asked for this"}'
    monkeypatch.setenv("JUDGE_KEY", KEY)
    p = tmp_path / "agent.yaml"
    p.write_text(
        "name: agent\noutput:\n  steps:\n    - guard: alignment_check\n"
        f"      remote: {{base_url: '{url}', api_key_env: JUDGE_KEY, model: judge}}\n"
    )

    async def agent(request: web.Request, up: Any) -> web.StreamResponse:
        msg = {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "wire_money", "arguments": "{}"}}],
        }
        return web.json_response(
            {
                "id": "x",
                "object": "chat.completion",
                "created": 1,
                "model": "m",
                "choices": [{"index": 0, "message": msg, "finish_reason": "tool_calls"}],
            }
        )

    st = make_stack(
        {"upstreams": {"main": {"base_url": "SCRIPTED"}}, "policy": str(p)},
        handler=agent,
        policies=PolicyStore(required=[str(p)]),
    )
    r = st.openai().chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert r.choices[0].finish_reason == "content_filter" and not r.choices[0].message.tool_calls
    asked = judge.last
    assert asked.headers["Authorization"] == f"Bearer {KEY}" and json.loads(asked.body)["model"] == "judge"

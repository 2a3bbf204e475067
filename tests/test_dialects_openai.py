"""The OpenAI dialect: requests, responses, streams (exact bytes of wire_formats.md §6), errors,
models and moderations, checked against the real `openai` SDK's parsers where cheap."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest
from _dialects_sdk import openai_chunks, openai_status_error
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types import Model, ModerationCreateResponse
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from gateway.dialects import get
from gateway.dialects.base import DialectError, ModerationRequest, UpstreamStreamError
from gateway.dialects.sse import parse_all
from gateway.types import (
    Annotation,
    Completion,
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

D = get("openai")


def _b(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def C(x: str) -> str:  # wire_formats.md §6
    return (
        '{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1700000000,"model":"M",'
        f'"choices":[{{"index":0,"delta":{{}},"logprobs":null,"finish_reason":"{x}"}}]}}'
    )


ROLE = (
    'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1700000000,"model":"M",'
    '"choices":[{"index":0,"delta":{"role":"assistant","content":"","refusal":null},"logprobs":null,'
    '"finish_reason":null}]}\n\n'
)
START = StreamStart("chatcmpl-1", "M", 1700000000)


def _ex(**kw: Any) -> Exchange:
    return Exchange(model="M", messages=[Message.of("user", "hi")], stream=True, **kw)


def _encode(events: list[Any], ex: Exchange | None = None) -> bytes:
    enc = D.stream_encoder(ex or _ex())
    return b"".join(enc.encode(e) for e in events) + enc.end()


# --------------------------------------------------------------------------- requests

RICH_REQUEST: dict[str, Any] = {
    "model": "gpt-4o",
    "messages": [
        {"role": "system", "content": "be nice"},
        {"role": "developer", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "what is this?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            ],
            "name": "bob",
        },
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "look", "arguments": '{"q":1}'}}
            ],
        },
        {"role": "tool", "content": "a cat", "tool_call_id": "call_1"},
    ],
    "temperature": 0.5,
    "top_p": 0.9,
    "frequency_penalty": 0.1,
    "presence_penalty": 0.2,
    "n": 2,
    "seed": 7,
    "stop": ["\n\n", "END"],
    "user": "u-1",
    "max_completion_tokens": 100,
    "tools": [
        {
            "type": "function",
            "function": {
                "name": "look",
                "description": "d",
                "parameters": {"type": "object"},
                "strict": True,
            },
        }
    ],
    "tool_choice": {"type": "function", "function": {"name": "look"}},
    "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
    "stream": True,
    "stream_options": {"include_usage": True, "include_obfuscation": False},
    "logit_bias": {"50256": -100},
    "parallel_tool_calls": False,
    "my_extra_body_key": {"any": ["thing"]},
}


def test_decode_rich_request() -> None:
    ex = D.decode_request(_b(RICH_REQUEST))
    assert ex.model == "gpt-4o" and ex.stream and ex.include_usage
    roles = [m.role for m in ex.messages]
    assert roles == ["system", "developer", "user", "assistant", "tool"]
    user = ex.messages[2]
    assert user.parts == [
        Part("text", "what is this?"),
        Part("image", image_url="data:image/png;base64,AAAA"),
    ]
    assert user.name == "bob" and user.text == "what is this?"
    assert ex.messages[3].parts == [] and ex.messages[3].tool_calls == [ToolCall("call_1", "look", '{"q":1}')]
    assert ex.messages[4].tool_call_id == "call_1"
    assert ex.params == {
        "temperature": 0.5,
        "top_p": 0.9,
        "frequency_penalty": 0.1,
        "presence_penalty": 0.2,
        "n": 2,
        "seed": 7,
        "stop": ["\n\n", "END"],
        "user": "u-1",
        "max_tokens": 100,
        "tools": [{"name": "look", "description": "d", "parameters": {"type": "object"}, "strict": True}],
        "tool_choice": {"name": "look"},
        "response_format": RICH_REQUEST["response_format"],
    }
    assert ex.extra["openai"] == {
        "stream_options": {"include_obfuscation": False},
        "logit_bias": {"50256": -100},
        "parallel_tool_calls": False,
        "my_extra_body_key": {"any": ["thing"]},
    }


def test_request_round_trip_is_exact_for_a_same_dialect_upstream() -> None:
    assert D.encode_request(D.decode_request(_b(RICH_REQUEST))) == RICH_REQUEST


def test_max_tokens_field_follows_the_client() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 5}
    assert D.encode_request(D.decode_request(_b(body)))["max_tokens"] == 5
    ex = Exchange(model="m", messages=[Message.of("user", "x")], params={"max_tokens": 5})
    assert "max_tokens" in D.encode_request(ex)  # a translated request: the widely accepted field


def test_include_usage_only_with_stream_and_media_parts_kept() -> None:
    body = {
        "model": "m",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "t"},
                    {"type": "input_audio", "input_audio": {"data": "AA", "format": "wav"}},
                    {"type": "image_url", "image_url": {"url": "http://i", "detail": "low"}},
                ],
            },
            {"role": "assistant", "content": [{"type": "refusal", "refusal": "no"}], "refusal": None},
            {"role": "function", "name": "f", "content": "r"},
        ],
        "stream_options": {"include_usage": True},
    }
    ex = D.decode_request(_b(body))
    assert not ex.stream and not ex.include_usage
    # media parts are kept as sent (the policy's `content:` rule decides them), re-encoded unchanged
    assert ex.messages[0].parts == [Part("text", "t"), Part("audio", data="AA", format="wav"),
                                    Part("image", image_url="http://i", detail="low")]
    assert ex.messages[0].parts[1].path == "messages[0].content[1]"
    assert ex.messages[1].text == "no"
    assert (
        ex.messages[2].role == "tool" and ex.messages[2].tool_call_id is None and ex.messages[2].name == "f"
    )
    out = D.encode_request(ex)
    assert out["messages"][2] == {"role": "function", "name": "f", "content": "r"}
    assert out["messages"][0]["content"] == body["messages"][0]["content"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"\xff\xfe{}", None),
        (b"{not json", None),
        (b"[1,2]", None),
        (b'{"model":"m","messages":[{"role":"user","content":"x"}],"temperature":NaN}', None),
        (_b({"messages": []}), "model"),
        (_b({"model": 3, "messages": []}), "model"),
        (_b({"model": "m"}), "messages"),
        (_b({"model": "m", "messages": {}}), "messages"),
        (_b({"model": "m", "messages": []}), "messages"),
        (_b({"model": "m", "messages": ["hi"]}), "messages[0]"),
        (_b({"model": "m", "messages": [{"role": "robot", "content": "x"}]}), "messages[0].role"),
        (_b({"model": "m", "messages": [{"role": "user", "content": 5}]}), "messages[0].content"),
        (
            _b({"model": "m", "messages": [{"role": "user", "content": [{"type": "video"}]}]}),
            "messages[0].content[0].type",
        ),
        (_b({"model": "m", "messages": [{"role": "tool", "content": "x"}]}), "messages[0].tool_call_id"),
        (
            _b({"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}),
            "temperature",
        ),
        (
            _b({"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": True}),
            "temperature",
        ),
        (b'{"model":"m","messages":[{"role":"user","content":"x"}],"temperature":1e999}', "temperature"),
        (_b({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1.5}), "max_tokens"),
        (_b({"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}), "stream"),
        (_b({"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": [1]}), "stop[0]"),
        (
            _b({"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [{}]}),
            "tools[0].function",
        ),
    ],
)
def test_bad_requests_are_dialect_errors_with_param(body: bytes, param: str | None) -> None:
    with pytest.raises(DialectError) as ei:
        D.decode_request(body)
    assert ei.value.status == 400 and ei.value.param == param


# --------------------------------------------------------------------------- non-stream responses

RESPONSE: dict[str, Any] = {
    "id": "chatcmpl-9",
    "object": "chat.completion",
    "created": 1700000000,
    "model": "gpt-4o-2024",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "Hello!",
                "refusal": None,
                "annotations": [],
                "tool_calls": [
                    {"id": "call_a", "type": "function", "function": {"name": "f", "arguments": "{}"}}
                ],
            },
            "logprobs": None,
            "finish_reason": "tool_calls",
        }
    ],
    "usage": {
        "prompt_tokens": 5,
        "completion_tokens": 7,
        "total_tokens": 12,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
    },
    "service_tier": "default",
    "system_fingerprint": "fp_1",
}


def test_response_round_trip() -> None:
    c = D.decode_response(_b(RESPONSE))
    assert c.id == "chatcmpl-9" and c.model == "gpt-4o-2024" and c.created == 1700000000
    assert c.message.text == "Hello!" and c.message.tool_calls == [ToolCall("call_a", "f", "{}")]
    assert c.finish_reason == "tool_calls" and c.usage == Usage(5, 7, 12)
    out = D.encode_response(c, _ex())
    assert out == RESPONSE
    ChatCompletion.model_validate(out)


def test_encode_response_from_neutral_validates_in_the_sdk() -> None:
    c = Completion(
        id="x",
        model="",
        message=Message("assistant", tool_calls=[ToolCall("c1", "f", '{"a":1}')]),
        finish_reason="content_filter",
        usage=Usage(1, 2, 3),
        extra={"guardgate": {"blocked_by": "llama_guard"}},
    )
    out = D.encode_response(c, _ex())
    cc = ChatCompletion.model_validate(out)
    assert cc.model == "M" and cc.choices[0].message.content is None
    assert cc.choices[0].finish_reason == "content_filter"
    assert cc.model_extra == {"guardgate": {"blocked_by": "llama_guard"}}
    out = D.encode_response(
        Completion(id="y", model="m", message=Message("assistant"), finish_reason="weird"), _ex()
    )
    assert out["choices"][0]["message"]["content"] == "" and out["choices"][0]["finish_reason"] == "stop"
    assert "usage" not in out


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"[]",
        b'{"choices":"x"}',
        b'{"choices":[{"message":1}]}',
        b'{"choices":[], "usage":{"prompt_tokens":"1"}}',
    ],
)
def test_bad_upstream_responses_are_502(body: bytes) -> None:
    with pytest.raises(DialectError) as ei:
        D.decode_response(body)
    assert ei.value.status == 502


# --------------------------------------------------------------------------- stream encoder: exact bytes


def test_stream_normal_end_exact_bytes() -> None:
    assert _encode([START, Finish("stop")]) == (ROLE + f"data: {C('stop')}\n\ndata: [DONE]\n\n").encode()


def test_stream_content_filter_end_exact_bytes() -> None:
    assert (
        _encode([START, Finish("content_filter")])
        == (ROLE + f"data: {C('content_filter')}\n\ndata: [DONE]\n\n").encode()
    )


def test_stream_text_and_usage_chunk_exact_bytes() -> None:
    body = _encode(
        [START, TextDelta("Hi"), Finish("stop"), UsageEvent(Usage(3, 1, 4))], _ex(include_usage=True)
    )
    head = '{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1700000000,"model":"M","choices":['
    assert body.decode() == (
        f"data: {head}"
        '{"index":0,"delta":{"role":"assistant","content":"","refusal":null},"logprobs":null,"finish_reason":null}],'
        '"usage":null}\n\n'
        f"data: {head}"
        '{"index":0,"delta":{"content":"Hi"},"logprobs":null,"finish_reason":null}],"usage":null}\n\n'
        f"data: {head}"
        '{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}],"usage":null}\n\n'
        f"data: {head}"
        '],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}\n\n'
        "data: [DONE]\n\n"
    )


def test_usage_dropped_unless_client_asked() -> None:
    assert _encode([START, Finish("stop"), UsageEvent(Usage(3, 1, 4))]) == _encode([START, Finish("stop")])


def test_error_frame_exact_and_raised_by_sdk() -> None:
    enc = D.stream_encoder(_ex())
    body = enc.encode(START) + enc.encode(TextDelta("a"))
    err = enc.error("Request blocked by content policy", "content_filter", type="invalid_request_error")
    assert err == (
        b'data: {"error":{"message":"Request blocked by content policy","type":"invalid_request_error",'
        b'"param":null,"code":"content_filter"}}\n\n'
    )
    assert enc.end() == b"" and enc.encode(TextDelta("late")) == b""
    with pytest.raises(openai.APIError) as ei:
        openai_chunks(body + err)
    assert ei.value.code == "content_filter" and ei.value.message == "Request blocked by content policy"


def test_annotation_rides_on_the_final_chunk() -> None:
    for events in (
        [START, TextDelta("x"), Annotation({"verdict": "block"}), Finish("content_filter")],
        [START, TextDelta("x"), Finish("content_filter"), Annotation({"verdict": "block"})],
    ):
        body = _encode(events)
        frames = parse_all(body)
        last = json.loads(frames[-2].data)
        assert (
            last["guardgate"] == {"verdict": "block"}
            and last["choices"][0]["finish_reason"] == "content_filter"
        )
        chunks = openai_chunks(body)
        assert chunks[-1].model_extra == {"guardgate": {"verdict": "block"}}
        assert chunks[-1].choices[0].delta.content is None  # delta present ({}), per §0.4


def test_annotation_with_usage_goes_on_the_usage_chunk() -> None:
    body = _encode(
        [START, Finish("stop"), UsageEvent(Usage(1, 1, 2)), Annotation({"a": 1})], _ex(include_usage=True)
    )
    last = json.loads(parse_all(body)[-2].data)
    assert last["choices"] == [] and last["guardgate"] == {"a": 1}


def test_sdk_assembles_an_encoded_stream() -> None:
    events = [
        START,
        TextDelta("Let me "),
        TextDelta('check ✓ "quotes" \n newline'),
        ToolCallDelta(0, '{"city":', id="call_1", name="weather"),
        ToolCallDelta(0, '"Paris"}'),
        ToolCallDelta(1, "", id="call_2", name="time"),
        ToolCallDelta(1, "{}"),
        Finish("tool_calls"),
        UsageEvent(Usage(10, 5, 15)),
    ]
    body = _encode(events, _ex(include_usage=True))
    for frame in parse_all(body)[:-1]:
        ChatCompletionChunk.model_validate(json.loads(frame.data))  # strict validation of every chunk
    state = ChatCompletionStreamState()
    for chunk in openai_chunks(body, pieces=7):
        state.handle_chunk(chunk)
    final = state.get_final_completion()
    msg = final.choices[0].message
    assert msg.content == 'Let me check ✓ "quotes" \n newline'
    assert [(t.id, t.function.name, t.function.arguments) for t in msg.tool_calls or []] == [
        ("call_1", "weather", '{"city":"Paris"}'),
        ("call_2", "time", "{}"),
    ]
    assert final.choices[0].finish_reason == "tool_calls" and final.usage and final.usage.total_tokens == 15
    assert final.id == "chatcmpl-1" and final.model == "M"


def test_events_before_start_get_an_identity_and_n_choices() -> None:
    body = _encode([TextDelta("a", index=1), Finish("length", index=1), TextDelta("b"), Finish("stop")])
    chunks = openai_chunks(body)
    assert len({c.id for c in chunks}) == 1 and chunks[0].model == "M"
    by_index: dict[int, list[Any]] = {}
    for c in chunks:
        for ch in c.choices:
            by_index.setdefault(ch.index, []).append(ch)
    assert by_index[1][0].delta.role == "assistant" and by_index[0][0].delta.role == "assistant"
    assert [ch.finish_reason for ch in by_index[1] if ch.finish_reason] == ["length"]


def test_lone_surrogate_text_still_encodes() -> None:
    body = _encode([START, TextDelta("a\ud800b"), Finish("stop")])
    assert b'"a\\ud800b"' in body
    assert openai_chunks(body)[1].choices[0].delta.content == "a\ud800b"


# --------------------------------------------------------------------------- stream decoder

UPSTREAM = (
    b'data: {"id":"","object":"","created":0,"model":"","choices":[],"prompt_filter_results":[]}\n\n'
    b'data: {"id":"chatcmpl-7","object":"chat.completion.chunk","created":1700000001,"model":"gpt-x",'
    b'"system_fingerprint":"fp_9","choices":[{"index":0,"delta":{"role":"assistant","content":"","refusal":null},'
    b'"logprobs":null,"finish_reason":null}],"usage":null,"obfuscation":"Zz"}\n\n'
    b'data: {"id":"chatcmpl-7","object":"chat.completion.chunk","created":1700000001,"model":"gpt-x",'
    b'"choices":[{"index":0,"delta":{"content":"Hi"},"logprobs":null,"finish_reason":null}],"usage":null}\n\n'
    b": keepalive\n\n"
    b'data: {"id":"chatcmpl-7","object":"chat.completion.chunk","created":1700000001,"model":"gpt-x",'
    b'"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"call_1","type":"function",'
    b'"function":{"name":"f","arguments":""}}]},"logprobs":null,"finish_reason":null}],"usage":null}\n\n'
    b'data: {"id":"chatcmpl-7","object":"chat.completion.chunk","created":1700000001,"model":"gpt-x",'
    b'"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"call_1","function":{"arguments":"{}"}}]},'
    b'"logprobs":null,"finish_reason":null}],"usage":null}\n\n'
    b'data: {"id":"chatcmpl-7","object":"chat.completion.chunk","created":1700000001,"model":"gpt-x",'
    b'"choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"tool_calls"}],"usage":null}\n\n'
    b'data: {"id":"chatcmpl-7","object":"chat.completion.chunk","created":1700000001,"model":"gpt-x",'
    b'"choices":[],"usage":{"prompt_tokens":4,"completion_tokens":2,"total_tokens":6}}\n\n'
    b"data: [DONE]\n\n"
)


def _decode(body: bytes) -> tuple[list[Any], Any]:
    dec = D.stream_decoder()
    out: list[Any] = []
    for ev in parse_all(body):
        out += dec.feed(ev.event, ev.data)
    return out, dec


def test_decoder_on_a_realistic_upstream() -> None:
    events, dec = _decode(UPSTREAM)
    assert events == [
        StreamStart("chatcmpl-7", "gpt-x", 1700000001, extra={"openai": {"system_fingerprint": "fp_9"}}),
        TextDelta("Hi"),
        ToolCallDelta(0, "", id="call_1", name="f"),
        ToolCallDelta(0, "{}"),  # a repeated id on a later fragment is not a new call
        Finish("tool_calls"),
        UsageEvent(Usage(4, 2, 6)),
    ]
    assert dec.done() and dec.ended_cleanly()


def test_same_dialect_transcode_is_byte_identical_for_canonical_streams() -> None:
    events = [
        StreamStart("chatcmpl-1", "M", 1700000000, extra={"openai": {"system_fingerprint": "fp_1"}}),
        TextDelta("Hello"),
        ToolCallDelta(0, '{"a":', id="call_x", name="f"),
        ToolCallDelta(0, "1}"),
        Finish("tool_calls"),
        UsageEvent(Usage(1, 2, 3)),
    ]
    ex = _ex(include_usage=True)
    original = _encode(events, ex)
    decoded, _ = _decode(original)
    assert decoded == events
    assert _encode(decoded, ex) == original


def test_decoder_errors() -> None:
    dec = D.stream_decoder()
    with pytest.raises(UpstreamStreamError) as ei:
        dec.feed(None, '{"error":{"message":"overloaded","type":"server_error","code":"overloaded"}}')
    assert ei.value.message == "overloaded" and ei.value.code == "overloaded" and ei.value.status == 502
    for data in ("{bad", "[1]", '{"choices":"x"}', '{"choices":[{"delta":{"content":5}}]}', ""):
        with pytest.raises(UpstreamStreamError):
            D.stream_decoder().feed(None, data)
    dec = D.stream_decoder()
    assert not dec.done()
    assert dec.feed(None, "[DONE]") == [] and dec.done()


# --------------------------------------------------------------------------- errors


def test_error_body_and_sdk_exception() -> None:
    body = D.error_body(400, "Request blocked by content policy", code="content_filter", param="messages")
    assert body == {  # §6 E
        "error": {
            "message": "Request blocked by content policy",
            "type": "invalid_request_error",
            "param": "messages",
            "code": "content_filter",
        }
    }
    e = openai_status_error(400, body)
    assert isinstance(e, openai.BadRequestError)
    assert (e.code, e.param, e.type) == ("content_filter", "messages", "invalid_request_error")


def test_decode_error_shapes() -> None:
    assert D.decode_error(429, _b({"error": {"message": "slow down", "code": "rate_limit"}})) == (
        "slow down",
        "rate_limit",
    )
    assert D.decode_error(
        400, _b({"error": {"message": "bad", "type": "invalid_request_error", "code": None}})
    ) == (
        "bad",
        "invalid_request_error",
    )
    assert D.decode_error(404, _b({"detail": "Not Found"})) == ("Not Found", None)
    assert D.decode_error(502, b"<html>Bad Gateway</html>") == (
        "upstream returned HTTP 502 Bad Gateway: <html>Bad Gateway</html>",
        None,
    )
    assert D.decode_error(599, b"") == ("upstream returned HTTP 599", None)


# --------------------------------------------------------------------------- models, moderations


def test_models() -> None:
    models = [{"id": "m1", "created": 5, "owned_by": "me"}, {"id": "m2", "created": 0, "owned_by": ""}]
    body = D.encode_models(models)
    assert body["object"] == "list"
    assert [Model.model_validate(m).id for m in body["data"]] == ["m1", "m2"]
    assert D.decode_models(_b(body)) == models
    assert D.decode_models(_b([{"id": "x"}])) == [{"id": "x", "created": 0, "owned_by": ""}]
    with pytest.raises(DialectError):
        D.decode_models(b'{"data":[{"id":1}]}')


def test_moderation_request_shapes() -> None:
    assert D.decode_moderation_request(
        _b({"input": "hi", "model": "omni-moderation-latest"})
    ) == ModerationRequest("omni-moderation-latest", [[Message.of("user", "hi")]])
    two = D.decode_moderation_request(_b({"input": ["a", "b"]}))
    assert two.model is None and [[m.text for m in conv] for conv in two.inputs] == [["a"], ["b"]]
    mm = D.decode_moderation_request(
        _b(
            {
                "input": [
                    {"type": "text", "text": "t"},
                    {"type": "image_url", "image_url": {"url": "http://i"}},
                ]
            }
        )
    )
    assert mm.inputs == [[Message("user", [Part("text", "t"), Part("image", image_url="http://i")])]]
    assert D.encode_moderation_request(two) == {"input": ["a", "b"]}
    for bad in ({"input": []}, {"input": 3}, {}, {"input": ["a", {"type": "text", "text": "b"}]}):
        with pytest.raises(DialectError):
            D.decode_moderation_request(_b(bad))


def test_moderation_response() -> None:
    out = D.encode_moderation_response(
        [
            {"flagged": True, "categories": ["S1", "S10", "S7"], "scores": {"S1": 0.9}},
            {"flagged": False, "categories": [], "scores": {}},
        ],
        model="llama-guard-3-1b",
    )
    resp = ModerationCreateResponse.model_validate(out)
    r0 = resp.results[0]
    assert r0.flagged and r0.categories.violence and r0.categories.hate and not r0.categories.sexual
    assert r0.category_scores.violence == 0.9 and r0.category_scores.hate == 1.0
    assert r0.model_extra == {"guardgate": {"categories": ["S1", "S7", "S10"]}}
    assert not resp.results[1].flagged and out["id"].startswith("modr-")
    back = D.decode_moderation_response(_b(out))
    assert back[0]["flagged"] and back[0]["categories"] == ["S1", "S10"] and back[0]["scores"]["S1"] == 0.9

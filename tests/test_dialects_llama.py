"""The native Llama API dialect: requests, responses, streams (exact bytes of wire_formats.md §6),
errors, models and moderations, checked against the real `llama-api-client` SDK where cheap."""

from __future__ import annotations

import json
from typing import Any

import llama_api_client
import pytest
from _dialects_sdk import llama_chunks, llama_status_error
from llama_api_client.types import (
    CreateChatCompletionResponse,
    CreateChatCompletionResponseStreamChunk,
    LlamaModel,
    ModerationCreateResponse,
)

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

D = get("llama")
START = StreamStart("ll-1", "", 1700000000)
EMPTY = '"delta":{"type":"text","text":""}'


def L(x: str) -> str:  # wire_formats.md §6
    return f'{{"id":"ll-1","event":{{"event_type":"complete",{EMPTY},"stop_reason":"{x}"}}}}'


START_FRAME = f'data: {{"id":"ll-1","event":{{"event_type":"start",{EMPTY}}}}}\n\n'


def METRICS(p: int, c: int, t: int) -> str:
    return (
        f'data: {{"id":"ll-1","event":{{"event_type":"metrics",{EMPTY},"metrics":['
        f'{{"metric":"num_completion_tokens","value":{c},"unit":"tokens"}},'
        f'{{"metric":"num_prompt_tokens","value":{p},"unit":"tokens"}},'
        f'{{"metric":"num_total_tokens","value":{t},"unit":"tokens"}}]}}}}\n\n'
    )


def _b(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def _ex(**kw: Any) -> Exchange:
    return Exchange(model="Llama-4-Maverick", messages=[Message.of("user", "hi")], stream=True, **kw)


def _encode(events: list[Any], ex: Exchange | None = None) -> bytes:
    enc = D.stream_encoder(ex or _ex())
    return b"".join(enc.encode(e) for e in events) + enc.end()


def _decode(body: bytes) -> tuple[list[Any], Any]:
    dec = D.stream_decoder()
    out: list[Any] = []
    for ev in parse_all(body):
        out += dec.feed(ev.event, ev.data)
    return out, dec


# --------------------------------------------------------------------------- requests

REQUEST: dict[str, Any] = {
    "model": "Llama-4-Maverick-17B-128E-Instruct-FP8",
    "messages": [
        {"role": "system", "content": "be brief"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "what is this?"},
                {"type": "image_url", "image_url": {"url": "https://x/cat.png"}},
            ],
        },
        {
            "role": "assistant",
            "content": {"type": "text", "text": "calling"},
            "stop_reason": "tool_calls",
            "tool_calls": [{"id": "t1", "function": {"name": "look", "arguments": "{}"}}],
        },
        {
            "role": "tool",
            "tool_call_id": "t1",
            "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
        },
    ],
    "max_completion_tokens": 256,
    "repetition_penalty": 1.1,
    "temperature": 0.6,
    "top_k": 40,
    "top_p": 0.9,
    "user": "u",
    "tools": [{"type": "function", "function": {"name": "look", "parameters": {"type": "object"}}}],
    "tool_choice": "auto",
    "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "object"}}},
    "stream": True,
    "some_future_field": 1,
}


def test_decode_request() -> None:
    ex = D.decode_request(_b(REQUEST))
    assert ex.stream and ex.include_usage  # a Llama stream always carries metrics
    assert [m.role for m in ex.messages] == ["system", "user", "assistant", "tool"]
    assert ex.messages[1].parts[1] == Part("image", image_url="https://x/cat.png")
    a = ex.messages[2]
    assert (
        a.text == "calling"
        and a.stop_reason == "tool_calls"
        and a.tool_calls == [ToolCall("t1", "look", "{}")]
    )
    assert ex.messages[3].tool_call_id == "t1" and ex.messages[3].text == "ab"
    assert ex.params == {
        "max_tokens": 256,
        "repetition_penalty": 1.1,
        "temperature": 0.6,
        "top_k": 40,
        "top_p": 0.9,
        "user": "u",
        "tools": [{"name": "look", "parameters": {"type": "object"}}],
        "tool_choice": "auto",
        "response_format": REQUEST["response_format"],
    }
    assert ex.extra == {"llama": {"some_future_field": 1}}
    assert D.encode_request(ex) == REQUEST


def test_encode_request_from_openai_shapes() -> None:
    ex = Exchange(
        model="m",
        messages=[
            Message.of("developer", "dev"),
            Message("system", [Part("text", "s")]),
            Message("assistant", [Part("text", "a"), Part("text", "b")], name="n"),
            Message("assistant", tool_calls=[ToolCall("c", "f", "{}")]),
            Message("tool", [Part("text", "r")], tool_call_id="c"),
        ],
        params={
            "stop": ["x"],
            "seed": 1,
            "n": 2,
            "frequency_penalty": 0.1,
            "max_tokens": 9,
            "response_format": {"type": "json_object"},
            "tool_choice": {"name": "f"},
        },
        extra={"openai": {"logit_bias": {}}},
    )
    assert D.encode_request(ex) == {
        "model": "m",
        "messages": [
            {"role": "system", "content": "dev"},
            {"role": "system", "content": "s"},
            {"role": "assistant", "content": {"type": "text", "text": "ab"}},
            {"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "content": "r", "tool_call_id": "c"},
        ],
        "max_completion_tokens": 9,
        "tool_choice": {"type": "function", "function": {"name": "f"}},
    }


@pytest.mark.parametrize(
    ("part", "role"),
    [(Part("image", image_url="http://i", path="messages[0].content[1]"), "system"),
     (Part("audio", data="AA", format="wav", path="messages[0].content[1]", wire_type="input_audio"), "user"),
     (Part("file", file_id="file_1", path="messages[0].content[1]", wire_type="file"), "user")],
)
def test_media_without_a_llama_slot_refused_not_dropped(part: Part, role: str) -> None:
    ex = Exchange(model="m", messages=[Message(role, [Part("text", "s"), part])])  # type: ignore[arg-type]
    with pytest.raises(DialectError) as e:
        D.encode_request(ex)
    assert (e.value.status, e.value.code, e.value.param) == (400, "unsupported_content", "messages[0].content[1]")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"\x80", None),
        (b"null", None),
        (_b({"model": "m", "messages": [{"role": "developer", "content": "x"}]}), "messages[0].role"),
        (
            _b({"model": "m", "messages": [{"role": "system", "content": [{"type": "image_url"}]}]}),
            "messages[0].content[0].type",
        ),
        (_b({"model": "m", "messages": [{"role": "assistant", "content": 1}]}), "messages[0].content"),
        (
            _b({"model": "m", "messages": [{"role": "assistant", "tool_calls": [{"id": "x"}]}]}),
            "messages[0].tool_calls[0].function",
        ),
        (_b({"model": "m", "messages": [{"role": "user", "content": "x"}], "top_k": "many"}), "top_k"),
        (_b({"model": "", "messages": [{"role": "user", "content": "x"}]}), "model"),
    ],
)
def test_bad_requests(body: bytes, param: str | None) -> None:
    with pytest.raises(DialectError) as ei:
        D.decode_request(body)
    assert ei.value.status == 400 and ei.value.param == param


# --------------------------------------------------------------------------- non-stream responses

RESPONSE: dict[str, Any] = {
    "id": "ll-resp",
    "completion_message": {
        "role": "assistant",
        "content": {"type": "text", "text": "Hello"},
        "stop_reason": "tool_calls",
        "tool_calls": [{"id": "t", "function": {"name": "f", "arguments": '{"x":1}'}}],
    },
    "metrics": [
        {"metric": "num_completion_tokens", "value": 7, "unit": "tokens"},
        {"metric": "num_prompt_tokens", "value": 5, "unit": "tokens"},
        {"metric": "num_total_tokens", "value": 12, "unit": "tokens"},
    ],
}


def test_response_round_trip_and_sdk() -> None:
    c = D.decode_response(_b(RESPONSE))
    assert c.id == "ll-resp" and c.message.text == "Hello" and c.finish_reason == "tool_calls"
    assert c.usage == Usage(5, 7, 12) and c.message.tool_calls == [ToolCall("t", "f", '{"x":1}')]
    out = D.encode_response(c, _ex())
    assert out == RESPONSE
    r = CreateChatCompletionResponse.model_validate(out)
    assert r.completion_message.content.text == "Hello"  # type: ignore[union-attr]


def test_response_variants() -> None:
    c = D.decode_response(
        _b({"completion_message": {"role": "assistant", "content": "plain", "stop_reason": "end_of_turn"}})
    )
    assert c.message.text == "plain" and c.finish_reason == "stop" and c.usage is None
    c = Completion(
        id="i",
        model="m",
        message=Message("assistant"),
        finish_reason="content_filter",
        extra={"guardgate": {"v": 1}},
    )
    out = D.encode_response(c, _ex())
    assert out == {
        "id": "i",
        "completion_message": {
            "role": "assistant",
            "content": {"type": "text", "text": ""},
            "stop_reason": "content_filter",
        },
        "guardgate": {"v": 1},
    }
    r = CreateChatCompletionResponse.construct(**out)  # content_filter is outside the typed enum: unvalidated
    assert r.completion_message.content.text == ""  # type: ignore[union-attr]
    assert r.completion_message.stop_reason == "content_filter"
    for bad in (
        b'{"completion_message":{},"metrics":[{"metric":"num_total_tokens","value":1e999}]}',
        b"{}",
        b'{"completion_message":[]}',
        b'{"completion_message":{},"metrics":[{"metric":"num_total_tokens","value":"x"}]}',
    ):
        with pytest.raises(DialectError) as ei:
            D.decode_response(bad)
        assert ei.value.status == 502


# --------------------------------------------------------------------------- stream encoder: exact bytes


def test_stream_normal_end_exact_bytes() -> None:
    body = _encode([START, TextDelta("Hi"), Finish("stop"), UsageEvent(Usage(3, 2, 5))])
    assert body.decode() == (
        START_FRAME
        + 'data: {"id":"ll-1","event":{"event_type":"progress","delta":{"type":"text","text":"Hi"}}}\n\n'
        + f"data: {L('stop')}\n\n"
        + METRICS(3, 2, 5)
    )
    assert b"[DONE]" not in body


def test_stream_content_filter_end_exact_bytes() -> None:
    assert (
        _encode([START, Finish("content_filter")]).decode()
        == START_FRAME + f"data: {L('content_filter')}\n\n"
    )


def test_usage_before_finish_is_emitted_after_it() -> None:
    body = _encode([START, UsageEvent(Usage(1, 1, 2)), Finish("length")])
    assert body.decode() == START_FRAME + f"data: {L('length')}\n\n" + METRICS(1, 1, 2)
    body = _encode([START, UsageEvent(Usage(1, 1, 2))])  # no finish at all: metrics at end()
    assert body.decode() == START_FRAME + METRICS(1, 1, 2)


def test_annotation_inside_the_complete_event() -> None:
    for events in (
        [START, Annotation({"blocked": True}), Finish("content_filter")],
        [START, Finish("content_filter"), Annotation({"blocked": True})],
    ):
        frames = parse_all(_encode(events))
        ev = json.loads(frames[-1].data)["event"]
        assert ev["event_type"] == "complete" and ev["guardgate"] == {"blocked": True}
    chunks = llama_chunks(_encode(events))
    assert chunks[-1].event.stop_reason == "content_filter"  # passed through unvalidated (§4.3)


def test_error_frame_raises_in_sdk() -> None:
    enc = D.stream_encoder(_ex())
    body = enc.encode(START) + enc.encode(TextDelta("partial"))
    err = enc.error("blocked", "content_filter")
    assert err.startswith(b"event: error\ndata: {") and err.endswith(b"}\n\n")
    assert enc.end() == b""
    with pytest.raises(llama_api_client.APIError) as ei:
        llama_chunks(body + err)
    assert ei.value.body["error"]["code"] == "content_filter"  # type: ignore[index]
    assert ei.value.body["title"] == "Bad Gateway"  # type: ignore[index]


def test_sdk_reads_an_encoded_stream_with_every_event_carrying_a_delta() -> None:
    events = [
        START,
        TextDelta("Hé "),
        ToolCallDelta(0, '{"a":', id="c1", name="f"),
        ToolCallDelta(1, "{}", id="c2", name="g"),
        ToolCallDelta(0, "1}"),  # back to the first call: its id is repeated
        Finish("tool_calls"),
        UsageEvent(Usage(4, 3, 7)),
    ]
    body = _encode(events)
    for frame in parse_all(body):
        CreateChatCompletionResponseStreamChunk.model_validate(json.loads(frame.data))
    chunks = llama_chunks(body, pieces=7)
    assert [c.event.event_type for c in chunks] == [
        "start",
        "progress",
        "progress",
        "progress",
        "progress",
        "complete",
        "metrics",
    ]
    text = ""
    for c in chunks:
        if c.event.delta.type == "text":
            text += c.event.delta.text  # what the official examples do on every event
    assert text == "Hé "
    assert {m.metric: m.value for m in chunks[-1].event.metrics or []}["num_total_tokens"] == 7
    decoded, dec = _decode(body)
    assert decoded == [StreamStart("ll-1", "", decoded[0].created), *events[1:]]
    assert dec.done() and dec.ended_cleanly()


def test_non_zero_choices_dropped() -> None:
    assert _encode([START, TextDelta("x", index=1), Finish("stop", index=1)]) == _encode([START])


# --------------------------------------------------------------------------- stream decoder


def test_decoder_on_upstream_variants() -> None:
    body = (
        b'data: {"id":"a","event":{"event_type":"progress","delta":{"type":"text","text":"x"}}}\n\n'
        b'data: {"id":"a","event":{"event_type":"progress",'
        b'"delta":{"type":"tool_call","function":{"arguments":"{"}}}}\n\n'
        b'data: {"id":"a","event":{"event_type":"progress",'
        b'"delta":{"type":"tool_call","function":{"arguments":"}"}}}}\n\n'
        b'data: {"id":"a","event":{"event_type":"complete","delta":{"type":"text","text":""},'
        b'"stop_reason":"out_of_tokens",'
        b'"metrics":[{"metric":"num_prompt_tokens","value":2.0},{"metric":"num_completion_tokens","value":3.0}]}}\n\n'
    )
    events, dec = _decode(body)
    assert events[1:] == [
        TextDelta("x"),
        ToolCallDelta(0, "{"),  # first fragment without id: a call with no id (the encoder makes one)
        ToolCallDelta(0, "}"),
        Finish("length"),
        UsageEvent(Usage(2, 3, 5)),
    ]
    assert isinstance(events[0], StreamStart) and events[0].id == "a"
    assert not dec.done() and dec.ended_cleanly()  # no metrics event: EOF is still a clean end


@pytest.mark.parametrize(
    ("event", "data", "message", "code"),
    [
        ("error", '{"error":{"message":"boom","code":"overloaded"}}', "boom", "overloaded"),
        ("error", "not json", "not json", "upstream_error"),
        (
            None,
            '{"title":"Internal Server Error","detail":"model crashed"}',
            "model crashed",
            "upstream_error",
        ),
        (None, '{"error":"quota"}', "quota", "upstream_error"),
        (None, '{"id":"x"}', "upstream sent a stream chunk without an event object", "bad_upstream_response"),
        (None, "[DONE]", "upstream sent a stream chunk that is not JSON", "bad_upstream_response"),
        (None, '{"event":{"delta":{"type":"text","text":1}}}', None, "bad_upstream_response"),
    ],
)
def test_decoder_errors(event: str | None, data: str, message: str | None, code: str) -> None:
    with pytest.raises(UpstreamStreamError) as ei:
        D.stream_decoder().feed(event, data)
    assert ei.value.code == code and ei.value.status == 502
    if message is not None:
        assert ei.value.message == message


def test_bare_json_error_line_from_parser() -> None:
    body = START_FRAME.encode() + b'{"error":{"message":"mid-stream failure"}}\n'
    (start, err) = parse_all(body)
    dec = D.stream_decoder()
    dec.feed(start.event, start.data)
    with pytest.raises(UpstreamStreamError, match="mid-stream failure"):
        dec.feed(err.event, err.data)


# --------------------------------------------------------------------------- errors


def test_error_body_and_sdk() -> None:
    body = D.error_body(400, "Request blocked by content policy", code="content_filter", param="messages")
    assert body == {
        "error": {
            "message": "Request blocked by content policy",
            "type": "invalid_request_error",
            "param": "messages",
            "code": "content_filter",
        },
        "title": "Bad Request",
        "detail": "Request blocked by content policy",
    }
    e = llama_status_error(400, body)
    assert isinstance(e, llama_api_client.BadRequestError) and e.body == body


def test_decode_error() -> None:
    assert D.decode_error(400, _b({"title": "Bad Request", "detail": "no such model"})) == (
        "no such model",
        None,
    )
    assert D.decode_error(400, _b(D.error_body(400, "m", code="c"))) == ("m", "c")
    assert D.decode_error(500, b"oops") == ("upstream returned HTTP 500 Internal Server Error: oops", None)
    assert D.decode_error(503, b"[]") == ("upstream returned HTTP 503 Service Unavailable", None)


# --------------------------------------------------------------------------- models, moderations


def test_models() -> None:
    body = D.encode_models([{"id": "Llama-4", "created": 1, "owned_by": "Meta"}])
    assert LlamaModel.model_validate(body["data"][0]).owned_by == "Meta"
    assert D.decode_models(_b(body)) == [{"id": "Llama-4", "created": 1, "owned_by": "Meta"}]


def test_moderations() -> None:
    req = D.decode_moderation_request(_b({"messages": [{"role": "user", "content": "hi"}]}))
    assert req == ModerationRequest(None, [[Message.of("user", "hi")]])
    assert D.encode_moderation_request(req) == {"messages": [{"role": "user", "content": "hi"}]}
    assert D.encode_moderation_request(
        ModerationRequest("LG", [[Message.of("user", "a")], [Message.of("user", "b")]])
    ) == {
        "messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
        "model": "LG",
    }
    with pytest.raises(DialectError) as ei:
        D.decode_moderation_request(_b({"input": "hi"}))
    assert ei.value.param == "messages"
    out = D.encode_moderation_response(
        [{"flagged": True, "categories": ["S10", "Violent Crimes", "s2"], "scores": {}}], model="Llama-Guard"
    )
    assert out == {
        "model": "Llama-Guard",
        "results": [{"flagged": True, "flagged_categories": ["S1", "S2", "S10"]}],
    }
    ModerationCreateResponse.model_validate(out)
    assert D.decode_moderation_response(_b(out)) == [
        {"flagged": True, "categories": ["S1", "S2", "S10"], "scores": {}}
    ]

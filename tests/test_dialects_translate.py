"""Translation between dialects, module level (the server-level runs with real SDKs over HTTP are
in test_dialect_e2e.py): requests, responses, streams, errors, each read back by the client's SDK."""

from __future__ import annotations

import json
from typing import Any

import llama_api_client
import openai
import pytest
from _dialects_sdk import llama_chunks, llama_status_error, openai_chunks, openai_status_error
from llama_api_client.types import CreateChatCompletionResponse
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletion

from gateway.dialects import get
from gateway.dialects.base import DialectError
from gateway.dialects.sse import SSEParser
from gateway.types import Exchange

OA, LL = get("openai"), get("llama")


def _b(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def _translate_stream(upstream: Any, client: Any, ex: Exchange, body: bytes, piece: int = 5) -> bytes:
    """What the server does on a translated stream: parse, decode, encode, with the upstream body
    arriving in small TCP pieces."""
    parser, dec, enc = SSEParser(), upstream.stream_decoder(), client.stream_encoder(ex)
    out = b""
    try:
        for i in range(0, len(body), piece):
            for sse in parser.feed(body[i : i + piece]):
                for ev in dec.feed(sse.event, sse.data):
                    out += enc.encode(ev)
        for sse in parser.close():
            for ev in dec.feed(sse.event, sse.data):
                out += enc.encode(ev)
    except DialectError as e:
        return out + enc.error(e.message, e.code or "upstream_error")
    assert dec.ended_cleanly()
    return out + enc.end()


OPENAI_UPSTREAM = (
    b"".join(
        b"data: " + json.dumps(c, separators=(",", ":")).encode() + b"\n\n"
        for c in [
            {
                "id": "chatcmpl-U",
                "object": "chat.completion.chunk",
                "created": 1,
                "model": "gpt-x",
                "choices": [
                    {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                ],
                "obfuscation": "abc",
            },
            {
                "id": "chatcmpl-U",
                "object": "chat.completion.chunk",
                "created": 1,
                "model": "gpt-x",
                "choices": [{"index": 0, "delta": {"content": "Sunny "}, "finish_reason": None}],
            },
            {
                "id": "chatcmpl-U",
                "object": "chat.completion.chunk",
                "created": 1,
                "model": "gpt-x",
                "choices": [
                    {
                        "index": 0,
                        "delta": {
                            "tool_calls": [
                                {
                                    "index": 0,
                                    "id": "call_w",
                                    "type": "function",
                                    "function": {"name": "weather", "arguments": '{"c":'},
                                }
                            ]
                        },
                        "finish_reason": None,
                    }
                ],
            },
            {
                "id": "chatcmpl-U",
                "object": "chat.completion.chunk",
                "created": 1,
                "model": "gpt-x",
                "choices": [
                    {
                        "index": 0,
                        "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]},
                    }
                ],
            },
            {
                "id": "chatcmpl-U",
                "object": "chat.completion.chunk",
                "created": 1,
                "model": "gpt-x",
                "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}],
            },
            {
                "id": "chatcmpl-U",
                "object": "chat.completion.chunk",
                "created": 1,
                "model": "gpt-x",
                "choices": [],
                "usage": {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13},
            },
        ]
    )
    + b"data: [DONE]\n\n"
)

LLAMA_UPSTREAM = (
    b'data: {"id":"ll-U","event":{"event_type":"start","delta":{"type":"text","text":""}}}\r\n\r\n'
    b'data: {"id":"ll-U","event":{"event_type":"progress","delta":{"type":"text","text":"Sunny "}}}\r\n\r\n'
    b": ping\r\n\r\n"
    b'data: {"id":"ll-U","event":{"event_type":"progress","delta":{"type":"tool_call","id":"call_w",'
    b'"function":{"name":"weather","arguments":"{\\"c\\":"}}}}\r\n\r\n'
    b'data: {"id":"ll-U","event":{"event_type":"progress","delta":{"type":"tool_call",'
    b'"function":{"arguments":"\\"Paris\\"}"}}}}\r\n\r\n'
    b'data: {"id":"ll-U","event":{"event_type":"complete","delta":{"type":"text","text":""},'
    b'"stop_reason":"tool_calls"}}\r\n\r\n'
    b'data: {"id":"ll-U","event":{"event_type":"metrics","delta":{"type":"text","text":""},"metrics":['
    b'{"metric":"num_completion_tokens","value":4,"unit":"tokens"},'
    b'{"metric":"num_prompt_tokens","value":9,"unit":"tokens"},'
    b'{"metric":"num_total_tokens","value":13,"unit":"tokens"}]}}\r\n\r\n'
)


def test_openai_upstream_to_llama_client_stream() -> None:
    ex = LL.decode_request(
        _b({"model": "Llama-4", "messages": [{"role": "user", "content": "w?"}], "stream": True})
    )
    body = _translate_stream(OA, LL, ex, OPENAI_UPSTREAM)
    assert b"[DONE]" not in body
    chunks = llama_chunks(body)
    assert [c.event.event_type for c in chunks] == [
        "start",
        "progress",
        "progress",
        "progress",
        "complete",
        "metrics",
    ]
    assert {c.id for c in chunks} == {"chatcmpl-U"}
    assert "".join(c.event.delta.text for c in chunks if c.event.delta.type == "text") == "Sunny "
    tools = [c.event.delta for c in chunks if c.event.delta.type == "tool_call"]
    assert tools[0].id == "call_w" and tools[0].function.name == "weather"
    assert "".join(t.function.arguments or "" for t in tools) == '{"c":"Paris"}'
    assert chunks[-2].event.stop_reason == "tool_calls"
    assert {m.metric: m.value for m in chunks[-1].event.metrics or []} == {
        "num_completion_tokens": 4,
        "num_prompt_tokens": 9,
        "num_total_tokens": 13,
    }


@pytest.mark.parametrize("include_usage", [True, False])
def test_llama_upstream_to_openai_client_stream(include_usage: bool) -> None:
    req: dict[str, Any] = {
        "model": "Llama-4",
        "messages": [{"role": "user", "content": "w?"}],
        "stream": True,
    }
    if include_usage:
        req["stream_options"] = {"include_usage": True}
    ex = OA.decode_request(_b(req))
    body = _translate_stream(LL, OA, ex, LLAMA_UPSTREAM)
    state = ChatCompletionStreamState()
    chunks = openai_chunks(body, pieces=3)
    for chunk in chunks:
        state.handle_chunk(chunk)
    final = state.get_final_completion()
    assert final.model == "Llama-4" and final.id == "ll-U"  # Llama chunks have no model: the request's
    msg = final.choices[0].message
    assert msg.content == "Sunny " and final.choices[0].finish_reason == "tool_calls"
    assert msg.tool_calls and msg.tool_calls[0].function.arguments == '{"c":"Paris"}'
    assert msg.tool_calls[0].id == "call_w"
    if include_usage:
        assert final.usage and (final.usage.prompt_tokens, final.usage.total_tokens) == (9, 13)
    else:
        assert final.usage is None and all(c.choices for c in chunks)  # no choices:[] chunk to trip on


def test_mid_stream_upstream_error_becomes_the_clients_error() -> None:
    ex_l = LL.decode_request(
        _b({"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True})
    )
    broken = (
        OPENAI_UPSTREAM[:300].rsplit(b"\n\n", 1)[0]
        + b'\n\ndata: {"error":{"message":"overloaded","code":"503"}}\n\n'
    )
    with pytest.raises(llama_api_client.APIError) as le:
        llama_chunks(_translate_stream(OA, LL, ex_l, broken))
    assert le.value.body["error"]["message"] == "overloaded"  # type: ignore[index]
    ex_o = OA.decode_request(
        _b({"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True})
    )
    broken = (
        LLAMA_UPSTREAM[:200].rsplit(b"\r\n\r\n", 1)[0]
        + b'\r\n\r\n{"title":"Error","detail":"GPU fell over"}\r\n'
    )
    with pytest.raises(openai.APIError) as oe:
        openai_chunks(_translate_stream(LL, OA, ex_o, broken))
    assert oe.value.message == "GPU fell over"


def test_llama_request_to_openai_upstream() -> None:
    ex = LL.decode_request(
        _b(
            {
                "model": "Llama-4",
                "messages": [
                    {"role": "system", "content": [{"type": "text", "text": "s"}]},
                    {"role": "user", "content": "u"},
                    {
                        "role": "assistant",
                        "content": {"type": "text", "text": ""},
                        "stop_reason": "tool_calls",
                        "tool_calls": [{"id": "t", "function": {"name": "f", "arguments": "{}"}}],
                    },
                    {"role": "tool", "tool_call_id": "t", "content": "r"},
                ],
                "max_completion_tokens": 10,
                "top_k": 5,
                "repetition_penalty": 1.2,
                "tool_choice": "required",
                "tools": [{"type": "function", "function": {"name": "f"}}],
                "stream": True,
            }
        )
    )
    assert OA.encode_request(ex) == {
        "model": "Llama-4",
        "messages": [
            {"role": "system", "content": "s"},
            {"role": "user", "content": "u"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"id": "t", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
            },
            {"role": "tool", "content": "r", "tool_call_id": "t"},
        ],
        "max_tokens": 10,
        "top_k": 5,
        "repetition_penalty": 1.2,
        "tools": [{"type": "function", "function": {"name": "f"}}],
        "tool_choice": "required",
        "stream": True,
        "stream_options": {"include_usage": True},  # so the Llama client gets its metrics
    }


def test_openai_request_to_llama_upstream_drops_what_llama_lacks() -> None:
    ex = OA.decode_request(
        _b(
            {
                "model": "m",
                "messages": [
                    {"role": "developer", "content": "d"},
                    {"role": "user", "content": "u", "name": "n"},
                ],
                "max_completion_tokens": 7,
                "stop": "x",
                "seed": 1,
                "logprobs": True,
                "stream": True,
                "stream_options": {"include_usage": False},
            }
        )
    )
    assert LL.encode_request(ex) == {
        "model": "m",
        "messages": [{"role": "system", "content": "d"}, {"role": "user", "content": "u"}],
        "max_completion_tokens": 7,
        "stream": True,
    }


def test_non_stream_responses_both_ways() -> None:
    oa_resp = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 5,
        "model": "gpt-x",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "hi", "refusal": None},
                "logprobs": None,
                "finish_reason": "length",
            }
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
        "system_fingerprint": "fp",
    }
    ex = LL.decode_request(_b({"model": "Llama-4", "messages": [{"role": "user", "content": "x"}]}))
    out = LL.encode_response(OA.decode_response(_b(oa_resp)), ex)
    r = CreateChatCompletionResponse.model_validate(out)
    assert r.completion_message.content.text == "hi" and r.completion_message.stop_reason == "length"  # type: ignore[union-attr]
    assert "system_fingerprint" not in out  # OpenAI-only, dropped on purpose
    assert {m.metric: m.value for m in r.metrics or []}["num_total_tokens"] == 3

    ll_resp = {
        "id": "ll-1",
        "completion_message": {
            "role": "assistant",
            "content": {"type": "text", "text": ""},
            "stop_reason": "tool_calls",
            "tool_calls": [{"id": "t", "function": {"name": "f", "arguments": "{}"}}],
        },
        "metrics": [{"metric": "num_prompt_tokens", "value": 4, "unit": "tokens"}],
    }
    ex = OA.decode_request(_b({"model": "Llama-4", "messages": [{"role": "user", "content": "x"}]}))
    cc = ChatCompletion.model_validate(OA.encode_response(LL.decode_response(_b(ll_resp)), ex))
    assert cc.model == "Llama-4" and cc.choices[0].message.content is None
    assert cc.choices[0].message.tool_calls and cc.choices[0].message.tool_calls[0].type == "function"
    assert cc.usage and (cc.usage.prompt_tokens, cc.usage.total_tokens) == (4, 4)


def test_errors_both_ways() -> None:
    msg, code = OA.decode_error(
        429, _b({"error": {"message": "Rate limit", "type": "requests", "code": "rate_limit"}})
    )
    e = llama_status_error(429, LL.error_body(429, msg, type="upstream_error", code=code))
    assert isinstance(e, llama_api_client.RateLimitError) and e.body["error"]["code"] == "rate_limit"  # type: ignore[index]
    msg, code = LL.decode_error(400, _b({"title": "Bad Request", "detail": "Unknown model"}))
    o = openai_status_error(400, OA.error_body(400, msg, type="upstream_error", code=code))
    assert isinstance(o, openai.BadRequestError) and o.body["message"] == "Unknown model"  # type: ignore[index]

"""Property tests (hypothesis): neutral → wire → neutral round trips preserve every field the wire
format carries; arbitrary or mutated bytes make decoders fail only with DialectError; whatever a
decoder accepts, every encoder can render."""

from __future__ import annotations

import json
import os
import string
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.dialects import get
from gateway.dialects.base import DialectError
from gateway.dialects.sse import SSEParser
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
DIALECTS = {"openai": OA, "llama": LL}
# GG_HYPOTHESIS_EXAMPLES=5000 for a deep run; the default keeps the suite fast.
SETTINGS = settings(
    max_examples=int(os.environ.get("GG_HYPOTHESIS_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

ident = st.text(string.ascii_letters + string.digits + "-_", min_size=1, max_size=12)
text = st.text(max_size=16)
nonempty = st.text(min_size=1, max_size=16)
finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
count = st.integers(0, 2**31)
url = st.builds(lambda s: f"https://x/{s}.png", ident)

# --------------------------------------------------------------------------- neutral strategies

text_part = st.builds(lambda t: Part("text", t), text)
image_part = st.builds(lambda u: Part("image", image_url=u), url)
tool_call = st.builds(ToolCall, ident, ident, text)


@st.composite
def message(draw: st.DrawFn, *, openai: bool) -> Message:
    role = draw(st.sampled_from(["system", "user", "assistant", "tool"] + (["developer"] if openai else [])))
    name = draw(st.none() | ident) if openai else None
    if role in ("system", "developer"):
        return Message(role, draw(st.lists(text_part, min_size=1, max_size=3)), name=name)
    if role == "user":
        return Message(role, draw(st.lists(text_part | image_part, min_size=1, max_size=3)), name=name)
    if role == "tool":
        return Message(role, draw(st.lists(text_part, min_size=1, max_size=3)), tool_call_id=draw(ident))
    return Message(
        role,
        draw(st.lists(text_part, max_size=1)),
        tool_calls=draw(st.lists(tool_call, max_size=3)),
        name=name,
        stop_reason=None if openai else draw(st.none() | st.sampled_from(["stop", "tool_calls", "length"])),
    )


tool_def = st.fixed_dictionaries(
    {"name": ident},
    optional={"description": text, "parameters": st.just({"type": "object"}), "strict": st.booleans()},
)


@st.composite
def exchange(draw: st.DrawFn, *, openai: bool) -> Exchange:
    params: dict[str, Any] = draw(
        st.fixed_dictionaries(
            {},
            optional={
                "temperature": finite,
                "top_p": finite,
                "max_tokens": count,
                "top_k": count,
                "repetition_penalty": finite,
                "user": text,
                "tools": st.lists(tool_def, min_size=1, max_size=3),
                "tool_choice": st.sampled_from(["none", "auto", "required"])
                | st.builds(lambda n: {"name": n}, ident),
                "response_format": st.just({"type": "text"})
                | st.builds(
                    lambda n: {
                        "type": "json_schema",
                        "json_schema": {"name": n, "schema": {"type": "object"}},
                    },
                    ident,
                ),
            },
        )
    )
    if openai:  # carried by OpenAI only
        params.update(
            draw(
                st.fixed_dictionaries(
                    {},
                    optional={
                        "stop": text | st.lists(text, max_size=3),
                        "seed": st.integers(-(2**40), 2**40),
                        "n": st.integers(1, 5),
                        "frequency_penalty": finite,
                        "presence_penalty": finite,
                    },
                )
            )
        )
    stream = draw(st.booleans())
    return Exchange(
        model=draw(ident),
        messages=draw(st.lists(message(openai=openai), min_size=1, max_size=5)),
        stream=stream,
        include_usage=(stream and draw(st.booleans())) if openai else stream,
        params=params,
    )


@st.composite
def completion(draw: st.DrawFn) -> Completion:
    return Completion(
        id=draw(ident),
        model=draw(ident),
        message=Message(
            "assistant",
            draw(st.lists(st.builds(lambda t: Part("text", t), nonempty), max_size=1)),
            tool_calls=draw(st.lists(tool_call, max_size=3)),
        ),
        finish_reason=draw(st.sampled_from(["stop", "length", "tool_calls", "content_filter"])),
        usage=draw(st.none() | st.builds(Usage, count, count, count)),
        created=draw(st.integers(0, 2**33)),
    )


@st.composite
def answer_choice(draw: st.DrawFn, index: int) -> Choice:
    """A choice of an OpenAI answer: text channels in the order the decoder reads them."""
    parts = [Part(ch, draw(nonempty)) for ch in ("text", "refusal", "reasoning", "transcript")  # type: ignore[arg-type]
             if draw(st.booleans())]
    return Choice(Message("assistant", parts, tool_calls=draw(st.lists(tool_call, max_size=2))),
                  draw(st.sampled_from(["stop", "length", "tool_calls", "content_filter", "function_call"])), index)


@st.composite
def multi_completion(draw: st.DrawFn) -> Completion:
    n = draw(st.integers(1, 3))
    return Completion(id=draw(ident), model=draw(ident), usage=draw(st.none() | st.builds(Usage, count, count, count)),
                      created=draw(st.integers(0, 2**33)), choices=[draw(answer_choice(i)) for i in range(n)])


@st.composite
def event_stream(draw: st.DrawFn, *, openai: bool) -> tuple[list[Event], bool]:
    """A well-formed neutral stream: start, deltas (tool calls opened in index order, the first
    fragment with id and name, later ones with non-empty arguments), one finish per choice,
    optional usage. Returns (events, include_usage)."""
    sx = draw(st.none() | ident) if openai else None
    start = StreamStart(draw(ident), draw(ident), draw(st.integers(0, 2**33)))
    if sx is not None:
        start.extra = {"openai": {"system_fingerprint": sx}}
    nchoices = draw(st.integers(1, 3)) if openai else 1
    events: list[Event] = [start]
    started: dict[int, int] = dict.fromkeys(range(nchoices), 0)
    ids = iter(f"call_{i}" for i in range(1000))
    for _ in range(draw(st.integers(0, 12))):
        idx = draw(st.integers(0, nchoices - 1))
        kind = draw(st.sampled_from(["text", "new_tool", "more_tool"]))
        if kind == "text" or (kind == "more_tool" and not started[idx]):
            channel = draw(st.sampled_from(["text", "refusal", "reasoning"])) if openai else "text"
            events.append(TextDelta(draw(nonempty), idx, channel))
        elif kind == "new_tool":
            k = started[idx]
            started[idx] += 1
            events.append(ToolCallDelta(k, draw(text), id=next(ids), name=draw(ident), index=idx))
        else:
            k = draw(st.integers(0, started[idx] - 1))
            events.append(ToolCallDelta(k, draw(nonempty), index=idx))
    for idx in draw(st.permutations(range(nchoices))):
        events.append(Finish(draw(st.sampled_from(["stop", "length", "tool_calls", "content_filter"])), idx))
    include_usage = draw(st.booleans()) if openai else True
    if draw(st.booleans()):
        events.append(UsageEvent(draw(st.builds(Usage, count, count, count))))
    return events, include_usage


def _transcode(name: str, events: list[Event], ex: Exchange, pieces: int = 0) -> tuple[list[Event], bytes]:
    enc = DIALECTS[name].stream_encoder(ex)
    body = b"".join(enc.encode(e) for e in events) + enc.end()
    parser, dec = SSEParser(), DIALECTS[name].stream_decoder()
    out: list[Event] = []
    chunks = [body] if not pieces else [body[i : i + pieces] for i in range(0, len(body), pieces)]
    for c in chunks:
        for sse in parser.feed(c):
            out += dec.feed(sse.event, sse.data)
    assert parser.pending == b"" and dec.ended_cleanly()
    return out, body


# --------------------------------------------------------------------------- round trips


@SETTINGS
@given(exchange(openai=True))
@pytest.mark.slow
def test_request_round_trip_openai(ex: Exchange) -> None:
    assert OA.decode_request(json.dumps(OA.encode_request(ex)).encode()) == ex


@SETTINGS
@given(exchange(openai=False))
@pytest.mark.slow
def test_request_round_trip_llama(ex: Exchange) -> None:
    assert LL.decode_request(json.dumps(LL.encode_request(ex)).encode()) == ex


@SETTINGS
@given(exchange(openai=False))
@pytest.mark.slow
def test_request_llama_through_openai_and_back(ex: Exchange) -> None:
    """A Llama client's request sent to an OpenAI upstream carries everything the Llama API has
    except assistant stop_reason (OpenAI has no such field)."""
    via = OA.decode_request(json.dumps(OA.encode_request(ex)).encode())
    back = LL.decode_request(json.dumps(LL.encode_request(via)).encode())
    for m in ex.messages:
        m.stop_reason = None
    assert back == ex


@SETTINGS
@given(completion())
@pytest.mark.slow
def test_response_round_trip_openai(c: Completion) -> None:
    assert OA.decode_response(json.dumps(OA.encode_response(c, Exchange("x", []))).encode()) == c


@SETTINGS
@given(multi_completion())
def test_response_round_trip_openai_every_choice(c: Completion) -> None:
    """Every choice of `n`, every text channel (content, refusal, reasoning, audio transcript)."""
    assert OA.decode_response(json.dumps(OA.encode_response(c, Exchange("x", []))).encode()) == c


@SETTINGS
@given(completion())
def test_response_round_trip_llama(c: Completion) -> None:
    back = LL.decode_response(json.dumps(LL.encode_response(c, Exchange("x", []))).encode())
    back.model, back.created = c.model, c.created  # not carried by the Llama API
    assert back == c


@SETTINGS
@given(event_stream(openai=True), st.integers(0, 40))
@pytest.mark.slow
def test_stream_round_trip_openai(stream: tuple[list[Event], bool], pieces: int) -> None:
    events, include_usage = stream
    ex = Exchange("fallback-model", [], stream=True, include_usage=include_usage)
    out, body = _transcode("openai", events, ex, pieces)
    expected = [e for e in events if include_usage or not isinstance(e, UsageEvent)]
    assert out == expected
    assert body.endswith(b"data: [DONE]\n\n")


@SETTINGS
@given(event_stream(openai=False), st.integers(0, 40))
def test_stream_round_trip_llama(stream: tuple[list[Event], bool], pieces: int) -> None:
    events, _ = stream
    out, body = _transcode("llama", events, Exchange("m", [], stream=True, include_usage=True), pieces)
    start = events[0]
    assert isinstance(start, StreamStart) and isinstance(out[0], StreamStart)
    assert out[0].id == start.id  # model and created are not carried by Llama chunks
    assert out[1:] == events[1:]
    assert b"[DONE]" not in body


@SETTINGS
@given(event_stream(openai=False))
def test_stream_llama_through_openai(stream: tuple[list[Event], bool]) -> None:
    """Llama upstream → OpenAI client (include_usage) → back: the same events."""
    events, _ = stream
    out, _ = _transcode("openai", events, Exchange("m", [], stream=True, include_usage=True))
    assert out == events


# --------------------------------------------------------------------------- robustness

json_value = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)

SAMPLES: dict[str, list[Any]] = {
    "request": [
        {
            "model": "m",
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": 3,
            "top_k": 2,
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
            "tool_choice": {"type": "function", "function": {"name": "f"}},
            "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {}}},
            "messages": [
                {"role": "system", "content": "s"},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "t"},
                        {"type": "image_url", "image_url": {"url": "u"}},
                    ],
                },
                {
                    "role": "assistant",
                    "content": "a",
                    "stop_reason": "stop",
                    "tool_calls": [
                        {"id": "i", "type": "function", "function": {"name": "f", "arguments": "{}"}}
                    ],
                },
                {"role": "assistant", "content": {"type": "text", "text": "a"}},
                {"role": "tool", "tool_call_id": "i", "content": "r"},
            ],
        },
        {
            "model": "m",
            "max_completion_tokens": 3,
            "stop": ["x"],
            "messages": [
                {"role": "developer", "content": [{"type": "text", "text": "d"}]},
                {"role": "assistant", "content": None, "refusal": "no", "tool_calls": []},
                {"role": "function", "name": "f", "content": "r"},
            ],
        },
    ],
    "response": [
        {
            "id": "x",
            "model": "m",
            "created": 1,
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": "c",
                        "tool_calls": [
                            {"id": "i", "type": "function", "function": {"name": "f", "arguments": ""}}
                        ],
                    },
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        },
        {
            "id": "x",
            "completion_message": {
                "role": "assistant",
                "content": {"type": "text", "text": "c"},
                "stop_reason": "stop",
                "tool_calls": [{"id": "i", "function": {"name": "f", "arguments": ""}}],
            },
            "metrics": [{"metric": "num_total_tokens", "value": 1, "unit": "tokens"}],
        },
    ],
    "chunk": [
        {
            "id": "c",
            "created": 1,
            "model": "m",
            "choices": [
                {
                    "index": 0,
                    "delta": {
                        "content": "x",
                        "tool_calls": [{"index": 0, "id": "i", "function": {"name": "f", "arguments": "{"}}],
                    },
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        },
        {
            "id": "c",
            "event": {
                "event_type": "complete",
                "delta": {"type": "tool_call", "id": "i", "function": {"name": "f", "arguments": "{"}},
                "stop_reason": "stop",
                "metrics": [{"metric": "num_prompt_tokens", "value": 1}],
            },
        },
    ],
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
def mutated(draw: st.DrawFn, kind: str) -> Any:
    doc = json.loads(json.dumps(draw(st.sampled_from(SAMPLES[kind]))))
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(doc)
        path = draw(st.sampled_from(paths))
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


def _render_everywhere(ex: Exchange) -> None:
    for d in DIALECTS.values():
        json.dumps(d.encode_request(ex))


def _render_completion(c: Completion) -> None:
    for d in DIALECTS.values():
        json.dumps(d.encode_response(c, Exchange("m", [])))


def _render_events(events: list[Event]) -> None:
    for d in DIALECTS.values():
        enc = d.stream_encoder(Exchange("m", [], stream=True, include_usage=True))
        for e in [*events, Annotation({"k": 1})]:
            assert isinstance(enc.encode(e), bytes)
        enc.end()


def _try(fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except DialectError:
        return None


@pytest.mark.parametrize("name", ["openai", "llama"])
@SETTINGS
@given(body=st.binary(max_size=200) | st.builds(lambda v: json.dumps(v).encode(), json_value))
def test_arbitrary_bytes_only_dialect_errors(name: str, body: bytes) -> None:
    d = DIALECTS[name]
    ex = _try(d.decode_request, body)
    if ex is not None:
        _render_everywhere(ex)
    c = _try(d.decode_response, body)
    if c is not None:
        _render_completion(c)
    _try(d.decode_models, body)
    _try(d.decode_moderation_request, body)
    _try(d.decode_moderation_response, body)
    msg, _code = d.decode_error(500, body)  # never raises
    assert isinstance(msg, str) and msg
    text = body.decode("utf-8", "replace")
    dec = d.stream_decoder()
    events = _try(dec.feed, None, text) or []
    _try(dec.feed, "error", text)
    _render_events(events)


@pytest.mark.parametrize("name", ["openai", "llama"])
@SETTINGS
@given(req=mutated("request"), resp=mutated("response"), chunk=mutated("chunk"))
@pytest.mark.slow
def test_mutated_json_only_dialect_errors(name: str, req: Any, resp: Any, chunk: Any) -> None:
    d = DIALECTS[name]
    ex = _try(d.decode_request, json.dumps(req).encode())
    if ex is not None:
        _render_everywhere(ex)
    c = _try(d.decode_response, json.dumps(resp).encode())
    if c is not None:
        _render_completion(c)
    dec = d.stream_decoder()
    events = (_try(dec.feed, None, json.dumps(chunk)) or []) + (_try(dec.feed, None, json.dumps(chunk)) or [])
    _render_events(events)


@pytest.mark.slow
def test_mutation_strategy_reaches_both_outcomes() -> None:
    """The fuzzers above are only worth something if mutants are sometimes accepted and sometimes
    rejected."""
    seen: set[tuple[str, bool]] = set()

    @settings(max_examples=300, deadline=None)
    @given(mutated("request"))
    def probe(req: Any) -> None:
        for name, d in DIALECTS.items():
            seen.add((name, _try(d.decode_request, json.dumps(req).encode()) is not None))

    probe()
    assert seen == {("openai", True), ("openai", False), ("llama", True), ("llama", False)}

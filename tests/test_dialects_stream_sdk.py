"""Every client dialect's stream encoder, fed the same random neutral event sequence (released in
random batches, as the gate releases them), produces what its real SDK parses back to the same
text, tool calls and finish: OpenAI chat through `openai`'s `ChatCompletionStreamState`, the
Responses API through `openai`'s `responses.stream()` accumulator and its final Response, legacy
completions through `openai.Stream`, the Llama API through `llama-api-client`'s stream (which has no
accumulator of its own: its chunks are joined here as a client would)."""

from __future__ import annotations

import itertools
import os
import string

import httpx2
import openai
from _dialects_sdk import llama_chunks, openai_chunks
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types import Completion as OACompletion

from gateway.dialects import codec
from gateway.dialects.llama_api import stop_reason_out
from gateway.dialects.openai import FINISH_REASONS
from gateway.types import Event, Exchange, Finish, Message, StreamStart, TextDelta, ToolCallDelta, Usage, UsageEvent

SETTINGS = settings(max_examples=int(os.environ.get("GG_HYPOTHESIS_EXAMPLES", "50")), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
ident = st.text(string.ascii_letters + string.digits + "-_", min_size=1, max_size=12)
piece = st.text(min_size=1, max_size=12)


@st.composite
def neutral(draw: st.DrawFn) -> list[Event]:
    """A released stream of one answer: a start, text and tool-call fragments in any order, a
    finish, sometimes usage."""
    events: list[Event] = [StreamStart(draw(ident), "m", 1700000000)]
    ncalls = 0
    for _ in range(draw(st.integers(0, 12))):
        kind = draw(st.sampled_from(["text", "text", "new_tool", "more_tool"]))
        if kind == "text" or (kind == "more_tool" and not ncalls):
            events.append(TextDelta(draw(piece)))
        elif kind == "new_tool":
            events.append(ToolCallDelta(ncalls, draw(st.text(max_size=8)), id=f"call_{ncalls}", name=draw(ident)))
            ncalls += 1
        else:
            events.append(ToolCallDelta(draw(st.integers(0, ncalls - 1)), draw(piece)))
    events.append(Finish(draw(st.sampled_from(["stop", "length", "tool_calls", "content_filter"]))))
    if draw(st.booleans()):
        events.append(UsageEvent(Usage(3, 4, 7)))
    return events


def expected(events: list[Event]) -> tuple[str, list[tuple[str, str]], str]:
    text, calls, finish = "", {}, ""
    for e in events:
        if isinstance(e, TextDelta):
            text += e.text
        elif isinstance(e, ToolCallDelta):
            name, args = calls.get(e.call_index, (e.name or "", ""))
            calls[e.call_index] = (name, args + e.arguments)
        elif isinstance(e, Finish):
            finish = e.reason
    return text, [calls[k] for k in sorted(calls)], finish


def encode(kind: str, dialect: str, events: list[Event], cuts: list[int], include_usage: bool = True) -> bytes:
    """The encoder's bytes, the events handed over in the batches `cuts` makes."""
    ex = Exchange(model="m", messages=[Message.of("user", "x")], stream=True, include_usage=include_usage)
    enc = codec(dialect, kind).stream_encoder(ex)
    bounds = sorted({0, len(events), *(c % (len(events) + 1) for c in cuts)})
    body = b"".join(enc.encode_all(events[a:b]) for a, b in itertools.pairwise(bounds))
    return body + enc.end()


def _openai_client(body: bytes) -> openai.OpenAI:
    def answer(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, content=body, headers={"content-type": "text/event-stream"})

    return openai.OpenAI(api_key="t", base_url="http://gateway.invalid/v1", max_retries=0,
                         http_client=httpx2.Client(transport=httpx2.MockTransport(answer)))


cuts = st.lists(st.integers(0, 40), max_size=6)


@SETTINGS
@given(neutral(), cuts)
def test_openai_chat_sdk_accumulates_what_was_released(events: list[Event], cuts: list[int]) -> None:
    text, calls, finish = expected(events)
    state = ChatCompletionStreamState()
    for chunk in openai_chunks(encode("chat", "openai", events, cuts), pieces=9):
        state.handle_chunk(chunk)
    msg = state.current_completion_snapshot.choices[0]  # (get_final_completion raises on `length`)
    assert (msg.message.content or "") == text
    assert [(t.function.name, t.function.arguments) for t in msg.message.tool_calls or []] == calls
    assert msg.finish_reason == (finish if finish in FINISH_REASONS else "stop")


@SETTINGS
@given(neutral(), cuts)
def test_llama_sdk_parses_what_was_released(events: list[Event], cuts: list[int]) -> None:
    text, calls, finish = expected(events)
    got_text, got_calls, stop = "", {}, None
    current = ""
    for chunk in llama_chunks(encode("chat", "llama", events, cuts), pieces=9):
        ev = chunk.event
        if ev.event_type == "progress" and ev.delta.type == "text":
            got_text += ev.delta.text
        elif ev.event_type == "progress" and ev.delta.type == "tool_call":
            current = ev.delta.id or current  # a fragment without an id continues the current call
            name, args = got_calls.get(current, ("", ""))
            fn = ev.delta.function
            got_calls[current] = (fn.name or name if fn else name, args + ((fn.arguments or "") if fn else ""))
        elif ev.event_type == "complete":
            stop = ev.stop_reason
    assert got_text == text
    assert list(got_calls.values()) == calls
    assert stop == stop_reason_out(finish)


@SETTINGS
@given(neutral(), cuts)
def test_responses_sdk_accumulator_gives_the_released_answer(events: list[Event], cuts: list[int]) -> None:
    text, calls, finish = expected(events)
    body = encode("responses", "openai", events, cuts)
    client = _openai_client(body)
    final = list(client.responses.create(model="m", input="x", stream=True))[-1].response
    assert final.output_text == text
    assert [(o.name, o.arguments) for o in final.output if o.type == "function_call"] == calls
    incomplete = {"content_filter": "content_filter", "length": "max_output_tokens"}.get(finish)
    assert final.status == ("incomplete" if incomplete else "completed")
    assert (final.incomplete_details.reason if final.incomplete_details else None) == incomplete
    if not incomplete:  # the accumulator agent frameworks build on agrees
        with client.responses.stream(model="m", input="x") as s:
            list(s)
            acc = s.get_final_response()
        assert acc.output_text == text
        assert [(o.name, o.arguments) for o in acc.output if o.type == "function_call"] == calls


@SETTINGS
@given(neutral(), cuts)
def test_completions_sdk_parses_the_released_text(events: list[Event], cuts: list[int]) -> None:
    text, _, finish = expected(events)  # a completion has no tool calls: they are dropped
    resp = httpx2.Response(200, content=encode("completions", "openai", events, cuts),
                           request=httpx2.Request("POST", "http://gateway.invalid/v1/completions"))
    chunks = list(openai.Stream(cast_to=OACompletion, response=resp, client=_openai_client(b"")))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [finish]

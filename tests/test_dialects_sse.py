"""The incremental SSE parser: split safety, line endings, comments, and agreement with the SDKs'
own decoders (openai's and llama-api-client's `_streaming.SSEDecoder`)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from llama_api_client._streaming import SSEDecoder as LlamaSSEDecoder
from openai._streaming import SSEDecoder as OpenAISSEDecoder

from gateway.dialects.base import DialectError
from gateway.dialects.sse import SSEParser

SCENARIO = (
    b": keepalive\r\n\r\n"
    b'data: {"a":1}\r\n\r\n'
    b"event: message\r\ndata: line one\r\ndata: line two\r\n\r\n"
    b"data:no-space\r\r"
    b": comment inside\ndata: h\xc3\xa9llo \xe2\x82\xac\n\n"
    b'{"error":{"message":"bare"}}\n'
    b"\n\n\n"
    b"data: [DONE]\n\n"
    b"data: unterminated at EOF"
)
EXPECTED = [
    (None, '{"a":1}'),
    ("message", "line one\nline two"),
    (None, "no-space"),
    (None, "héllo €"),
    ("error", '{"error":{"message":"bare"}}'),
    (None, "[DONE]"),
]


def _events(chunks: list[bytes], **kw: bool) -> tuple[list[tuple[str | None, str]], bytes, SSEParser]:
    p = SSEParser(**kw)
    out, raw = [], b""
    for c in chunks:
        for ev in p.feed(c):
            out.append((ev.event, ev.data))
            raw += ev.raw
    for ev in p.close():
        out.append((ev.event, ev.data))
        raw += ev.raw
    return out, raw, p


def test_whole_scenario() -> None:
    got, raw, p = _events([SCENARIO])
    assert got == EXPECTED
    assert p.pending == b"data: unterminated at EOF"  # dropped, as the SDKs do
    # raw frames are the input minus comment-only frames, stray blank lines and the unterminated tail
    assert raw.startswith(b'data: {"a":1}\r\n\r\n')
    assert b"keepalive" not in raw
    assert raw.endswith(b'{"error":{"message":"bare"}}\ndata: [DONE]\n\n')


def test_every_split_point() -> None:
    for i in range(len(SCENARIO) + 1):
        got, _, p = _events([SCENARIO[:i], SCENARIO[i:]])
        assert got == EXPECTED, i
        assert p.pending == b"data: unterminated at EOF"


def test_three_way_splits_and_single_bytes() -> None:
    n = len(SCENARIO)
    for i in range(0, n, 3):
        for j in range(i, n, 7):
            got, _, _ = _events([SCENARIO[:i], SCENARIO[i:j], SCENARIO[j:]])
            assert got == EXPECTED, (i, j)
    got, raw_bytes, _ = _events([SCENARIO[k : k + 1] for k in range(n)])
    assert got == EXPECTED
    assert raw_bytes == _events([SCENARIO])[1]


def test_lone_cr_is_held_until_next_byte() -> None:
    p = SSEParser()
    assert p.feed(b"data: x\r") == []
    assert p.feed(b"\n") == []  # CRLF, not CR + LF (which would dispatch)
    (ev,) = p.feed(b"\r\n")
    assert (ev.event, ev.data, ev.raw) == (None, "x", b"data: x\r\n\r\n")
    # CR CR: the second CR is a blank line, seen once the next byte arrives
    assert p.feed(b"data: y\r\r") == []
    (ev,) = p.feed(b"d")
    assert ev.data == "y"
    # at EOF a held \r ends its line after all
    p = SSEParser()
    assert p.feed(b"data: z\n\r") == []
    assert [e.data for e in p.close()] == ["z"]
    assert p.pending == b""


def test_raw_is_byte_exact_across_feeds() -> None:
    frame = b'event: e\r\ndata: {"k":"v"}\r\n: c\r\ndata: 2\r\n\r\n'
    for i in range(len(frame) + 1):
        p = SSEParser()
        evs = p.feed(frame[:i]) + p.feed(frame[i:])
        assert len(evs) == 1 and evs[0].raw == frame and evs[0].data == '{"k":"v"}\n2'
        assert p.pending == b""


def test_comments_kept_on_request() -> None:
    p = SSEParser(keep_comments=True)
    evs = p.feed(b": ping\n\ndata: 1\n\n")
    assert [(e.comment, e.raw) for e in evs] == [(True, b": ping\n\n"), (False, b"data: 1\n\n")]


def test_utf8_split_inside_a_character() -> None:
    body = "data: 日本語 ✓\n\n".encode()
    for i in range(len(body) + 1):
        got, _, _ = _events([body[:i], body[i:]])
        assert got == [(None, "日本語 ✓")]


def test_invalid_utf8_is_replaced_not_raised() -> None:
    got, _, _ = _events([b"data: \xff\xfe ok\n\n"])
    assert got == [(None, "\ufffd\ufffd ok")]


def test_bare_json_can_be_disabled() -> None:
    got, _, _ = _events([b'{"error":1}\ndata: x\n\n'], bare_json_errors=False)
    assert got == [(None, "x")]


def test_event_size_limit() -> None:
    p = SSEParser(max_event_bytes=100)
    p.feed(b"data: " + b"x" * 50)
    with pytest.raises(DialectError) as ei:
        for _ in range(10):
            p.feed(b"x" * 20)
    assert ei.value.status == 502 and ei.value.code == "upstream_event_too_large"


def test_long_line_in_many_chunks_is_linear() -> None:
    p = SSEParser()
    for _ in range(20000):
        assert p.feed(b"x" * 64) == []
    # (quadratic re-joining would take seconds here)
    assert len(p.pending) == 20000 * 64


# --------------------------------------------------------------------------- vs the SDK decoders

_line = st.one_of(
    st.sampled_from(
        ["", "", "", "data: {}", "data:x", "data", "event: e", "event:", ": c", ":", '{"error":1}', "1"]
    ),
    st.builds(
        lambda f, v: f"{f}:{v}", st.sampled_from(["data", "event", "junk", "da ta"]), st.text(max_size=8)
    ),
).filter(lambda s: "\r" not in s and "\n" not in s and "id" not in s and "retry" not in s)
_eol = st.sampled_from(["\n", "\r\n", "\r"])
_doc = st.lists(st.tuples(_line, _eol), max_size=25).map(lambda ls: "".join(a + b for a, b in ls).encode())


def _sdk(decoder: object, body: bytes, cuts: list[int]) -> list[tuple[str | None, str]]:
    pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
    return [(e.event, e.data) for e in decoder.iter_bytes(iter(pieces))]  # type: ignore[attr-defined]


@settings(max_examples=300, deadline=None)
@given(_doc, st.lists(st.integers(0, 400), max_size=4))
@pytest.mark.slow
def test_same_events_as_the_sdks(body: bytes, cuts: list[int]) -> None:
    cuts = sorted(c for c in cuts if c <= len(body))
    ours_llama, _, _ = _events([body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)])
    assert ours_llama == _sdk(LlamaSSEDecoder(), body, cuts)
    ours_openai, _, _ = _events([body], bare_json_errors=False)
    assert ours_openai == _sdk(OpenAISSEDecoder(), body, cuts)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.lists(st.integers(0, 300), max_size=5))
def test_arbitrary_bytes_never_raise(body: bytes, cuts: list[int]) -> None:
    cuts = sorted(c for c in cuts if c <= len(body))
    p = SSEParser()
    for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True):
        for ev in p.feed(body[a:b]):
            assert isinstance(ev.data, str)

"""`relay.EventAligner`, the SSE event cutter both relay paths share: whole events only, the
terminator ends the response, a cut stream is reported, an endless event is refused."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.dialects.sse import MAX_EVENT_BYTES
from gateway.relay import DONE, EventAligner, EventTooLarge

EVENTS = [b'data: {"n": 1}\n\n', b'data: {"n": 2}\r\n\r\n', b": keep-alive\n\n", b'data: {"n": 3}\n\n']
STREAM = b"".join(EVENTS) + DONE + b"\n\n"


def run(stream: bytes, cuts: list[int], terminator: bytes | None = DONE) -> tuple[list[bytes], bool, tuple[bytes, str]]:
    """Feed `stream` cut at `cuts`; the blocks sent, whether the response ended early, and finish()."""
    aligner = EventAligner(terminator)
    sent: list[bytes] = []
    bounds = [0, *sorted(set(cuts)), len(stream)]
    for a, b in itertools.pairwise(bounds):
        if a == b:
            continue
        block, end = aligner.feed(stream[a:b])
        if block:
            sent.append(block)
        if end:
            return sent, True, (b"", "")
    return sent, False, aligner.finish()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=len(STREAM) - 1), max_size=12))
def test_any_split_sends_the_same_bytes_in_whole_events(cuts: list[int]) -> None:
    sent, ended, _ = run(STREAM, cuts)
    assert ended  # [DONE] ends the response as soon as it is out
    assert b"".join(sent) == STREAM
    for block in sent:
        assert block.endswith((b"\n\n", b"\r\n\r\n")), block  # never half an event


def test_bytes_after_the_terminator_in_the_same_read_are_passed_on() -> None:
    sent, ended, _ = run(STREAM[:-2] + b"\n\nextra", [len(STREAM) - 10])
    assert ended and b"".join(sent).endswith(DONE + b"\n\nextra")


def test_a_terminator_missing_its_blank_line_is_completed_at_eof() -> None:
    sent, ended, (tail, cut) = run(STREAM[:-2], [])
    assert not ended and cut == ""
    assert b"".join(sent) + tail == STREAM


@pytest.mark.parametrize(("stream", "why"), [
    (b"".join(EVENTS), "the upstream stream ended before its terminator"),
    (b"".join(EVENTS) + b'data: {"n": 4', "the upstream stream ended inside an event"),
])
def test_a_cut_stream_is_reported(stream: bytes, why: str) -> None:
    sent, ended, (tail, cut) = run(stream, [5, 40])
    assert not ended and tail == b"" and cut == why
    assert b"".join(sent) == b"".join(EVENTS)  # the half event is never sent


def test_without_a_terminator_a_clean_eof_is_fine() -> None:
    sent, ended, (tail, cut) = run(b"".join(EVENTS), [7], terminator=None)
    assert not ended and (tail, cut) == (b"", "") and b"".join(sent) == b"".join(EVENTS)


def test_an_event_that_never_ends_is_refused() -> None:
    aligner = EventAligner(DONE)
    aligner.feed(b"data: " + b"x" * (MAX_EVENT_BYTES // 2))
    with pytest.raises(EventTooLarge, match="larger than"):
        aligner.feed(b"x" * (MAX_EVENT_BYTES // 2 + 16))

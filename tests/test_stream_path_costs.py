"""What the guarded stream path does per stream, not per event: the gate tokenizes only text it has not
tokenized yet, and only when a window needs the count; what the gate releases together comes out as one
list and one encoded bytes value; a stream's telemetry is noted on the way (StreamStats)."""

from __future__ import annotations

from typing import Any

from policy_fakes import FakeUpstream, text_of, tokens_of

from gateway.dialects import codec
from gateway.dialects._common import qstr
from gateway.dialects.stream import Template, frame
from gateway.policy import gate as gate_mod
from gateway.policy.chain import PolicyRun
from gateway.policy.schema import parse_policy_text
from gateway.policy.tokens import count_tokens
from gateway.types import Exchange, Finish, Message, StreamStart, TextDelta

ANSWER = " ".join(f"word{i} is fine." for i in range(60))
POLICY = parse_policy_text("""
name: t
stream:
  check_every_tokens: 16
  max_unchecked_tokens: 0
  steps:
    - guard: regex
      patterns: ["forbidden phrase"]
      action: block
""")


def exchange() -> Exchange:
    return Exchange(model="m", messages=[Message.of("user", "hi")], stream=True)


async def test_the_gate_tokenizes_each_character_once_and_not_per_delta(monkeypatch: Any) -> None:
    seen: list[str] = []
    real = gate_mod.token_starts

    def counting(text: str) -> list[int]:
        seen.append(text)
        return real(text)

    monkeypatch.setattr(gate_mod, "token_starts", counting)
    deltas = tokens_of(ANSWER)
    run = PolicyRun(POLICY, request_id="r")
    events = [ev async for ev in run.guard_stream(exchange(), FakeUpstream(deltas).events())]
    rec = run.finish()
    assert text_of(events) == ANSWER
    assert "".join(seen) == ANSWER  # every character tokenized exactly once: nothing again
    assert len(seen) < len(deltas) / 2  # and not once per delta (the text in between waits for a window)
    # the counts the audit reports are still the tokens of the answer (boundaries of the runs tokenized)
    assert abs(rec["released_tokens"] - count_tokens(ANSWER)) <= len(seen)


async def test_a_release_is_one_list_and_one_write() -> None:
    async def upstream() -> Any:
        yield [StreamStart("c", "m")]
        yield [TextDelta(t) for t in tokens_of(ANSWER)]  # one network read with the whole answer
        yield [Finish("stop")]

    run = PolicyRun(POLICY, request_id="r")
    batches = [b async for b in run.guard_batches(exchange(), upstream())]
    enc = codec("openai", "chat").stream_encoder(exchange())
    writes = [w for w in (enc.encode_all(b) for b in batches) if w]
    run.finish()
    # the start at once; the answer in as many releases as checks passed it (not one per delta)
    assert len(batches) < len(tokens_of(ANSWER)) / 8
    assert len(writes) <= len(batches)
    body = b"".join(writes) + enc.end()
    assert body.count(b"data: ") == 1 + 1 + sum(1 for b in batches for e in b if isinstance(e, TextDelta)) + 1
    assert enc.stats.first_out is not None and enc.stats.finish_reasons == ["stop"]


def test_a_template_writes_what_the_serializer_writes() -> None:
    shape = {"id": "x", "choices": [{"index": 0, "delta": {"content": "\x00gg-hole-0\x00"}}]}
    tpl = Template(shape)
    for text in ["plain", 'quotes " and \\ and \n', "é ✓ 日本", "\ud800"]:
        want = frame({"id": "x", "choices": [{"index": 0, "delta": {"content": text}}]})
        assert tpl.fill(qstr(text)) == want

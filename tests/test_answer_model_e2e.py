"""Every model-written field of an answer is gated or dropped by rule (issues 16 and 24), through the
real gateway with the real `openai` SDK as client and a scripted upstream:

- non-stream `n > 1`: every choice kept and gated on its own;
- legacy `functions`: `function_call` arguments gated (non-stream) and streamed deltas carried and gated;
- `refusal`, `reasoning_content` / `reasoning`, `audio.transcript`, `annotations`, `logprobs`, unknown
  message keys: gated or dropped per the table in `gateway/dialects/openai.py` (`MESSAGE_FIELDS`,
  `CHOICE_FIELDS`), and a blocked `content` never leaves its extras behind;
- text the upstream sends for a choice after its `finish_reason` never reaches the client and is
  recorded in the audit record (`after_finish`).
"""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from harness import CREATED, oa_chunk, sse, stream_frames, wait_until

from gateway.policy.audit import AuditLog
from gateway.policy.chain import PolicyStore

PHRASE = "purple elephant protocol"
MSG = [{"role": "user", "content": "tell me"}]
FUNCTIONS = [{"name": "lookup", "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}]


def _policy(tmp_path: Path, action: str = "block") -> str:
    p = tmp_path / "p.yaml"
    p.write_text("name: p\n" + textwrap.dedent(f"""
        stream:
          check_every_tokens: 4
          max_unchecked_tokens: 0
          steps:
            - guard: regex
              patterns: [{{pattern: "{PHRASE}", category: secret-project}}]
              ignore_case: true
              action: {action}
              notice: "[gone]"
        """))
    return str(p)


def completion_body(*choices: dict[str, Any]) -> dict[str, Any]:
    return {"id": "chatcmpl-xyz", "object": "chat.completion", "created": CREATED, "model": "gpt-test",
            "choices": [{"index": i, "logprobs": None, "finish_reason": "stop", **ch} for i, ch in enumerate(choices)],
            "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}}


def msg(content: str | None = "fine words", **fields: Any) -> dict[str, Any]:
    return {"message": {"role": "assistant", "content": content, "refusal": None, **fields}}


@pytest.fixture
def gw(make_stack, tmp_path):
    """gw(answer, action="block"): a gateway with the regex policy whose upstream answers `answer`
    (a dict: JSON body; a list of bytes: SSE frames)."""

    def make(answer: Any, action: str = "block"):
        async def handler(request: web.Request, up) -> web.StreamResponse:
            if isinstance(answer, list):
                return await stream_frames(request, answer)
            return web.json_response(answer)

        audit_path = tmp_path / "audit.jsonl"
        st = make_stack({"upstreams": {"main": {"base_url": "SCRIPTED", "dialect": "openai"}},
                         "policy": _policy(tmp_path, action)}, handler=handler,
                        policies=PolicyStore(required=[_policy(tmp_path, action)]), audit=AuditLog(audit_path))
        st.audit_path = audit_path
        return st

    return make


def audit(st) -> dict[str, Any]:
    wait_until(lambda: st.audit_path.exists() and st.audit_path.read_text().strip() != "")
    return json.loads(st.audit_path.read_text().splitlines()[-1])


def create_raw(st, **kw: Any) -> tuple[Any, str]:
    """(parsed completion, the exact body the client received)."""
    raw = st.openai().chat.completions.with_raw_response.create(model="m", messages=MSG, **kw)
    return raw.parse(), raw.http_response.text


# --------------------------------------------------------------------------- n > 1


def test_n2_every_choice_is_returned(gw) -> None:
    st = gw(completion_body(msg("first answer"), msg("second answer")))
    c = st.openai().chat.completions.create(model="m", messages=MSG, n=2)
    assert st.upstream.last.json()["n"] == 2
    assert [ch.index for ch in c.choices] == [0, 1]
    assert [ch.message.content for ch in c.choices] == ["first answer", "second answer"]
    assert [ch.finish_reason for ch in c.choices] == ["stop", "stop"]


@pytest.mark.parametrize("bad", [0, 1])
def test_n2_each_choice_is_gated_on_its_own(gw, bad: int) -> None:
    texts = ["a clean answer", "a clean answer"]
    texts[bad] = f"the {PHRASE} is secret"
    st = gw(completion_body(msg(texts[0]), msg(texts[1])))
    c, body = create_raw(st, n=2)
    assert PHRASE not in body
    assert len(c.choices) == 2
    blocked, clean = c.choices[bad], c.choices[1 - bad]
    assert blocked.finish_reason == "content_filter" and not blocked.message.content
    assert clean.finish_reason == "stop" and clean.message.content == "a clean answer"
    rec = audit(st)
    assert rec["action"] == "block" and rec["blocked_stage"] == "output"


def test_duplicate_choice_indexes_are_guarded_apart(gw) -> None:
    """Two choices that both say index 0 are not merged into one guarded text."""
    body = completion_body(msg("first answer"), msg("second answer"))
    body["choices"][1]["index"] = 0
    st = gw(body)
    c = st.openai().chat.completions.create(model="m", messages=MSG, n=2)
    assert [ch.message.content for ch in c.choices] == ["first answer", "second answer"]


def test_n2_redact_applies_per_choice(gw) -> None:
    st = gw(completion_body(msg(f"one {PHRASE} one"), msg(f"two {PHRASE} two")), action="redact")
    c, body = create_raw(st, n=2)
    assert PHRASE not in body
    assert [ch.message.content for ch in c.choices] == ["one [gone] one", "two [gone] two"]


# --------------------------------------------------------------------------- legacy function_call


def test_legacy_function_call_carried_non_stream(gw) -> None:
    fc = {"name": "lookup", "arguments": '{"q": "weather"}'}
    st = gw(completion_body({**msg(None, function_call=fc), "finish_reason": "function_call"}))
    c = st.openai().chat.completions.create(model="m", messages=MSG, functions=FUNCTIONS)
    ch = c.choices[0]
    assert ch.finish_reason == "function_call"
    assert ch.message.function_call.name == "lookup" and ch.message.function_call.arguments == '{"q": "weather"}'
    assert ch.message.tool_calls is None


def test_legacy_function_call_arguments_gated_non_stream(gw) -> None:
    fc = {"name": "lookup", "arguments": json.dumps({"q": PHRASE})}
    st = gw(completion_body({**msg(None, function_call=fc), "finish_reason": "function_call"}))
    c, body = create_raw(st, functions=FUNCTIONS)
    assert PHRASE not in body
    assert c.choices[0].finish_reason == "content_filter" and c.choices[0].message.function_call is None


def _function_call_stream(arg_pieces: list[str]) -> list[bytes]:
    frames = [sse(oa_chunk({"role": "assistant", "content": None}))]
    frames.append(sse(oa_chunk({"function_call": {"name": "lookup", "arguments": ""}})))
    frames += [sse(oa_chunk({"function_call": {"arguments": a}})) for a in arg_pieces]
    frames += [sse(oa_chunk({}, "function_call")), sse("[DONE]")]
    return frames


def test_legacy_function_call_deltas_carried_in_stream(gw) -> None:
    pieces = ['{"q": ', '"wea', 'ther"}']
    st = gw(_function_call_stream(pieces))
    chunks = list(st.openai().chat.completions.create(model="m", messages=MSG, functions=FUNCTIONS, stream=True))
    fcs = [c.choices[0].delta.function_call for c in chunks if c.choices and c.choices[0].delta.function_call]
    assert fcs and fcs[0].name == "lookup"
    assert "".join(f.arguments or "" for f in fcs) == "".join(pieces)
    assert not any(c.choices[0].delta.tool_calls for c in chunks if c.choices)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        ["function_call"]


def test_legacy_function_call_deltas_gated_in_stream(gw) -> None:
    st = gw(_function_call_stream(['{"q": "the pur', "ple eleph", 'ant protocol"}']))
    chunks = list(st.openai().chat.completions.create(model="m", messages=MSG, functions=FUNCTIONS, stream=True))
    args = "".join(c.choices[0].delta.function_call.arguments or "" for c in chunks
                   if c.choices and c.choices[0].delta.function_call)
    assert "elephant" not in args
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        ["content_filter"]


# --------------------------------------------------------------------------- message extras

AUDIO = {"id": "audio_1", "data": "UklGRg==", "expires_at": 1700003600}
CITE = {"type": "url_citation", "url_citation": {"url": "https://example.com/a", "title": "A page",
                                                 "start_index": 0, "end_index": 4}}


def _logprobs(text_tokens: list[str], alt: str = "x") -> dict[str, Any]:
    return {"content": [{"token": t, "logprob": -0.1, "bytes": list(t.encode()),
                         "top_logprobs": [{"token": alt, "logprob": -3.0, "bytes": list(alt.encode())}]}
                        for t in text_tokens], "refusal": None}


# Where the phrase hides: (message fields, choice fields). Each must end in a blocked, clean answer.
HIDING = {
    "content": ({"content": f"the {PHRASE}"}, {}),
    "refusal": ({"content": None, "refusal": f"no: {PHRASE}"}, {}),
    "content_part_refusal": ({"content": [{"type": "refusal", "refusal": PHRASE}]}, {}),
    "reasoning_content": ({"reasoning_content": f"think {PHRASE}"}, {}),
    "reasoning": ({"reasoning": f"think {PHRASE}"}, {}),
    "audio.transcript": ({"audio": {**AUDIO, "transcript": f"say {PHRASE}"}}, {}),
    "annotations.title": ({"annotations": [{"type": "url_citation", "url_citation": {
        **CITE["url_citation"], "title": PHRASE}}]}, {}),
    "tool_calls.arguments": ({"content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
        "name": "f", "arguments": json.dumps({"q": PHRASE})}}]}, {}),
}


@pytest.mark.parametrize("where", list(HIDING))
def test_phrase_in_any_field_blocks_the_answer(gw, where: str) -> None:
    fields, choice = HIDING[where]
    m = {"role": "assistant", "content": "fine words", "refusal": None, **fields}
    st = gw(completion_body({"message": m, **choice}))
    c, body = create_raw(st)
    assert PHRASE not in body, where
    assert c.choices[0].finish_reason == "content_filter"
    assert audit(st)["action"] == "block"


def test_blocked_content_leaves_no_extras_behind(gw) -> None:
    """Clean extras of a blocked answer go with it: nothing of the choice but its finish remains."""
    m = {"role": "assistant", "content": f"the {PHRASE}", "refusal": None, "reasoning_content": "clean thoughts",
         "audio": {**AUDIO, "transcript": "clean words"}, "annotations": [CITE]}
    st = gw(completion_body({"message": m, "logprobs": _logprobs(["the ", PHRASE])}))
    _, body = create_raw(st)
    ch = json.loads(body)["choices"][0]
    assert ch["finish_reason"] == "content_filter" and ch["logprobs"] is None
    assert ch["message"]["content"] in (None, "")
    for k in ("reasoning_content", "audio", "annotations"):
        assert k not in ch["message"], k


def test_clean_extras_are_kept(gw) -> None:
    m = {"role": "assistant", "content": "fine words", "refusal": None, "reasoning_content": "clean thoughts",
         "audio": {**AUDIO, "transcript": "clean words"}, "annotations": [CITE]}
    st = gw(completion_body({"message": m, "logprobs": _logprobs(["fine", " words"], alt=PHRASE)}))
    c, body = create_raw(st)
    ch = json.loads(body)["choices"][0]
    out = ch["message"]
    assert ch["finish_reason"] == "stop" and out["content"] == "fine words"
    assert out["reasoning_content"] == "clean thoughts"
    assert out["audio"] == {**AUDIO, "transcript": "clean words"}
    assert out["annotations"] == [CITE]
    # logprobs kept (their tokens spell the checked content); top_logprobs alternatives emptied
    assert [t["token"] for t in ch["logprobs"]["content"]] == ["fine", " words"]
    assert all(t["top_logprobs"] == [] for t in ch["logprobs"]["content"])
    assert PHRASE not in body
    assert c.choices[0].message.audio.transcript == "clean words"


def test_reasoning_spelling_is_kept(gw) -> None:
    st = gw(completion_body(msg(reasoning="thought")))
    _, body = create_raw(st)
    out = json.loads(body)["choices"][0]["message"]
    assert out["reasoning"] == "thought" and "reasoning_content" not in out


def test_unknown_message_and_choice_keys_are_dropped(gw) -> None:
    """A key no rule covers never reaches the client, even on a clean answer."""
    st = gw(completion_body({**msg(thinking="harmless?", provider_notes={"x": "y"}),
                             "content_filter_results": {"hate": {"filtered": False}}}))
    c, body = create_raw(st)
    ch = json.loads(body)["choices"][0]
    assert c.choices[0].message.content == "fine words"
    assert "thinking" not in ch["message"] and "provider_notes" not in ch["message"]
    assert "content_filter_results" not in ch


def test_logprobs_that_do_not_spell_the_content_are_dropped(gw) -> None:
    st = gw(completion_body({**msg("fine words"), "logprobs": _logprobs(["fine", " words", f" {PHRASE}"])}))
    _, body = create_raw(st)
    assert json.loads(body)["choices"][0]["logprobs"] is None and PHRASE not in body


def test_redacted_content_drops_what_points_into_it(gw) -> None:
    """Redaction changes the content: annotations (offsets into it) and logprobs (its tokens) go;
    reasoning, untouched, stays; a redacted transcript keeps no audio data."""
    m = {"role": "assistant", "content": f"see {PHRASE} here", "refusal": None, "reasoning_content": "ok",
         "audio": {**AUDIO, "transcript": f"say {PHRASE}"}, "annotations": [CITE]}
    st = gw(completion_body({"message": m, "logprobs": _logprobs(["see ", PHRASE, " here"])}), action="redact")
    _, body = create_raw(st)
    ch = json.loads(body)["choices"][0]
    out = ch["message"]
    assert PHRASE not in body
    assert out["content"] == "see [gone] here" and out["reasoning_content"] == "ok"
    assert "annotations" not in out and ch["logprobs"] is None
    assert out["audio"] == {"transcript": "say [gone]"}


# --------------------------------------------------------------------------- streams


def test_stream_reasoning_deltas_carried_and_gated(gw) -> None:
    frames = [sse(oa_chunk({"role": "assistant", "content": ""})),
              sse(oa_chunk({"reasoning_content": "let me think. "})),
              sse(oa_chunk({"reasoning_content": "the purple ele"})),
              sse(oa_chunk({"reasoning_content": "phant protocol"})),
              sse(oa_chunk({"content": "answer"})), sse(oa_chunk({}, "stop")), sse("[DONE]")]
    st = gw(frames)
    chunks = list(st.openai().chat.completions.create(model="m", messages=MSG, stream=True))
    reasoning = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or ""
                        for c in chunks if c.choices)
    assert "let me think. ".startswith(reasoning) and "elephant" not in reasoning  # a prefix at most
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        ["content_filter"]


def test_stream_clean_reasoning_reaches_client(gw) -> None:
    frames = [sse(oa_chunk({"role": "assistant", "content": ""})), sse(oa_chunk({"reasoning": "hmm"})),
              sse(oa_chunk({"content": "answer"})), sse(oa_chunk({}, "stop")), sse("[DONE]")]
    st = gw(frames)
    chunks = list(st.openai().chat.completions.create(model="m", messages=MSG, stream=True))
    reasoning = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or ""
                        for c in chunks if c.choices)
    assert reasoning == "hmm"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "answer"


@pytest.mark.parametrize("late", [" FORBIDDEN-42", f" {PHRASE}"])
def test_content_after_finish_never_reaches_the_client(gw, late: str) -> None:
    frames = [sse(oa_chunk({"role": "assistant", "content": ""})), sse(oa_chunk({"content": "Hello"})),
              sse(oa_chunk({}, "stop")), sse(oa_chunk({"content": late})),
              sse(oa_chunk({"tool_calls": [{"index": 0, "id": "c", "type": "function",
                                            "function": {"name": "f", "arguments": "{}"}}]})),
              sse(oa_chunk({}, "length")), sse("[DONE]")]
    st = gw(frames)
    raw = st.openai().chat.completions.with_raw_response.create(model="m", messages=MSG, stream=True)
    body = raw.http_response.read().decode()
    assert "FORBIDDEN" not in body and PHRASE not in body and '"tool_calls"' not in body
    chunks = [json.loads(line[6:]) for line in body.splitlines() if line.startswith("data: {")]
    text = "".join(ch["delta"].get("content") or "" for c in chunks for ch in c["choices"])
    assert text == "Hello"
    finishes = [ch["finish_reason"] for c in chunks for ch in c["choices"] if ch["finish_reason"]]
    assert finishes == ["stop"]  # the first finish stands
    rec = audit(st)
    assert rec["after_finish"] == {"0": len(late) + len("f{}")}
    assert rec["action"] == "allow"


def test_after_finish_of_one_choice_the_other_choice_still_flows(gw) -> None:
    frames = [sse(oa_chunk({"role": "assistant", "content": ""})), sse(oa_chunk({"content": "A"})),
              sse(oa_chunk({"content": "B"}, index=1)), sse(oa_chunk({}, "stop")),
              sse(oa_chunk({"content": " late"})), sse(oa_chunk({"content": " more"}, index=1)),
              sse(oa_chunk({}, "stop", index=1)), sse("[DONE]")]
    st = gw(frames)
    chunks = list(st.openai().chat.completions.create(model="m", messages=MSG, stream=True, n=2))
    by = {0: "", 1: ""}
    for c in chunks:
        for ch in c.choices:
            by[ch.index] += ch.delta.content or ""
    assert by == {0: "A", 1: "B more"}
    assert audit(st)["after_finish"] == {"0": len(" late")}


def test_field_table_is_documented() -> None:
    """Every field the OpenAI answer model has a rule for is in the table users read."""
    from gateway.dialects.openai import CHOICE_FIELDS, MESSAGE_FIELDS

    doc = (Path(__file__).resolve().parent.parent / "docs" / "configuration.md").read_text()
    table = doc[doc.index("### What the output and stream stages see"):doc.index("### Guard options")]
    for key in (*MESSAGE_FIELDS, *CHOICE_FIELDS):
        if key not in ("*", "role", "index", "message", "finish_reason"):
            assert re.search(rf"`[^`]*\b{key}\b[^`]*`", table), key

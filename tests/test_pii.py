"""Issue 20, PII: the upstream never sees the values (its request log holds placeholders), the client
reads them restored with `unmask` (also when a placeholder is split across stream chunks, and in
tool-call arguments), the audit keeps kinds and counts, never values. Both dialects, the Responses
API, the real openai SDK; detectors checked on their own (checksums reject look-alikes)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from aiohttp import web
from harness import oa_chunk, sse, stream_frames, wait_until

from gateway.guards.base import GuardInput
from gateway.guards.pii import PiiGuard, iban_ok, luhn_ok
from gateway.policy.audit import AuditLog
from gateway.policy.chain import PolicyStore
from gateway.policy.schema import PolicyError, parse_policy_text
from gateway.types import Message

EMAIL = "jane.doe@example.com"
PHONE = "+44 20 7946 0958"
CARD = "4111 1111 1111 1111"
VALUES = (EMAIL, PHONE, CARD)
PROMPT = f"Write to {EMAIL} (phone {PHONE}) about card {CARD}; cc {EMAIL}."


def policy(tmp_path: Path, extra: str = "", unmask: bool = True, stream: str = "") -> str:
    p = tmp_path / "pii.yaml"
    p.write_text(f"""name: pii
input:
  steps:
    - guard: pii
      unmask: {str(unmask).lower()}
{extra}
{stream}""")
    return str(p)


def echo_handler(split: bool = True, tool: bool = False):
    """Answers with the placeholders it received (so unmask has something to restore); streamed, the
    first placeholder is cut in three chunks (`<EM` `AIL_` `1>`)."""

    async def handler(request: web.Request, up) -> web.StreamResponse:
        body = up.last.json()
        text = "Sent to <EMAIL_1> and <PHONE_1>."
        args = json.dumps({"to": "<EMAIL_1>", "card": "<CARD_1>"})
        if not body.get("stream"):
            msg: dict = {"role": "assistant", "content": text, "refusal": None}
            if tool:
                msg["tool_calls"] = [{"id": "c1", "type": "function", "function": {"name": "send", "arguments": args}}]
            return web.json_response({"id": "x", "object": "chat.completion", "created": 1, "model": "m",
                                      "choices": [{"index": 0, "message": msg, "finish_reason": "stop"}],
                                      "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})
        pieces = ["Sent to <EM", "AIL_", "1> and <PHONE_1", ">."] if split else [text]
        frames = [sse(oa_chunk({"role": "assistant", "content": ""}))]
        frames += [sse(oa_chunk({"content": p})) for p in pieces]
        if tool:
            frames.append(sse(oa_chunk({"tool_calls": [{"index": 0, "id": "c1", "type": "function",
                                                        "function": {"name": "send", "arguments": ""}}]})))
            for a in (args[:9], args[9:13], args[13:]):  # `{"to": "<E` / `MAIL` / `_1>", ...`
                frames.append(sse(oa_chunk({"tool_calls": [{"index": 0, "function": {"arguments": a}}]})))
        frames += [sse(oa_chunk({}, "tool_calls" if tool else "stop")), sse("[DONE]")]
        return await stream_frames(request, frames, delay=0.01)

    return handler


@pytest.fixture
def pii_stack(make_stack, tmp_path):
    def make(policy_path: str, handler=None, dialect: str = "openai"):
        audit = AuditLog(tmp_path / "audit.jsonl", include_content=True)
        st = make_stack({"upstreams": {"main": {"base_url": "SCRIPTED", "dialect": dialect}}, "policy": policy_path},
                        handler=handler or echo_handler(), policies=PolicyStore(required=[policy_path]), audit=audit)
        st.audit_path = tmp_path / "audit.jsonl"
        return st

    return make


def audit(st) -> list[dict]:
    wait_until(lambda: st.audit_path.exists() and st.audit_path.read_text().strip() != "")
    return [json.loads(line) for line in st.audit_path.read_text().splitlines()]


def assert_upstream_saw_no_values(st) -> str:
    sent = st.upstream.last.body.decode()
    for v in VALUES:
        assert v not in sent and json.dumps(v)[1:-1] not in sent
    assert "<EMAIL_1>" in sent and "<PHONE_1>" in sent and "<CARD_1>" in sent
    assert sent.count("<EMAIL_1>") == 2  # the same value, the same placeholder
    return sent


def assert_audit_has_no_values(st) -> dict:
    records = audit(st)  # waits for the record: the audit line may land just after the client's answer
    text = st.audit_path.read_text()
    for v in VALUES:
        assert v not in text
    step = next(s for s in records[-1]["steps"] if s["guard"] == "pii")
    assert step["details"]["kinds"] == {"card": 1, "email": 2, "phone": 1} and step["details"]["count"] == 4
    assert step["outcome"] == "redact" and sorted(step["categories"]) == ["card", "email", "phone"]
    return step


# ---------------------------------------------------------------------------- detectors


def test_checksums_reject_look_alikes() -> None:
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    assert iban_ok("GB82 WEST 1234 5698 7654 32") and not iban_ok("GB83 WEST 1234 5698 7654 32")
    g = PiiGuard(kinds={"ipv4": "mask", "ipv6": "mask"})
    assert not [f for f in PiiGuard().find("card 4111 1111 1111 1112, iban GB83 WEST 1234 5698 7654 32")
                if f.kind in ("card", "iban")]
    text = ("a@b.io +1 415-555-0132 4111-1111-1111-1111 DE89370400440532013000 "
            "123-45-6789 AB 12 34 56 C 130 692 544 12345678Z 10.0.0.1 2001:db8::1 12:30:45 2024-01-15 "
            "order 12345678 sk-proj-abcdefghijklmnopqrstuvwx ghp_abcdefghijklmnopqrstuvwxyz0123456789 "
            "Bearer abcdefghijklmnopqrstuvwxyz")
    kinds = [f.kind for f in g.find(text)]
    assert kinds == ["email", "phone", "card", "iban", "us_ssn", "uk_nino", "ca_sin", "es_dni", "ipv4", "ipv6",
                     "api_key", "api_key", "api_key"], kinds


async def test_same_value_same_placeholder_and_growing_conversation_keeps_numbers() -> None:
    g = PiiGuard(unmask=True)
    first = [Message.of("user", f"mail {EMAIL} and b@c.de")]
    v1 = await g.check(GuardInput("input", first))
    later = [*first, Message.of("assistant", f"ok {EMAIL}"), Message.of("user", "also x@y.org and b@c.de")]
    v2 = await g.check(GuardInput("input", later))
    r1 = {k: v for k, v in v1.restore.items()}
    assert r1 == {"<EMAIL_1>": EMAIL, "<EMAIL_2>": "b@c.de"}
    assert {k: v for k, v in v2.restore.items() if k in r1} == r1 and v2.restore["<EMAIL_3>"] == "x@y.org"
    # a placeholder the client itself wrote is never reused
    v3 = await g.check(GuardInput("input", [Message.of("user", f"<EMAIL_1> is literal, {EMAIL} is not")]))
    assert v3.restore == {"<EMAIL_2>": EMAIL}


def test_pii_cannot_run_in_parallel_with_the_upstream() -> None:
    with pytest.raises(PolicyError, match="parallel_with_upstream"):
        parse_policy_text("name: p\ninput:\n  steps:\n    - {guard: pii}\n"
                          "    - {guard: regex, patterns: [x], parallel_with_upstream: true}\n")
    parse_policy_text("name: p\ninput:\n  steps:\n    - {guard: regex, patterns: [x], action: redact}\n")


# ---------------------------------------------------------------------------- through the gateway


@pytest.mark.parametrize("stream", [True, False])
def test_openai_sdk_upstream_sees_placeholders_client_sees_values(pii_stack, tmp_path, stream: bool) -> None:
    st = pii_stack(policy(tmp_path), handler=echo_handler(tool=True))
    client = st.openai()
    r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": PROMPT}], stream=stream)
    if stream:
        chunks = list(r)
        contents = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
        text = "".join(contents)
        args = "".join(tc.function.arguments or "" for c in chunks if c.choices
                       for tc in c.choices[0].delta.tool_calls or [])
        assert not any("<EM" in c for c in contents)  # the split placeholder never reached the client in pieces
    else:
        text = r.choices[0].message.content
        args = r.choices[0].message.tool_calls[0].function.arguments
    assert text == f"Sent to {EMAIL} and {PHONE}."
    assert json.loads(args) == {"to": EMAIL, "card": CARD}
    assert_upstream_saw_no_values(st)
    step = assert_audit_has_no_values(st)
    assert step["details"]["masked"] == 4
    rec = audit(st)[-1]
    assert all(v not in json.dumps(rec["content"]) for v in VALUES) and "<EMAIL_1>" in json.dumps(rec["content"])


def test_without_unmask_the_client_reads_placeholders(pii_stack, tmp_path) -> None:
    st = pii_stack(policy(tmp_path, unmask=False))
    r = st.openai().chat.completions.create(model="m", messages=[{"role": "user", "content": PROMPT}])
    assert r.choices[0].message.content == "Sent to <EMAIL_1> and <PHONE_1>."
    assert_upstream_saw_no_values(st)


def test_llama_sdk_stream_and_not(pii_stack, tmp_path) -> None:
    st = pii_stack(policy(tmp_path))
    msgs = [{"role": "user", "content": PROMPT}]
    chunks = list(st.llama().chat.completions.create(model="m", messages=msgs, stream=True))
    text = "".join(c.event.delta.text for c in chunks if c.event.delta.type == "text")
    assert text == f"Sent to {EMAIL} and {PHONE}."
    assert_upstream_saw_no_values(st)
    r = st.llama().chat.completions.create(model="m", messages=msgs)
    assert r.completion_message.content.text == f"Sent to {EMAIL} and {PHONE}."
    assert_upstream_saw_no_values(st)
    assert_audit_has_no_values(st)


@pytest.mark.parametrize("stream", [True, False])
def test_responses_api(pii_stack, tmp_path, stream: bool) -> None:
    st = pii_stack(policy(tmp_path))
    client = st.openai()
    if stream:
        events = list(client.responses.create(model="m", input=PROMPT, stream=True))
        text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    else:
        text = client.responses.create(model="m", input=PROMPT).output_text
    assert text == f"Sent to {EMAIL} and {PHONE}."
    assert_upstream_saw_no_values(st)
    assert_audit_has_no_values(st)


def test_history_and_tool_arguments_are_masked_too(pii_stack, tmp_path) -> None:
    st = pii_stack(policy(tmp_path))
    msgs = [{"role": "user", "content": PROMPT},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "c0", "type": "function", "function": {
                "name": "lookup", "arguments": json.dumps({"email": EMAIL})}}]},
            {"role": "tool", "tool_call_id": "c0", "content": f"found {PHONE}"}]
    st.openai().chat.completions.create(model="m", messages=msgs)
    sent = st.upstream.last.json()["messages"]
    assert json.loads(sent[1]["tool_calls"][0]["function"]["arguments"]) == {"email": "<EMAIL_1>"}
    assert sent[2]["content"] == "found <PHONE_1>"


def test_a_block_kind_refuses_the_request_and_log_passes(pii_stack, tmp_path) -> None:
    import openai

    st = pii_stack(policy(tmp_path, extra="      kinds: {card: block, email: log}"))
    with pytest.raises(openai.BadRequestError) as e:
        st.openai().chat.completions.create(model="m", messages=[{"role": "user", "content": PROMPT}])
    assert e.value.code == "content_filter" and not st.upstream.requests
    st.openai().chat.completions.create(model="m", messages=[{"role": "user", "content": f"hi {EMAIL}"}])
    assert EMAIL in st.upstream.last.body.decode()  # log: recorded, not changed
    step = next(s for s in audit(st)[-1]["steps"] if s["guard"] == "pii")
    assert step["outcome"] == "log" and step["details"]["kinds"] == {"email": 1}
    assert EMAIL not in json.dumps(audit(st)[-1]["steps"])


def test_stream_stage_masks_what_the_model_writes_even_split(pii_stack, tmp_path) -> None:
    stream = """stream:
  check_every_tokens: 2
  steps:
    - guard: pii
"""
    pieces = ["Reach me at jo", "e@exam", "ple.org or +1 415", " 555 0132 today, thanks a lot for asking."]

    async def handler(request, up):
        frames = [sse(oa_chunk({"role": "assistant", "content": ""}))]
        frames += [sse(oa_chunk({"content": p})) for p in pieces]
        return await stream_frames(request, [*frames, sse(oa_chunk({}, "stop")), sse("[DONE]")], delay=0.01)

    st = pii_stack(policy(tmp_path, stream=stream), handler=handler)
    chunks = list(st.openai().chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                                      stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Reach me at <EMAIL> or <PHONE> today, thanks a lot for asking."
    rec = audit(st)[-1]
    assert rec["leaked_tokens"] == 0 and "joe@example.org" not in json.dumps(rec["steps"])


def test_unmask_restores_a_placeholder_split_anywhere() -> None:
    from gateway.policy.rewrite import Unmasker
    from gateway.types import Finish, TextDelta

    text = "x <EMAIL_1> y <EMAIL_12> <EMAIL_1"
    restore = {"<EMAIL_1>": "a@b.io", "<EMAIL_12>": "c@d.io"}
    for cut in range(1, len(text)):
        async def events(cut=cut):
            yield TextDelta(text[:cut])
            yield TextDelta(text[cut:])
            yield Finish("stop")

        async def collect(gen):
            return [e async for e in gen]

        out = asyncio.run(collect(Unmasker(restore).stream(events())))
        assert "".join(e.text for e in out if isinstance(e, TextDelta)) == "x a@b.io y c@d.io <EMAIL_1", cut
        assert isinstance(out[-1], Finish)


def test_regex_redact_on_the_input_rewrites_the_request(pii_stack, tmp_path) -> None:
    p = tmp_path / "r.yaml"
    p.write_text("name: r\ninput:\n  steps:\n    - {guard: regex, patterns: ['project \\w+'], action: redact, "
                 "notice: '[codename]'}\n")
    st = pii_stack(str(p))
    st.openai().chat.completions.create(model="m", messages=[{"role": "user", "content": "about project Falcon?"}])
    assert st.upstream.last.json()["messages"][0]["content"] == "about [codename]?"

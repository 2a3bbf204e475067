"""Guardgate as the guardrail of the real LiteLLM proxy and the real Portkey gateway (issue 32).

Each peer runs as a subprocess in front of a scripted aiohttp upstream, configured with Guardgate
(the uvloop server of the test harness, regex-only policy `guard`) as its guardrail; a real client
(the openai SDK) talks to the peer. Skipped, with the reason, when the peer is not installed
(`bash scripts/install_peers.sh`, or LITELLM_BIN / PORTKEY_DIR).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from aiohttp import web
from guardrails_fixtures import BENIGN, INJECTION, SECRET, audit_records, write_policy
from harness import Loop, ScriptedUpstream, oa_completion, openai_text_stream, stream_frames
from peers import litellm_bin, litellm_config, portkey_config, portkey_entry, start_litellm, start_portkey

from gateway.config import parse
from gateway.policy.audit import AuditLog
from gateway.policy.chain import PolicyStore
from gateway.server import Gateway, create_app

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]  # a peer takes up to a minute to start

KEY = "gk-peer-key-0123456789"
PARIS = "Paris is the capital of France."
LEAKY_ASK = "What is the deploy key?"
FORBIDDEN_ASK = "Tell me about the protocol."
LONG_ASK = "Tell me a long story."
TOOL_ASK = "Run the tool."
TOOL_ARGS = '{"cmd": "start the purple elephant protocol"}'
PHRASE = "purple elephant protocol"
LONG = " ".join([*(f"w{i}" for i in range(12)), "the", PHRASE, *(f"w{i}" for i in range(15, 40))])


def answer_for(body: dict[str, Any]) -> str:
    last = body["messages"][-1]["content"]
    text = last if isinstance(last, str) else " ".join(p.get("text", "") for p in last)
    if LEAKY_ASK in text:
        return f"The deploy key is {SECRET}, keep it safe."
    if LONG_ASK in text:
        return LONG
    if FORBIDDEN_ASK in text:
        return "It is the purple elephant protocol, of course."
    return PARIS


async def upstream_handler(request: web.Request, up: ScriptedUpstream) -> web.StreamResponse:
    if not request.path.endswith("/chat/completions"):
        return web.json_response({"object": "list", "data": [{"id": "gpt-test", "object": "model"}]})
    body = up.last.json()
    if TOOL_ASK in json.dumps(body["messages"]):
        call = {"id": "call_1", "type": "function", "function": {"name": "run", "arguments": TOOL_ARGS}}
        answer = oa_completion("", finish="tool_calls")
        answer["choices"][0]["message"] = {"role": "assistant", "content": None, "tool_calls": [call]}
        return web.json_response(answer)
    text = answer_for(body)
    if body.get("stream"):
        return await stream_frames(request, openai_text_stream([w + " " for w in text.split(" ")]))
    return web.json_response(oa_completion(text))


class Guarded:
    """Guardgate (check API) and the scripted upstream, both on one harness loop."""

    def __init__(self, tmp: Path) -> None:
        self.loop = Loop()
        self.upstream = ScriptedUpstream(handler=upstream_handler)
        self.upstream.port = self.loop.serve(self.upstream.app())
        self.upstream_url = f"http://127.0.0.1:{self.upstream.port}/v1"
        self.audit_path = tmp / "audit.jsonl"
        cfg = parse(
            {
                "upstreams": {"main": {"base_url": self.upstream_url}},
                "keys": [{"name": "peer", "key_env": "GUARDGATE_KEY"}],
                "routes": [{"path": "/v1", "upstream": "main"}],
            },
            "test",
        )
        self.gateway = Gateway(
            cfg,
            policies=PolicyStore(required=[write_policy(tmp)]),
            audit=AuditLog(self.audit_path, include_content=False),
        )
        self.url = f"http://127.0.0.1:{self.loop.serve(create_app(self.gateway))}"

    def records(self, n: int) -> list[dict[str, Any]]:
        return audit_records(self.audit_path, n)

    def upstream_messages(self) -> list[Any]:
        return [r.json()["messages"] for r in self.upstream.requests if r.path.endswith("/chat/completions")]


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guarded]:
    mp = pytest.MonkeyPatch()
    mp.setenv("GUARDGATE_KEY", KEY)
    g = Guarded(tmp_path_factory.mktemp("guarded"))
    yield g
    g.loop.close()
    mp.undo()


def said(e: Exception) -> str:
    """What the client was told: the error's message and its whole body (Portkey's 446 carries the
    webhook's answer, with Guardgate's message, in `hook_results`)."""
    resp = getattr(e, "response", None)
    return str(e) + (resp.text if resp is not None else "")


def run_scenarios(client: openai.OpenAI, g: Guarded, blocked_error: type[Exception]) -> list[dict[str, Any]]:
    """The four scenarios of issue 32 against one peer; returns the audit records they made."""
    before = len(g.records(0))
    sent_before = len(g.upstream_messages())
    # 1. an injection prompt is refused with Guardgate's message, and never reaches the upstream
    with pytest.raises(blocked_error) as e:
        client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": INJECTION}])
    assert "Request blocked by policy 'guard'" in said(e.value), said(e.value)
    print(f"\ninput block: HTTP {getattr(e.value, 'status_code', None)}")
    assert len(g.upstream_messages()) == sent_before
    # 2. a secret in the answer is redacted
    r = client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": LEAKY_ASK}])
    text = r.choices[0].message.content or ""
    assert SECRET not in text and text.startswith("The deploy key is "), text
    # ... a forbidden answer is blocked with Guardgate's message
    with pytest.raises(blocked_error) as e:
        client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": FORBIDDEN_ASK}])
    assert "Response blocked by policy 'guard'" in said(e.value), said(e.value)
    print(f"output block: HTTP {getattr(e.value, 'status_code', None)}")
    # ... a secret in the prompt is redacted before it goes upstream
    client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": f"my key {SECRET}"}])
    assert SECRET not in json.dumps(g.upstream_messages()[-1])
    # 3. a benign call passes unchanged, both ways
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": BENIGN}]
    r = client.chat.completions.create(model="gpt-test", messages=msgs)
    assert r.choices[0].message.content == PARIS
    assert g.upstream_messages()[-1] == msgs
    # 4. Guardgate's audit has each verdict: input and output checks, one record each
    recs = g.records(before + 9)[before:]
    return recs


def assert_audit(recs: list[dict[str, Any]], face: str) -> None:
    got = [(r["check_stage"], r["action"]) for r in recs]
    assert got == [
        ("input", "block"),
        ("input", "allow"),
        ("output", "redact"),
        ("input", "allow"),
        ("output", "block"),
        ("input", "redact"),
        ("output", "allow"),
        ("input", "allow"),
        ("output", "allow"),
    ], got
    assert all(r["face"] == face and r["policy"] == "guard" and r["key"] == "peer" for r in recs)
    flagged = {s["step"] for r in recs for s in r["steps"] if s["verdict"] == "flagged"}
    assert flagged == {"injection", "secrets-in", "secrets-out", "forbidden-out"}


# ---------------------------------------------------------------------------------------------- LiteLLM


@pytest.fixture(scope="module")
def litellm(guarded: Guarded, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    exe, why = litellm_bin()
    if exe is None:
        pytest.skip(why or "LiteLLM not installed")
    conf = litellm_config(guarded.upstream_url, f"{guarded.url}/guardrails/guard/litellm")
    peer = start_litellm(exe, conf, tmp_path_factory.mktemp("litellm"), env={"GUARDGATE_KEY": KEY})
    try:
        peer.wait(180)
        yield peer
    finally:
        peer.stop()


def test_litellm_with_guardgate_as_generic_guardrail(litellm: Any, guarded: Guarded) -> None:
    client = openai.OpenAI(base_url=litellm.url + "/v1", api_key="sk-anything", max_retries=0, timeout=60)
    recs = run_scenarios(client, guarded, openai.APIStatusError)
    assert_audit(recs, "litellm")
    assert all(r["peer"].get("litellm_call_id") for r in recs)


def test_litellm_tool_call_answer_is_checked(litellm: Any, guarded: Guarded) -> None:
    """An answer made only of tool calls: LiteLLM sends them (`tool_calls`, no texts), and a forbidden
    argument blocks the answer."""
    client = openai.OpenAI(base_url=litellm.url + "/v1", api_key="sk-anything", max_retries=0, timeout=60)
    before = len(guarded.records(0))
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": TOOL_ASK}])
    assert "Response blocked by policy 'guard'" in said(e.value)
    recs = guarded.records(before + 2)[before:]
    assert [(r["check_stage"], r["action"]) for r in recs] == [("input", "allow"), ("output", "block")]


def stream_text(client: openai.OpenAI, ask: str) -> tuple[str, Exception | None]:
    got: list[str] = []
    try:
        stream = client.chat.completions.create(
            model="gpt-test", stream=True, messages=[{"role": "user", "content": ask}]
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                got.append(chunk.choices[0].delta.content)
    except openai.APIError as e:
        return "".join(got), e
    return "".join(got), None


def test_litellm_stream_follows_litellms_sampling_not_guardgates_gate(litellm: Any, guarded: Guarded) -> None:
    """A stream guarded by LiteLLM is checked by LiteLLM's own rules (every 5th chunk, all the text so
    far; once more at the end), not by Guardgate's incremental gate: text flagged between two samples
    reaches the client before the block. What leaks is printed (docs/guardrails.md quotes it)."""
    client = openai.OpenAI(base_url=litellm.url + "/v1", api_key="sk-anything", max_retries=0, timeout=60)
    # a long answer: the check after the phrase stops the stream, the chunks before it are out
    text, error = stream_text(client, LONG_ASK)
    assert "w39" not in text, text  # stopped before the end ...
    assert PHRASE in text, text  # ... but only after the whole phrase reached the client
    leaked = text[text.index(PHRASE) :]
    print(
        f"\nLiteLLM stream, long answer: {len(leaked.split())} words delivered from the flagged phrase on: "
        f"{leaked!r}; error: {error!r}"
    )
    # a short answer (under two samples): only the end-of-stream check sees it, after every chunk was sent
    text, error = stream_text(client, FORBIDDEN_ASK)
    assert text.strip() == answer_for({"messages": [{"content": FORBIDDEN_ASK}]})
    assert error is not None and "Response blocked by policy 'guard'" in str(error)
    print(f"LiteLLM stream, short answer: all of it delivered ({text!r}), then {error!r}")
    # a redaction: LiteLLM's default streaming_transform_mode (block_only) drops a guardrail's rewrites
    text, error = stream_text(client, LEAKY_ASK)
    assert SECRET in text and error is None, (text, error)
    print(f"LiteLLM stream, redact verdict: the secret is delivered as it was ({text!r})")


# ---------------------------------------------------------------------------------------------- Portkey


@pytest.fixture(scope="module")
def portkey(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    cmd, why = portkey_entry()
    if cmd is None:
        pytest.skip(why or "Portkey not installed")
    peer = start_portkey(cmd, tmp_path_factory.mktemp("portkey"))
    try:
        peer.wait(60)
        yield peer
    finally:
        peer.stop()


def test_portkey_with_guardgate_as_webhook_guardrail(portkey: Any, guarded: Guarded) -> None:
    conf = portkey_config(guarded.upstream_url, f"{guarded.url}/guardrails/guard/portkey", KEY)
    client = openai.OpenAI(
        base_url=portkey.url + "/v1",
        api_key="sk-anything",
        max_retries=0,
        timeout=60,
        default_headers={"x-portkey-config": json.dumps(conf)},
    )
    recs = run_scenarios(client, guarded, openai.APIStatusError)
    assert_audit(recs, "portkey")


def test_portkey_stream_output_is_not_guarded_by_portkey(portkey: Any, guarded: Guarded) -> None:
    """Portkey calls the after-request webhook of a stream without the answer (`response.json` null),
    after the stream has started: Guardgate refuses what it cannot read (verdict false, audited as an
    output block, error `unreadable`), and the whole answer still reaches the client, marked only by
    status 246 ("hooks failed"). docs/guardrails.md says so."""
    conf = portkey_config(guarded.upstream_url, f"{guarded.url}/guardrails/guard/portkey", KEY)
    client = openai.OpenAI(
        base_url=portkey.url + "/v1",
        api_key="sk-anything",
        max_retries=0,
        timeout=60,
        default_headers={"x-portkey-config": json.dumps(conf)},
    )
    before = len(guarded.records(0))
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-test", stream=True, messages=[{"role": "user", "content": FORBIDDEN_ASK}]
    )
    text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
    print(f"\nPortkey stream: status {raw.status_code}, delivered {text!r}")
    assert PHRASE in text and raw.status_code == 246
    recs = guarded.records(before + 2)[before:]
    assert [(r["check_stage"], r["action"], r["error"]) for r in recs] == [
        ("input", "allow", None),
        ("output", "block", "unreadable"),
    ]

"""Rate limits and token budgets in one gateway (memory store): 429 in the client's dialect with the
headers the SDKs read, the openai SDK's retries against it, token budgets charged from usage or the
gateway's own count, stream slots released, usage in /metrics and the audit log, config errors."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import httpx
import openai
import pytest
from aiohttp import web
from harness import openai_text_stream, stream_frames
from waits import Hold, wait_until

from gateway.config import parse
from gateway.limits import RateLimits, duration, rate_headers
from gateway.limits.memory import MemoryStore
from gateway.policy.audit import AuditLog
from gateway.policy.tokens import count_tokens
from gateway.yamlio import ConfigError

KEY = "gk-team-a-secret"


@pytest.fixture(autouse=True)
def _key_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEAM_A_KEY", KEY)
    monkeypatch.setenv("TEAM_B_KEY", "gk-team-b-secret")


def keyed(**limits: Any) -> dict[str, Any]:
    return {"keys": [{"name": "team-a", "key_env": "TEAM_A_KEY", **limits},
                     {"name": "team-b", "key_env": "TEAM_B_KEY"}]}


def chat(url: str, key: str = KEY, prefix: str = "/v1", **body: Any) -> httpx.Response:
    payload = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}], **body}
    return httpx.post(url + prefix + "/chat/completions", json=payload, headers={"Authorization": f"Bearer {key}"},
                      timeout=10)


def test_requests_per_minute_refuses_with_openai_headers(make_stack) -> None:
    s = make_stack(keyed(requests_per_minute=3))
    codes = [chat(s.url).status_code for _ in range(5)]
    assert codes == [200, 200, 200, 429, 429]
    assert len(s.upstream.requests) == 3  # a refused request never goes upstream
    r = chat(s.url)
    body = r.json()
    assert body["error"]["code"] == "rate_limit_exceeded" and body["error"]["type"] == "rate_limit_error"
    assert "3 requests per minute" in body["error"]["message"]
    h = r.headers
    assert h["x-ratelimit-limit-requests"] == "3" and h["x-ratelimit-remaining-requests"] == "0"
    assert 55 <= int(h["Retry-After"]) <= 60 and 55_000 <= int(h["retry-after-ms"]) <= 60_000
    assert h["x-ratelimit-reset-requests"].endswith("s") and h["x-should-retry"] == "true"
    # another key is not affected; the limit is per key
    assert chat(s.url, key="gk-team-b-secret").status_code == 200


def test_429_in_the_llama_dialect(make_stack) -> None:
    s = make_stack(keyed(requests_per_minute=1))
    assert chat(s.url).status_code == 200
    r = chat(s.url, prefix="/llama/compat/v1")
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
    r = httpx.post(s.url + "/llama/v1/chat/completions", json={"model": "gpt-test", "messages": []},
                   headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 429 and "Retry-After" in r.headers
    assert "rate limit" in json.dumps(r.json())


@pytest.mark.slow
def test_openai_sdk_sees_429_and_retries_as_configured(make_stack) -> None:
    """max_retries=0: one attempt, RateLimitError carrying the headers; max_retries=2 against a limit
    that stays shut: exactly three attempts (the SDK honours Retry-After of a stream slot: 1 s)."""

    hold = Hold()
    frames = openai_text_stream([f"w{i} " for i in range(30)])

    async def held(request: web.Request, up: Any) -> web.StreamResponse:  # holds its slot until released
        resp = await stream_frames(request, frames[:3], eof=False)
        await hold.wait(timeout=30)
        return await stream_frames(request, frames[3:], response=resp)

    s = make_stack(keyed(max_concurrent_streams=1), handler=held)
    holder = threading.Thread(target=lambda: chat(s.url, stream=True))
    holder.start()
    try:
        assert _wait(lambda: len(s.upstream.requests) == 1)
        client = s.openai(api_key=KEY, max_retries=0)
        with pytest.raises(openai.RateLimitError) as ei:
            client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "x"}],
                                           stream=True)
        assert ei.value.status_code == 429 and ei.value.response.headers["Retry-After"] == "1"
        assert ei.value.code == "rate_limit_exceeded"
        refused0 = _metric(s.url, "guardgate_rate_limited_total", 'limit="max_concurrent_streams"')
        assert refused0 == 1
        client = s.openai(api_key=KEY, max_retries=2)
        t0 = time.monotonic()
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "x"}],
                                           stream=True)
        assert time.monotonic() - t0 >= 1.8  # two waits of Retry-After: 1 s
        assert _metric(s.url, "guardgate_rate_limited_total", 'limit="max_concurrent_streams"') == 4
    finally:
        hold.release()
        holder.join(15)
    # once the stream ended its slot is free: a retrying client gets through
    assert len(s.upstream.requests) == 1
    client = s.openai(api_key=KEY, max_retries=3)
    chunks = list(client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "x"}],
                                                 stream=True))
    assert chunks and len(s.upstream.requests) == 2


@pytest.mark.slow
def test_sdk_retry_succeeds_once_the_slot_frees(make_stack) -> None:
    async def slow(request: web.Request, up: Any) -> web.StreamResponse:
        return await stream_frames(request, openai_text_stream([f"w{i} " for i in range(10)]), delay=0.1)

    s = make_stack(keyed(max_concurrent_streams=1), handler=slow)
    holder = threading.Thread(target=lambda: chat(s.url, stream=True))
    holder.start()
    assert _wait(lambda: len(s.upstream.requests) == 1)
    client = s.openai(api_key=KEY, max_retries=5)
    text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": "x"}], stream=True) if c.choices)
    holder.join(10)
    assert text.startswith("w0 ") and len(s.upstream.requests) == 2
    assert _metric(s.url, "guardgate_rate_limited_total", 'limit="max_concurrent_streams"') >= 1


def test_stream_slot_released_when_client_leaves(make_stack) -> None:
    frames = openai_text_stream([f"w{i} " for i in range(100)])

    async def first_held(request: web.Request, up: Any) -> web.StreamResponse:
        if len(up.requests) == 1:  # the first client's stream does not end by itself
            resp = await stream_frames(request, frames[:3], eof=False)
            await Hold().wait(timeout=30)  # cancelled when that client leaves
            return await stream_frames(request, frames[3:], response=resp)
        return await stream_frames(request, frames)

    s = make_stack(keyed(max_concurrent_streams=1), handler=first_held)
    with httpx.Client(timeout=10) as c, c.stream("POST", s.url + "/v1/chat/completions", headers={
            "Authorization": f"Bearer {KEY}"}, json={"model": "gpt-test", "messages": [], "stream": True}) as r:
        chunks = r.iter_bytes()  # kept referenced: a dropped iterator closes the response
        next(chunks)
        assert chat(s.url, stream=True).status_code == 429
    # the client hung up: the gateway is cancelled and its finally releases the slot
    assert _wait(lambda: chat(s.url, stream=True).status_code == 200, timeout=5)
    assert chat(s.url).status_code == 200  # non-stream requests never take a slot


def test_tokens_per_minute_from_upstream_usage(make_stack) -> None:
    s = make_stack(keyed(tokens_per_minute=30))  # each answer reports 12 tokens (oa_completion)
    assert [chat(s.url).status_code for _ in range(3)] == [200, 200, 200]  # 0, 12, 24 used: still under 30
    r = chat(s.url)  # 36 used
    assert r.status_code == 429 and "30 tokens per minute" in r.json()["error"]["message"]
    assert r.headers["x-ratelimit-limit-tokens"] == "30" and r.headers["x-ratelimit-remaining-tokens"] == "0"
    assert 55 <= int(r.headers["Retry-After"]) <= 61
    text = httpx.get(s.url + "/metrics").text
    assert 'guardgate_usage_tokens_total{key="team-a",model="gpt-test",source="upstream",type="prompt"} 15.0' in text
    assert 'guardgate_usage_tokens_total{key="team-a",model="gpt-test",source="upstream",type="completion"} 21.0' \
        in text


def test_tokens_counted_by_the_gateway_on_a_relayed_stream(make_stack, tmp_path) -> None:
    """An upstream that reports no usage: the relay's own count (cl100k) of what it passed on, per day."""
    pieces = ["one two three four five six seven eight nine ten "] * 2

    async def handler(request: web.Request, up: Any) -> web.StreamResponse:
        return await stream_frames(request, openai_text_stream(pieces))

    audit = AuditLog(tmp_path / "audit.jsonl")
    answer = count_tokens("".join(pieces))
    s = make_stack(keyed(tokens_per_day=answer + 1), handler=handler, audit=audit)
    r = chat(s.url, stream=True)
    assert r.status_code == 200 and r.content == b"".join(openai_text_stream(pieces))  # bytes untouched
    r = chat(s.url, stream=True)  # 1 prompt token ("hi") + the answer's = the day's budget
    assert r.status_code == 429 and r.headers["x-ratelimit-limit-tokens"] == str(answer + 1)
    lines = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    usage = [x for x in lines if x.get("type") == "usage"]
    assert len(usage) == 1 and usage[0]["key"] == "team-a" and usage[0]["source"] == "gateway"
    assert usage[0]["completion_tokens"] == answer and usage[0]["prompt_tokens"] == 1
    assert usage[0]["model"] == "gpt-test"


def test_route_defaults_apply_per_key_and_key_limits_replace_them(make_stack) -> None:
    cfg = {"upstreams": {"main": {"base_url": "SCRIPTED"}},
           "routes": [{"upstream": "main", "requests_per_minute": 2}],
           "keys": [{"name": "team-a", "key_env": "TEAM_A_KEY", "requests_per_minute": 4},
                    {"name": "team-b", "key_env": "TEAM_B_KEY"}]}
    s = make_stack(cfg)
    assert [chat(s.url).status_code for _ in range(5)] == [200] * 4 + [429]
    assert [chat(s.url, key="gk-team-b-secret").status_code for _ in range(3)] == [200, 200, 429]


def test_no_limits_no_limiter(make_stack) -> None:
    s = make_stack(keyed())
    assert s.gateway.limiter is None and not s.gateway.router.limits_on
    assert all(chat(s.url).status_code == 200 for _ in range(5))


def test_limit_check_can_fail() -> None:
    """The assertions above would catch a limiter that admits everything."""
    import asyncio

    async def run() -> list[bool]:
        st = MemoryStore()
        lim = RateLimits(requests_per_minute=2, bucket="b")
        return [(await st.acquire(lim, 1000 + i, f"l{i}", False)).allowed for i in range(3)]

    assert asyncio.run(run()) == [True, True, False]


def test_windows_slide() -> None:
    import asyncio

    async def run() -> None:
        st = MemoryStore()
        lim = RateLimits(requests_per_minute=1, tokens_per_minute=10, bucket="b")
        t = 10_000_000
        assert (await st.acquire(lim, t, "a", False)).allowed
        d = await st.acquire(lim, t + 30_000, "b", False)
        assert not d.allowed and d.refused == "requests_per_minute" and d.retry_ms == 30_000
        assert (await st.acquire(lim, t + 60_000, "c", False)).allowed  # the first left the window
        await st.finish(lim, t + 60_000, "c", False, 10)
        d = await st.acquire(lim, t + 120_500, "d", False)  # request window free; tokens: 10 >= 10
        assert not d.allowed and d.refused == "tokens_per_minute"
        assert 0 < d.retry_ms <= 1000
        assert (await st.acquire(lim, t + 121_000, "e", False)).allowed

    asyncio.run(run())


def test_headers_and_durations() -> None:
    from gateway.limits import Decision

    assert [duration(x) for x in (20, 1500, 60_000, 3_725_000)] == ["20ms", "1.5s", "1m0s", "1h2m5s"]
    h = rate_headers(RateLimits(requests_per_minute=10, tokens_per_day=100),
                     Decision(False, "tokens_per_day", 5000, 3, 1000, 0, 0, 120, 5000))
    assert h["x-ratelimit-remaining-requests"] == "7" and h["x-ratelimit-remaining-tokens"] == "0"
    assert h["Retry-After"] == "5" and h["x-ratelimit-reset-tokens"] == "5s"


@pytest.mark.parametrize("text,match", [
    ("keys: [{key_env: K, requests_per_minute: -1}]", "requests_per_minute"),
    ("keys: [{key_env: K, tokens_per_day: 1.5}]", "tokens_per_day"),
    ("limits: {store: redis}", "limits.url"),
    ("limits: {store: etcd}", "memory or redis"),
    ("limits: {on_store_error: maybe}", "allow or deny"),
])
def test_config_errors(text: str, match: str) -> None:
    from gateway.yamlio import loads

    obj = loads("upstreams: {a: {base_url: 'http://x'}}\n" + text, "t.yaml")
    with pytest.raises(ConfigError, match=match):
        parse(obj, "t.yaml")


def test_config_parses_limits() -> None:
    cfg = parse({"upstreams": {"a": {"base_url": "http://x"}},
                 "routes": [{"upstream": "a", "tokens_per_minute": 1000}],
                 "keys": [{"key_env": "K", "max_concurrent_streams": 2}],
                 "limits": {"store": "redis", "url": "redis://r:6379/0", "on_store_error": "deny"}})
    assert cfg.routes[0].rates.tokens_per_minute == 1000 and cfg.keys[0].rates.max_concurrent_streams == 2
    assert cfg.limits.store == "redis" and cfg.limits.on_store_error == "deny"


# ---------------------------------------------------------------------------- helpers


def _wait(pred: Any, timeout: float = 5.0) -> bool:
    return wait_until(pred, timeout, interval=0.02)


def _metric(url: str, name: str, label: str) -> float:
    total = 0.0
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + "{") and label in line:
            total += float(line.rsplit(" ", 1)[1])
    return total



@pytest.mark.parametrize("stream", [False, True])
def test_guarded_chat_is_metered(make_stack, tmp_path, stream: bool) -> None:
    """Under a policy the answer is decoded: usage from the upstream when it reports it (non-stream),
    else the gateway's count of what the gate released (the scripted stream has no usage chunk)."""
    from harness import in_out_policy

    from gateway.policy.chain import PolicyStore

    store = PolicyStore(required=[in_out_policy(tmp_path / "p.yaml", "FORBIDDEN", "NEVERSAID")])
    cfg = {"upstreams": {"main": {"base_url": "SCRIPTED"}}, "routes": [{"upstream": "main", "policy": "p"}],
           **keyed(tokens_per_minute=1)}
    s = make_stack(cfg, policies=store, audit=AuditLog(tmp_path / "audit.jsonl"))
    r = chat(s.url, stream=stream)
    assert r.status_code == 200
    assert chat(s.url, stream=stream).status_code == 429  # the first answer spent the budget
    text = httpx.get(s.url + "/metrics").text
    source = "gateway" if stream else "upstream"
    line = [x for x in text.splitlines() if x.startswith("guardgate_usage_tokens_total{") and 'type="completion"' in x]
    assert len(line) == 1 and f'source="{source}"' in line[0]
    expected = count_tokens("Hello there!") if stream else 7
    assert float(line[0].rsplit(" ", 1)[1]) == expected
    # the usage rides in the policy's own audit record: one line per request, as before
    records = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert len(records) == 1 and "type" not in records[0]  # the refused request never reached the policy
    assert records[0]["usage"]["completion_tokens"] == expected and records[0]["usage"]["source"] == source


def test_audit_summary_skips_usage_lines(tmp_path) -> None:
    from gateway.audit_cli import summarise

    log = tmp_path / "audit.jsonl"
    log.write_text('{"type": "usage", "key": "k", "model": "m", "prompt_tokens": 1, "completion_tokens": 2}\n'
                   '{"id": "r1", "policy": "p", "action": "allow", "status": 200, "steps": []}\n')
    s = summarise([log])
    assert s.to_dict()["records"] == 1 and s.to_dict()["malformed_lines"] == 0

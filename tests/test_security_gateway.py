"""Security checks as tests (issue 9): secrets never leak, gateway keys are compared in constant
time and never forwarded, malformed or oversized headers are refused, unsafe config files are
refused or warned about.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import re
import stat

import httpx
import pytest
from aiohttp import web
from faults import h_reset, h_status, policy_store
from harness import openai_text_stream, raw_http, stream_frames, wait_until

import gateway.routing as server_mod
from gateway.config import load_file
from gateway.policy.audit import AuditLog
from gateway.yamlio import ConfigError

UP_KEY = "sk-upstream-Zq81secretvalue"
GW_KEY = "gk-team-Wm42secretvalue"
OTHER_KEY = "gk-other-Pp07secretvalue"
MSG = [{"role": "user", "content": "hello"}]


@pytest.fixture
def keyed(make_stack, monkeypatch, tmp_path):
    """A gateway with two gateway keys, an upstream key, a guarded route, and an audit log with content."""
    monkeypatch.setenv("SEC_UP_KEY", UP_KEY)
    monkeypatch.setenv("SEC_GW_KEY", GW_KEY)
    monkeypatch.setenv("SEC_OTHER_KEY", OTHER_KEY)

    def make(handler=None, *, upstream_key: bool = True):
        store, ppath = policy_store(tmp_path)
        up = {"base_url": "SCRIPTED", "timeouts": {"connect": 1, "read": 0.3}}
        if upstream_key:
            up["api_key_env"] = "SEC_UP_KEY"
        ll = {**up, "dialect": "llama"}
        cfg = {"upstreams": {"main": up, "ll": ll,
                             "dead": {"base_url": "http://127.0.0.1:9/v1", "api_key_env": "SEC_UP_KEY",
                                      "timeouts": {"connect": 1}}},
               "routes": [{"path": "/llama/compat/", "upstream": "ll"},
                          {"model": "dead-*", "upstream": "dead"},
                          {"path": "/llama/", "upstream": "main", "policy": ppath},
                          {"model": "guarded-*", "upstream": "main", "policy": ppath},
                          {"upstream": "main"}],
               "keys": [{"name": "team", "key_env": "SEC_GW_KEY"}, {"name": "other", "key_env": "SEC_OTHER_KEY"}],
               "audit": {"path": str(tmp_path / "audit.jsonl"), "content": True}}
        st = make_stack(cfg, handler=handler, policies=store,
                        audit=AuditLog(tmp_path / "audit.jsonl", include_content=True))
        st.audit_path = tmp_path / "audit.jsonl"
        return st

    return make


def auth(key: str = GW_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# ---------------------------------------------------------------------------- secrets never leak


@pytest.mark.slow
def test_upstream_and_gateway_keys_never_leak(keyed, caplog) -> None:
    async def handler(request: web.Request, up) -> web.StreamResponse:
        body = json.loads(up.last.body or b"{}")
        model = body.get("model", "")
        if model.endswith("err"):
            return web.json_response({"error": {"message": "bad request", "type": "x", "code": "bad"}}, status=400)
        if model.endswith("slow"):
            await asyncio.sleep(1)
        if body.get("stream"):
            if model.endswith("reset"):
                return await h_reset()(request, up)
            return await stream_frames(request, openai_text_stream(["a", "b"]))
        return await h_status(200, body={"id": "x", "object": "chat.completion", "created": 1, "model": model,
                                         "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                                                      "finish_reason": "stop"}]})(request, up)

    st = keyed(handler)
    seen: list[str] = []
    caplog.set_level(logging.DEBUG)
    with httpx.Client(timeout=10) as c:
        for prefix in ("/v1", "/llama/v1", "/llama/compat/v1"):
            for model in ("m", "guarded-m", "m-err", "guarded-m-err", "m-slow", "dead-m", "m-reset", "guarded-reset"):
                for stream in (False, True):
                    r = c.post(st.url + prefix + "/chat/completions", headers=auth(),
                               json={"model": model, "messages": MSG, "stream": stream})
                    seen.append(f"{r.status_code} {dict(r.headers)} {r.text}")
            r = c.get(st.url + prefix + "/models", headers=auth())
            seen.append(f"{r.status_code} {dict(r.headers)} {r.text}")
        for bad in ("", "Bearer", f"Bearer {GW_KEY[:-1]}", "Basic abc", f"Bearer {UP_KEY}"):
            r = c.post(st.url + "/v1/chat/completions", headers={"Authorization": bad} if bad else {},
                       json={"model": "m", "messages": MSG})
            assert r.status_code == 401
            seen.append(f"{r.status_code} {dict(r.headers)} {r.text}")
    statuses = {int(x.split()[0]) for x in seen}
    assert {200, 400, 401, 502, 504} <= statuses  # successes and every kind of error were exercised
    assert wait_until(lambda: st.audit_path.exists() and st.audit_path.read_text().count("\n") >= 10)
    logs = "\n".join(f"{r.name} {r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
    for where, text in (("responses", "\n".join(seen)), ("logs", logs), ("audit", st.audit_path.read_text())):
        for secret in (UP_KEY, GW_KEY, OTHER_KEY):
            assert secret not in text, f"{secret[:8]}… leaked into {where}"
            assert secret[-12:] not in text, f"part of {secret[:8]}… leaked into {where}"


# ---------------------------------------------------------------------------- gateway keys


@pytest.mark.parametrize("presented", [
    GW_KEY[:-1] + chr(ord(GW_KEY[-1]) ^ 1),  # differs only in the last byte
    GW_KEY[:-1],  # a prefix
    GW_KEY + "x",  # an extension
    GW_KEY.upper(),
    " " + GW_KEY[1:],
    UP_KEY,  # the upstream's key is not a gateway key
])
def test_near_miss_keys_rejected(keyed, presented: str) -> None:
    st = keyed()
    r = httpx.post(st.url + "/v1/chat/completions", headers=auth(presented), json={"model": "m", "messages": MSG})
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "invalid_api_key"
    assert st.upstream.requests == []


def test_both_keys_accepted_and_every_key_compared(keyed, monkeypatch) -> None:
    st = keyed()
    calls: list[tuple[bytes, bytes]] = []
    real = server_mod.hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(server_mod.hmac, "compare_digest", counting)
    for key in (GW_KEY, OTHER_KEY, GW_KEY[:-1] + "?"):
        calls.clear()
        r = httpx.post(st.url + "/v1/chat/completions", headers=auth(key), json={"model": "m", "messages": MSG})
        assert r.status_code == (401 if key.endswith("?") else 200)
        # constant time: hmac.compare_digest against every configured key, no early exit on a match
        assert len(calls) == 2 and {c[1] for c in calls} == {GW_KEY.encode(), OTHER_KEY.encode()}


def test_authenticate_source_uses_compare_digest_only() -> None:
    src = inspect.getsource(server_mod.Router.check_key)  # the one key check (Router.admit)
    assert "hmac.compare_digest(" in src
    assert not re.search(r"(token|presented|value)\s*(==|!=)|(==|!=)\s*(token|presented|value)", src)
    assert ".startswith(" not in src.split("for value")[1]  # no prefix shortcut in the key loop


@pytest.mark.parametrize("prefix,model,path", [
    ("/v1", "m", "/chat/completions"),  # relay
    ("/v1", "guarded-m", "/chat/completions"),  # decoded, policy
    ("/llama/v1", "m", "/chat/completions"),  # translated + policy
    ("/llama/compat/v1", "m", "/chat/completions"),  # translated to a llama upstream
    ("/v1", "m", "/embeddings"),  # other relayed endpoint
])
@pytest.mark.parametrize("upstream_key", [True, False])
def test_client_authorization_never_forwarded_with_gateway_keys(keyed, prefix, model, path, upstream_key) -> None:
    st = keyed(upstream_key=upstream_key)
    r = httpx.post(st.url + prefix + path, json={"model": model, "messages": MSG, "input": "x"},
                   headers={**auth(), "Proxy-Authorization": f"Bearer {GW_KEY}", "X-Api-Key-Note": "kept"})
    assert len(st.upstream.requests) == 1, r.text
    sent = {k.lower(): v for k, v in st.upstream.last.headers.items()}
    assert GW_KEY not in json.dumps(sent)
    assert "proxy-authorization" not in sent
    if upstream_key:
        assert sent["authorization"] == f"Bearer {UP_KEY}"
    else:
        assert "authorization" not in sent


def test_models_listing_translated_does_not_forward_gateway_key(keyed) -> None:
    st = keyed(upstream_key=False)
    r = httpx.get(st.url + "/llama/compat/v1/models", headers=auth())
    assert len(st.upstream.requests) == 1, r.text
    assert "authorization" not in {k.lower() for k in st.upstream.last.headers}


# ---------------------------------------------------------------------------- malformed headers


def raw(st, data: bytes, timeout: float = 5) -> bytes:
    return raw_http(st.url, data, timeout)


def request_with(header_lines: bytes, body: bytes = b'{"model":"m","messages":[]}') -> bytes:
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + header_lines
            + b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)


def status_of(resp: bytes) -> int:
    assert resp.startswith(b"HTTP/1."), resp[:200]
    return int(resp.split(b" ", 2)[1])


@pytest.mark.parametrize("line", [
    b"X-Evil: a\rInjected: b\r\n",  # bare CR inside a value
    b"X-Evil: a\x00b\r\n",  # NUL
    b"X-Evil: a\r\n Injected: folded\r\n",  # obsolete line folding
    b"X-Ev il: a\r\n",  # space in a name
    b"X-Evil : a\r\n",  # space before the colon (request smuggling vector)
    b"Content-Length: 5\r\n",  # a second, conflicting Content-Length
    b"Transfer-Encoding: chunked\r\n",  # TE + CL together
])
def test_header_injection_refused(keyed, line: bytes) -> None:
    st = keyed()
    resp = raw(st, request_with(b"Authorization: Bearer " + GW_KEY.encode() + b"\r\n" + line))
    assert status_of(resp) == 400, resp[:300]
    assert st.upstream.requests == []


def test_bare_lf_never_reaches_upstream_as_part_of_a_value(keyed) -> None:
    """A bare LF ends a header line (lenient but safe): whatever the server makes of it, no header
    sent upstream carries CR, LF or NUL."""
    st = keyed()
    resp = raw(st, request_with(b"Authorization: Bearer " + GW_KEY.encode() + b"\r\nX-A: one\nX-B: two\r\n"))
    assert status_of(resp) in (200, 400)
    for rec in st.upstream.requests:
        for k, v in rec.headers.items():
            assert not set("\r\n\x00") & set(k + v)


@pytest.mark.parametrize("what", ["one_big_header", "many_headers", "long_url"])
def test_oversized_headers_refused(keyed, what: str) -> None:
    st = keyed()
    limit = st.gateway.cfg.limits.max_header_bytes
    if what == "one_big_header":
        data = request_with(b"X-Big: " + b"a" * (limit + 10) + b"\r\n")
    elif what == "many_headers":
        data = request_with(b"".join(b"X-H%d: %s\r\n" % (i, b"b" * 100) for i in range(2000)))
    else:
        data = b"GET /v1/models?" + b"q" * (limit + 10) + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    resp = raw(st, data)
    assert status_of(resp) in (400, 413, 414, 431), resp[:300]
    assert st.upstream.requests == []


# ---------------------------------------------------------------------------- config files


CONFIG = """
upstreams:
  main: {base_url: "http://127.0.0.1:9/v1", api_key_env: OPENAI_API_KEY}
keys:
  - {key_env: TEAM_KEY, name: team}
"""


def test_world_writable_config_refused(tmp_path) -> None:
    p = tmp_path / "gateway.yaml"
    p.write_text(CONFIG)
    os.chmod(p, 0o666)
    with pytest.raises(ConfigError, match="world-writable"):
        load_file(p)


def test_world_readable_config_with_secrets_warned(tmp_path, caplog) -> None:
    p = tmp_path / "gateway.yaml"
    p.write_text(CONFIG)
    os.chmod(p, 0o644)
    with caplog.at_level(logging.WARNING, logger="guardgate.config"):
        load_file(p)
    assert any("world-readable" in r.getMessage() for r in caplog.records)


def test_private_config_loads_quietly(tmp_path, caplog) -> None:
    p = tmp_path / "gateway.yaml"
    p.write_text(CONFIG)
    os.chmod(p, 0o600)
    with caplog.at_level(logging.WARNING, logger="guardgate.config"):
        cfg = load_file(p)
    assert cfg.keys[0].key_env == "TEAM_KEY"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert stat.S_IMODE(p.stat().st_mode) == 0o600


def test_config_with_a_literal_key_refused(tmp_path) -> None:
    p = tmp_path / "gateway.yaml"
    p.write_text(CONFIG.replace("api_key_env: OPENAI_API_KEY", "api_key_env: sk-live-abc123"))
    os.chmod(p, 0o600)
    with pytest.raises(ConfigError, match="environment variable"):
        load_file(p)


def test_client_request_id_kept_only_when_sane(stack) -> None:
    import httpx as _httpx

    ok = _httpx.post(stack.url + "/v1/chat/completions", json={"model": "m", "messages": []},
                     headers={"X-Request-Id": "trace-123.abc"})
    assert ok.headers["X-Guardgate-Request-Id"] == "trace-123.abc"
    huge = _httpx.post(stack.url + "/v1/chat/completions", json={"model": "m", "messages": []},
                       headers={"X-Request-Id": "x" * 5000})
    rid = huge.headers["X-Guardgate-Request-Id"]
    assert len(rid) == 32 and rid != "x" * 5000


def test_malformed_request_logged_as_one_line(stack, caplog) -> None:
    import logging
    import socket as _socket

    host, port = stack.url.removeprefix("http://").split(":")
    with caplog.at_level(logging.INFO, logger="aiohttp.server"):
        s = _socket.create_connection((host, int(port)))
        s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.")  # refused with a 400
        s.close()
        assert wait_until(lambda: any(r.name == "aiohttp.server" for r in caplog.records), timeout=5)
    recs = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert recs and all(r.levelno == logging.INFO and not r.exc_info for r in recs)
    assert "malformed request refused" in recs[0].getMessage()

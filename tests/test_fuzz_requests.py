"""Request fuzzing against the real server (issue 9): random methods, paths, headers and bodies,
on the relay, guarded and translated paths. Whatever comes in: never a 500, never a traceback in
a response or an `unhandled error` in the log, never a hang (every request has a deadline).
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from aiohttp import web
from harness import Loop, ScriptedUpstream, oa_completion, openai_text_stream, stream_frames
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as s

from gateway.config import parse
from gateway.policy.chain import PolicyStore
from gateway.server import Gateway, create_app

pytestmark = pytest.mark.slow  # hypothesis through the real server: ~10 s a test

POLICY = """
name: fuzz
input:
  steps:
    - guard: regex
      patterns: ["(?i)ignore previous"]
      action: block
stream:
  check_every_tokens: 4
  steps:
    - guard: regex
      patterns: ["(?i)secret"]
      action: redact
"""

PREFIXES = ["/v1", "/openai/v1", "/llama/v1", "/llama/compat/v1", "/x", "", "/v1/../v1", "/llama"]
TAILS = ["/chat/completions", "/models", "/moderations", "/completions", "/embeddings", "/responses", "/"]
SETTINGS = settings(max_examples=300, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


async def robust_upstream(request: web.Request, up: ScriptedUpstream) -> web.StreamResponse:
    """Answers anything sensibly (its own failures would be relayed and blur the test)."""
    try:
        body = json.loads(up.last.body) if up.last.body else {}
    except ValueError:
        body = {}
    if isinstance(body, dict) and body.get("stream") is True:
        return await stream_frames(request, openai_text_stream(["a secret ", "answer"]))
    return web.json_response(oa_completion("fine"))


@pytest.fixture(scope="module")
def gw_url(tmp_path_factory) -> Iterator[str]:
    d = tmp_path_factory.mktemp("fuzz")
    (d / "fuzz.yaml").write_text(POLICY)
    loop = Loop()
    up = ScriptedUpstream(handler=robust_upstream)
    up.port = loop.serve(up.app())
    base = f"http://127.0.0.1:{up.port}/v1"
    cfg = parse({"upstreams": {"oa": {"base_url": base, "timeouts": {"connect": 2, "read": 5}},
                               "ll": {"base_url": base, "dialect": "llama", "timeouts": {"read": 5}}},
                 "routes": [{"path": "/llama/compat/", "upstream": "ll"},
                            {"path": "/llama/", "upstream": "oa", "policy": str(d / "fuzz.yaml")},
                            {"model": "plain-*", "upstream": "oa"},
                            {"upstream": "oa", "policy": str(d / "fuzz.yaml")}],
                 "limits": {"max_body_bytes": 65536}}, "fuzz")
    gw = Gateway(cfg, policies=PolicyStore(required=[str(d / "fuzz.yaml")]))
    port = loop.serve(create_app(gw))
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        loop.close()


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=httpx.Timeout(10.0)) as c:
        yield c


def check(r: httpx.Response) -> None:
    assert r.status_code != 500, r.text[:500]
    assert 100 <= r.status_code < 600
    text = r.text
    assert "Traceback" not in text and 'File "' not in text
    if r.status_code >= 400 and r.request.method != "HEAD" and \
            r.headers.get("content-type", "").startswith("application/json"):
        err = r.json()
        assert isinstance(err, dict) and isinstance(err.get("error"), dict), err
        assert err["error"].get("message")


def no_unhandled(caplog: pytest.LogCaptureFixture) -> None:
    """No error logged, except aiohttp's own line for a request its HTTP parser refused with a 400
    (e.g. an unknown method): that one never reaches the gateway's code."""
    from aiohttp.http_exceptions import HttpProcessingError

    bad = [r for r in caplog.records if r.levelno >= logging.ERROR
           and not (r.name == "aiohttp.server" and r.exc_info and isinstance(r.exc_info[1], HttpProcessingError)
                    and getattr(r.exc_info[1], "code", 0) == 400)]
    assert not bad, [r.getMessage() for r in bad]


# ---------------------------------------------------------------------------- strategies

json_leaf = s.none() | s.booleans() | s.integers(-2**70, 2**70) | s.floats(allow_nan=False) | s.text(max_size=20)
json_any = s.recursive(json_leaf, lambda kids: s.lists(kids, max_size=4) | s.dictionaries(s.text(max_size=8), kids,
                                                                                           max_size=4), max_leaves=20)
role = s.sampled_from(["user", "assistant", "system", "tool", "developer", "", "USER", "ipython"]) | s.text(max_size=6)
content = (s.text(max_size=40) | s.none() | json_any
           | s.lists(s.fixed_dictionaries({"type": s.sampled_from(["text", "image_url", "input_audio", "x"]),
                                           "text": s.text(max_size=20) | json_leaf}), max_size=3))
message = s.fixed_dictionaries({"role": role, "content": content},
                               optional={"name": s.text(max_size=5) | json_leaf, "tool_calls": json_any,
                                         "tool_call_id": json_leaf})
chat_body = s.fixed_dictionaries(
    {"model": s.sampled_from(["m", "plain-x", "gpt-4o"]) | json_leaf,
     "messages": s.lists(message, max_size=4) | json_any},
    optional={"stream": s.booleans() | json_leaf, "stream_options": json_any, "tools": json_any,
              "tool_choice": json_any, "max_tokens": json_leaf, "max_completion_tokens": json_leaf,
              "temperature": json_leaf, "n": json_leaf, "response_format": json_any, "stop": json_any,
              "logprobs": json_leaf, "top_p": json_leaf, "user": json_leaf, "extra": json_any})


def encode(obj: Any) -> bytes:
    return json.dumps(obj).encode()


# ---------------------------------------------------------------------------- tests


@SETTINGS
@given(prefix=s.sampled_from(["/v1", "/llama/v1", "/llama/compat/v1"]), body=chat_body)
def test_fuzz_chat_bodies(gw_url, client, caplog, prefix: str, body: dict) -> None:
    with caplog.at_level(logging.ERROR):
        r = client.post(gw_url + prefix + "/chat/completions", content=encode(body),
                        headers={"Content-Type": "application/json"})
        check(r)
    no_unhandled(caplog)


@SETTINGS
@given(prefix=s.sampled_from(PREFIXES),
       tail=s.sampled_from(TAILS) | s.text(max_size=30).map(lambda t: "/" + quote(t, safe="/%;=@")),
       method=s.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "FOO"]),
       body=s.binary(max_size=300) | json_any.map(encode) | chat_body.map(encode),
       ctype=s.sampled_from(["application/json", "text/plain", "application/json; charset=latin-1",
                             "multipart/form-data", "", "application/x-www-form-urlencoded"]),
       query=s.text(max_size=20))
def test_fuzz_anything(gw_url, client, caplog, prefix, tail, method, body, ctype, query) -> None:
    with caplog.at_level(logging.ERROR):
        req = client.build_request(method, gw_url + prefix + tail, content=body, params={"q": query} if query else None,
                                   headers={"Content-Type": ctype} if ctype else {})
        r = client.send(req)
        check(r)
    no_unhandled(caplog)


header_name = s.text(alphabet="abcdefghijklmnopqrstuvwxyz-_0123456789", min_size=1, max_size=20)
header_value = s.text(alphabet=s.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=60)


@SETTINGS
@given(headers=s.dictionaries(header_name | s.sampled_from(["authorization", "content-length", "transfer-encoding",
                                                             "x-request-id", "content-encoding", "connection",
                                                             "expect", "host", "te", "upgrade"]),
                              header_value, max_size=6),
       body=chat_body)
def test_fuzz_headers(gw_url, caplog, headers: dict[str, str], body: dict) -> None:
    """Headers over a raw socket (httpx would fix up the framing ones): never a 500 or a hang."""
    with caplog.at_level(logging.ERROR):
        data = encode(body)
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        if "content-length" not in headers and "transfer-encoding" not in headers:
            head += f"Content-Length: {len(data)}\r\n"
        host, port = gw_url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n{head}Connection: close\r\n\r\n"
                         .encode() + data)
            resp = b""
            try:
                while chunk := sock.recv(65536):
                    resp += chunk
            except TimeoutError:
                if not resp:
                    raise
            except ConnectionResetError:
                pass
        if resp:
            status_line = resp.split(b"\r\n", 1)[0]
            assert status_line.startswith(b"HTTP/1."), status_line
            status = int(status_line.split()[1])
            assert status != 500, resp[:600]
            assert b"Traceback" not in resp
    no_unhandled(caplog)

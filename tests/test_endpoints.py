"""Every request guarded or refused (issue 16): the endpoint table, canonical paths, deny by default.

Through the real server (uvloop, as `guardgate serve`) with a scripted upstream that answers every
path with an output phrase, under a policy that blocks an input phrase and streams through a gate
that blocks the output phrase. Hostile spellings go over raw sockets (HTTP clients normalise paths).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import openai
import pytest
from aiohttp import web
from conftest import build_stack
from harness import in_out_policy, oa_completion, openai_text_stream, raw_http, sse, stream_frames
from hypothesis import given, settings
from hypothesis import strategies as hs

from gateway.config import parse
from gateway.context import GatewayError, RequestContext
from gateway.endpoints import PASSTHROUGH_NAMES, PREFIXES, TABLE, Kind, canonical_target, lookup
from gateway.policy.chain import PolicyStore
from gateway.routing import Action, Router
from gateway.upstreams.http import HttpUpstream
from gateway.yamlio import ConfigError

IN = "zebra input secret"
OUT = "mango output secret"
BENIGN = [{"role": "user", "content": "hello"}]


async def everything(request: web.Request, up: Any) -> web.StreamResponse:
    """A provider that puts the output phrase in every answer that can carry text."""
    path = request.path
    body: dict[str, Any] = {}
    try:
        body = json.loads(up.last.body) if up.last.body else {}
    except ValueError:
        pass
    model = {"id": "m", "object": "model", "created": 1, "owned_by": "t"}
    if path.endswith("/models"):
        return web.json_response({"object": "list", "data": [model]})
    if "/models/" in path:
        return web.json_response(model)
    if path.endswith("/embeddings"):  # vectors: no text comes back from an embeddings endpoint
        return web.json_response({"object": "list", "data": [{"object": "embedding", "index": 0,
                                                              "embedding": [0.1, 0.2]}], "model": "m",
                                  "usage": {"prompt_tokens": 1, "total_tokens": 1}})
    if path.endswith("/moderations"):  # scores: no text either
        return web.json_response({"id": "modr-1", "model": "m", "results": [
            {"flagged": False, "categories": {}, "category_scores": {}}]})
    if path.endswith("/completions") and not path.endswith("/chat/completions"):  # legacy text completions
        def chunk(text: str, finish: str | None = None) -> bytes:
            return sse({"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m",
                        "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]})

        if body.get("stream"):
            return await stream_frames(request, [chunk("fine, "), chunk("the "), chunk(OUT), chunk(" is here"),
                                                 chunk("", "stop"), sse("[DONE]")])
        return web.json_response({"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m",
                                  "choices": [{"text": f"fine, the {OUT} is here", "index": 0, "logprobs": None,
                                               "finish_reason": "stop"}]})
    if body.get("stream"):
        return await stream_frames(request, openai_text_stream(["fine, ", "the ", OUT, " is here"]))
    return web.json_response(oa_completion(f"fine, the {OUT} is here"))


def policy(tmp_path: Path) -> str:
    return in_out_policy(tmp_path / "p.yaml", IN, OUT)


@pytest.fixture
def guarded(make_stack, tmp_path):
    def make(passthrough: list[str] | None = None, with_policy: bool = True):
        path = policy(tmp_path)
        route: dict[str, Any] = {"upstream": "main"}
        if with_policy:
            route["policy"] = "p"
        if passthrough:
            route["passthrough"] = passthrough
        return make_stack({"upstreams": {"main": {"base_url": "SCRIPTED"}}, "routes": [route]},
                          handler=everything, policies=PolicyStore(required=[path]) if with_policy else None)

    return make


def concrete(template: str) -> str:
    ids = {"{model}": "m", "{deployment}": "m"}
    return "/".join(ids.get(seg, "x-1") if seg.startswith("{") else seg for seg in template.split("/"))


def body_for(method: str) -> bytes:
    if method not in ("POST", "PUT", "PATCH"):
        return b""
    return json.dumps({"model": "m", "messages": [{"role": "user", "content": f"say {IN}"}], "input": f"say {IN}",
                       "prompt": f"say {IN}", "stream": False}).encode()


def benign_for(method: str, stream: bool) -> bytes:
    if method not in ("POST", "PUT", "PATCH"):
        return b""
    return json.dumps({"model": "m", "messages": BENIGN, "input": "hello", "prompt": "hello",
                       "stream": stream}).encode()


def send(url: str, method: str, target: str, body: bytes) -> tuple[int, bytes]:
    head = (f"{method} {target} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    raw = raw_http(url, head + body)
    status = int(raw.split(b" ", 2)[1]) if raw.startswith(b"HTTP/1.1 ") else 0
    return status, raw


def leaked_upstream(st: Any, since: int = 0) -> list[str]:
    return [f"{r.method} {r.target}" for r in st.upstream.requests[since:] if IN.encode() in r.body or IN in r.target]


def entries() -> list[tuple[str, str, str]]:
    """(prefix, method, path) for every table entry on every prefix of its dialect, and the passthrough names."""
    out = []
    for ep in TABLE:
        for prefix, dialect in PREFIXES:
            if dialect == ep.dialect:
                out += [(prefix, m, concrete(ep.template)) for m in sorted(ep.methods)]
    out += [("/v1", "POST", f"/{name}") for name in PASSTHROUGH_NAMES]
    out += [("/v1", "POST", "/no/such/endpoint"), ("/llama/v1", "POST", "/no/such/endpoint")]
    return out


@pytest.fixture(scope="module")
def walk_stack(tmp_path_factory):
    """One guarded stack for the whole walk below (each entry checks only the requests it caused)."""
    loops: list = []
    path = policy(tmp_path_factory.mktemp("walk"))
    yield build_stack(loops, {"upstreams": {"main": {"base_url": "SCRIPTED"}},
                              "routes": [{"upstream": "main", "policy": "p"}]},
                      handler=everything, policies=PolicyStore(required=[path]))
    for lp in loops:
        lp.close()


@pytest.mark.parametrize("prefix,method,path", entries())
def test_every_table_entry_is_guarded_or_refused(walk_stack, prefix: str, method: str, path: str) -> None:
    st = walk_stack
    ep = lookup(dict(PREFIXES)[prefix], method, path)
    before = len(st.upstream.requests)
    status, raw = send(st.url, method, prefix + path, body_for(method))
    assert leaked_upstream(st, since=before) == [], (prefix, method, path)
    reached = len(st.upstream.requests) > before
    if ep.kind is Kind.MCP:  # no MCP server of that name configured (tests/test_mcp_e2e.py has them)
        assert status == 404 and not reached
    elif ep.kind is Kind.GUARDRAILS:  # the check API: answered by the gateway, never sent upstream
        assert status in (200, 404) and not reached, (prefix, method, path, raw[:300])
    elif ep.kind is Kind.MODELS:
        assert status == 200 and reached  # metadata: relayed, never content
    elif ep.kind in (Kind.CHAT, Kind.RESPONSES, Kind.COMPLETIONS) or (
            ep.kind in (Kind.EMBEDDINGS, Kind.MODERATIONS) and ep.dialect == "openai"):
        assert status == 400 and b"content_filter" in raw and not reached, (prefix, method, path, raw[:300])
    elif ep.dialect == "llama":  # not chat or models: nothing to translate it to on an OpenAI upstream
        assert status == 404 and not reached
    elif method in ("GET", "DELETE") and ep.kind is not Kind.STORED_READ:
        assert status in (400, 403) and not reached
    else:
        assert status == 403 and b"endpoint_not_guarded" in raw and not reached, (prefix, method, path, raw)
    # The output phrase: a benign request (streamed, then not) never brings it back.
    for stream in (True, False):
        status, raw = send(st.url, method, prefix + path, benign_for(method, stream))
        assert OUT.encode() not in raw, (prefix, method, path, stream, raw[:400])


def test_passthrough_lets_exactly_the_listed_endpoints_through(guarded) -> None:
    """The control that shows the walk above can fail: listed endpoints reach the upstream, phrase and all."""
    st = guarded(passthrough=["files", "responses.stored", "chat.completions.stored"])
    status, _ = send(st.url, "POST", "/v1/files", body_for("POST"))
    assert status == 200 and len(leaked_upstream(st)) == 1
    status, raw = send(st.url, "GET", "/v1/responses/resp_1", b"")
    assert status == 200 and OUT.encode() in raw
    status, raw = send(st.url, "GET", "/v1/chat/completions/abc/messages", b"")
    assert status == 200 and OUT.encode() in raw
    status, raw = send(st.url, "POST", "/v1/batches", body_for("POST"))  # not listed
    assert status == 403 and len(leaked_upstream(st)) == 1


def test_passthrough_never_names_a_guarded_or_unknown_endpoint() -> None:
    base = {"upstreams": {"main": {"base_url": "http://x/v1"}}}
    for bad in ("chat.completions", "embeddings", "nope"):
        with pytest.raises(ConfigError, match="passthrough"):
            parse({**base, "routes": [{"upstream": "main", "passthrough": [bad]}]}, "t.yaml")


HOSTILE = [
    "/v1/chat/completions/", "/v1//chat/completions", "/v1/chat//completions", "/v1/chat/completions;x",
    "/v1/chat/completions;x=1", "/v1/chat%2Fcompletions", "/v1/chat%2fcompletions", "/v1/chat/completions%2F",
    "/v1/x/../chat/completions", "/v1/./chat/completions", "/v1/%2e/chat/completions", "/v1/%2E%2E/v1/chat/completions",
    "/v1/%2e%2e/%2e%2e/admin", "/v1/chat%252Fcompletions", "/v1/%252e/chat/completions", "/v1/chat/%63ompletions",
    "/V1/CHAT/COMPLETIONS", "/v1/Chat/Completions", "/v1/CHAT/completions", "/v1\\chat\\completions",
    "/v1/chat\\completions", "/v1/chat/completions%00", "/v1/chat/completions%3B", "//v1/chat/completions",
    "/v1/deployments/d/../../chat/completions", "/v1/deployments/%2e%2e/chat/completions",
    "http://evil/v1/chat/completions", "/openai/v1//chat/completions", "/llama/compat/v1/./chat/completions",
    "/llama/v1/chat/completions/", "/v1/chat/completions/%2e%2e", "/v1/embeddings/", "/v1//embeddings",
    "/v1/responses/", "/v1//responses", "/v1/chat/completions/x/..",
]


@pytest.mark.parametrize("with_policy", [True, False])
def test_hostile_spellings_are_refused_or_guarded(guarded, with_policy: bool) -> None:
    st = guarded(with_policy=with_policy)
    for target in HOSTILE:
        for stream in (True, False):
            before = len(st.upstream.requests)
            status, raw = send(st.url, "POST", target, body_for("POST"))
            if with_policy:
                assert status in (400, 403, 404), (target, status, raw[:300])
                assert leaked_upstream(st) == [], target
            # The upstream never receives a path other than the canonical one the gateway classified.
            for r in st.upstream.requests[before:]:
                assert r.target == "/v1" + target.removeprefix("/v1"), (target, r.target)
                canonical_target(r.target)
            status, raw = send(st.url, "POST", target, benign_for("POST", stream))
            if with_policy:
                assert OUT.encode() not in raw, (target, raw[:300])
    # Nothing ever escaped the upstream's base path (/v1): `/v1/%2e%2e/%2e%2e/admin` reached /admin before.
    assert all(r.target.startswith("/v1/") for r in st.upstream.requests)


def test_real_sdk_endpoints_under_a_policy(guarded) -> None:
    """The openai SDK's own methods for the endpoints the gateway does not inspect get a clean 403;
    the ones it guards get 400 content_filter on the input phrase and a filtered answer."""
    st = guarded()
    client = st.openai()
    with pytest.raises(openai.BadRequestError) as bad:
        client.responses.create(model="m", input=f"say {IN}")
    assert bad.value.code == "content_filter"
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model="m", prompt=f"say {IN}")
    assert bad.value.code == "content_filter"
    with pytest.raises(openai.PermissionDeniedError) as e:
        client.files.create(file=("a.txt", b"x"), purpose="assistants")
    assert e.value.code == "endpoint_not_guarded" and "passthrough: [files]" in e.value.message
    done = client.completions.create(model="m", prompt="hello")
    assert OUT not in done.choices[0].text and done.choices[0].finish_reason == "content_filter"
    parts = list(client.completions.create(model="m", prompt="hello", stream=True))
    assert OUT not in "".join(p.choices[0].text for p in parts if p.choices)
    assert parts[-1].choices[0].finish_reason == "content_filter"
    with pytest.raises(openai.PermissionDeniedError):
        client.chat.completions.retrieve("chatcmpl-xyz")
    with pytest.raises(openai.PermissionDeniedError):
        client.chat.completions.messages.list("chatcmpl-xyz")
    with pytest.raises(openai.PermissionDeniedError):
        client.files.list()
    with pytest.raises(openai.BadRequestError) as bad:
        client.embeddings.create(model="m", input=[f"say {IN}"])
    assert bad.value.code == "content_filter"
    with pytest.raises(openai.BadRequestError) as bad:
        client.embeddings.create(model="m", input=[[1, 2, 3]])
    assert bad.value.code == "uninspectable_input"
    assert len(client.embeddings.create(model="m", input="hello").data[0].embedding) == 2
    with pytest.raises(openai.BadRequestError):
        client.moderations.create(model="m", input=f"say {IN}")
    assert client.models.list().data[0].id == "m"
    assert leaked_upstream(st) == []
    stream = client.chat.completions.create(model="m", messages=BENIGN, stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert OUT not in text and chunks[-1].choices[0].finish_reason == "content_filter"


def test_azure_deployment_paths_are_chat(guarded) -> None:
    """AzureOpenAI puts the deployment in the path (`/deployments/{model}/chat/completions`): guarded as chat,
    and the upstream receives that same path (with the api-version query)."""
    st = guarded()
    client = openai.AzureOpenAI(base_url=st.url + "/v1", api_key="k", api_version="2024-10-21", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="dep", messages=[{"role": "user", "content": f"say {IN}"}])
    assert e.value.code == "content_filter" and leaked_upstream(st) == []
    chunks = list(client.chat.completions.create(model="dep", messages=BENIGN, stream=True))
    assert OUT not in "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert st.upstream.last.target == "/v1/deployments/dep/chat/completions?api-version=2024-10-21"
    # A body without `model` (Azure's own shape) is routed by the deployment.
    r = httpx.post(st.url + "/v1/deployments/dep/chat/completions?api-version=1", json={"messages": BENIGN})
    assert r.status_code == 200 and OUT not in r.text, r.text


def test_no_policy_relays_every_endpoint_and_refuses_only_non_canonical_paths(guarded) -> None:
    st = guarded(with_policy=False)
    for target in ("/v1/responses", "/v1/files", "/v1/no/such", "/v1/chat/completions/abc"):
        status, raw = send(st.url, "POST" if "abc" not in target else "GET", target,
                           benign_for("POST", False) if "abc" not in target else b"")
        assert status == 200, (target, raw[:200])
        assert st.upstream.last.target == target
    status, raw = send(st.url, "POST", "/v1/%2e%2e/%2e%2e/admin", b"{}")
    assert status == 400 and b"invalid_path" in raw


def test_malformed_requests_get_a_400_in_the_dialect(guarded) -> None:
    st = guarded()
    deep = b'{"model": "m", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    for body in (b"{not json", b"[1, 2]", deep, b'{"model": "m", "n": ' + b"9" * 5000 + b"}"):
        status, raw = send(st.url, "POST", "/v1/chat/completions", body)
        assert status == 400 and b"Traceback" not in raw, raw[:300]
    status, raw = send(st.url, "GET", "/v1/models", b'{"model": "m"}')
    assert status == 400  # a body on GET
    # The JSON is read whatever the Content-Type: the model picks the policy.
    r = httpx.post(st.url + "/v1/chat/completions", content=json.dumps({"model": "m", "messages": [
        {"role": "user", "content": IN}]}), headers={"Content-Type": "text/plain"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "content_filter"
    r = httpx.post(st.url + "/v1/chat/completions", json={"model": "m", "messages": BENIGN},
                   headers=[("Authorization", "Bearer a"), ("Authorization", "Bearer b")])
    assert r.status_code == 400
    assert leaked_upstream(st) == []


# ----------------------------------------------------------------------------- property: spellings


def _router(passthrough: frozenset[str] = frozenset()) -> Router:
    cfg = parse({"upstreams": {"main": {"base_url": "http://up/v1"}},
                 "routes": [{"upstream": "main", "policy": "p"}]}, "t.yaml")
    cfg.routes[0].passthrough = passthrough
    pol = SimpleNamespace(needs_inspection=True, has_input=True, has_output=True, steps=[])
    return Router(cfg, {"main": HttpUpstream(cfg.upstreams["main"])}, {"p": pol})


def classify(router: Router, method: str, target: str) -> tuple[str, str] | str:
    """(kind, action) the gateway decides for a request, or the error code that refuses it."""
    ctx = RequestContext(id="t", dialect="openai")
    try:
        query = router.admit(ctx, method, target, [])
        plan = router.plan(ctx, method, query, b'{"model": "m"}' if method == "POST" else b"")
    except GatewayError as e:
        return e.code
    return plan.endpoint.kind.value, plan.action.value


def _mutations() -> hs.SearchStrategy[Any]:
    def apply(path: str, ops: list[tuple[int, int]]) -> str:
        for op, where in ops:
            segs = path.split("/")
            i = 1 + where % max(1, len(segs) - 1)
            seg = segs[min(i, len(segs) - 1)]
            if op == 0:
                segs.insert(i, "")  # //
            elif op == 1:
                segs.insert(i, ".")
            elif op == 2:
                segs[i:i] = ["zz", ".."]
            elif op == 3 and seg:
                segs[i] = f"%{ord(seg[0]):02X}" + seg[1:]  # an escaped (unreserved) first character
            elif op == 4:
                segs[i] = seg.upper()
            elif op == 5:
                segs[i] = seg + ";p"
            elif op == 6:
                segs[i] = seg + "%2F"
            elif op == 7:
                segs.append("")  # trailing slash
            elif op == 8:
                segs[i] = seg.replace("e", "%2565", 1)  # double-encoded
            elif op == 9:
                segs[i] = seg + "\\"
            path = "/".join(segs)
        return path

    return hs.lists(hs.tuples(hs.integers(0, 9), hs.integers(0, 8)), min_size=1, max_size=3).map(
        lambda ops: (ops, apply))


CANONICAL = sorted({("/v1" + concrete(ep.template), m) for ep in TABLE if ep.dialect == "openai"
                    for m in ep.methods})


@settings(max_examples=400, deadline=None)
@given(hs.sampled_from(CANONICAL), _mutations())
@pytest.mark.slow
def test_any_spelling_is_classified_like_its_canonical_form_or_refused(case, mutation) -> None:
    (path, method), (ops, apply) = case, mutation
    router = _router()
    canonical = classify(router, method, path)
    spelled = apply(path, ops)
    got = classify(router, method, spelled)
    if spelled == path:
        assert got == canonical
    else:
        # refused outright, or classified as what it canonically is (never relayed unclassified)
        assert got == canonical or got in ("invalid_path", "not_found", "endpoint_not_guarded"), (spelled, got)
        assert got != (Kind.PASSTHROUGH.value, Action.RELAY.value)


def test_a_relayed_responses_stream_that_fails_ends_with_a_responses_error_event(make_stack) -> None:
    """No policy, an OpenAI upstream: /v1/responses is relayed as it is. When the upstream dies mid-stream
    the client gets the Responses API's own `error` event (not a chat-shaped frame), and the SDK reads it."""
    created = {"type": "response.created", "sequence_number": 0, "response": {
        "id": "resp_1", "object": "response", "created_at": 1, "status": "in_progress", "model": "m", "output": [],
        "parallel_tool_calls": True, "tool_choice": "auto", "tools": []}}

    async def dies(request: web.Request, up: object) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(f"event: response.created\ndata: {json.dumps(created)}\n\n".encode())
        assert request.transport is not None
        request.transport.close()  # the chunked body never ends
        return resp

    st = make_stack({"upstreams": {"main": {"base_url": "SCRIPTED"}}}, handler=dies)
    events = list(st.openai().responses.create(model="m", input="hi", stream=True))
    assert [e.type for e in events] == ["response.created", "error"]
    assert events[-1].code == "upstream_error"

"""Llama Guard 4 through a remote backend (Llama API /v1/moderations, OpenAI-compatible chat or
completions), and the in-process probe that prefers a local GGUF once llama.cpp can load it.

The remote servers are small aiohttp apps on loopback that speak the documented wire shapes.
"""

from __future__ import annotations

import json

import pytest
from aiohttp import web

from gateway.guards.base import GuardInput, create
from gateway.guards.llama_guard import LlamaGuard
from gateway.types import Message

pytest_plugins = ["llama_fixtures"]


def _unsafe(messages: list[dict]) -> bool:
    return any("bomb" in (m.get("content") or "") for m in messages)


@pytest.fixture
async def server(aiohttp_unused_port=None):
    seen: list[tuple[str, dict, str | None]] = []

    async def moderations(req: web.Request) -> web.Response:
        body = await req.json()
        seen.append(("moderations", body, req.headers.get("Authorization")))
        bad = _unsafe(body["messages"])
        return web.json_response(
            {
                "model": body.get("model"),
                "results": [{"flagged": bad, "flagged_categories": ["S9"] if bad else []}],
            }
        )

    async def chat(req: web.Request) -> web.Response:
        body = await req.json()
        seen.append(("chat", body, req.headers.get("Authorization")))
        bad = _unsafe(body["messages"])
        text = "unsafe\nS1,S9" if bad else "safe"
        lp_unsafe, lp_safe = (-0.05, -3.0) if bad else (-4.0, -0.02)
        return web.json_response(
            {
                "choices": [
                    {
                        "message": {"role": "assistant", "content": text},
                        "logprobs": {
                            "content": [
                                {
                                    "token": text.split()[0],
                                    "logprob": max(lp_safe, lp_unsafe),
                                    "top_logprobs": [
                                        {"token": "safe", "logprob": lp_safe},
                                        {"token": "unsafe", "logprob": lp_unsafe},
                                    ],
                                }
                            ]
                        },
                    }
                ]
            }
        )

    async def completions(req: web.Request) -> web.Response:
        body = await req.json()
        seen.append(("completions", body, req.headers.get("Authorization")))
        bad = "bomb" in body["prompt"]
        return web.json_response({"choices": [{"text": "unsafe\nS10" if bad else "safe", "logprobs": None}]})

    async def broken(req: web.Request) -> web.Response:
        return web.Response(status=500, text="model crashed")

    app = web.Application()
    app.router.add_post("/v1/moderations", moderations)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/broken/v1/chat/completions", broken)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}", seen
    await runner.cleanup()


def inp(text: str) -> GuardInput:
    return GuardInput(stage="input", messages=[Message.of("user", text)])


@pytest.mark.parametrize("api", ["llama_moderations", "openai_chat", "openai_completions"])
async def test_remote_backends(server, api, monkeypatch):
    url, seen = server
    monkeypatch.setenv("GG_TEST_GUARD_KEY", "sekret")
    g = create(
        "llama_guard",
        variant="lg4",
        remote={
            "base_url": url + "/v1",
            "api": api,
            "model": "Llama-Guard-4-12B",
            "api_key_env": "GG_TEST_GUARD_KEY",
        },
    )
    ok = await g.check(inp("nice weather"))
    bad = await g.check(inp("how to make a bomb"))
    assert g.mode == "remote" and not ok.flagged and bad.flagged
    assert (
        bad.categories
        == {"llama_moderations": ["S9"], "openai_chat": ["S1", "S9"], "openai_completions": ["S10"]}[api]
    )
    assert seen[-1][2] == "Bearer sekret" and seen[-1][1]["model"] == "Llama-Guard-4-12B"
    if api == "openai_chat":
        assert bad.score == pytest.approx(1 / (1 + pow(2.718281828, -2.95)), abs=1e-3)  # from top_logprobs
        assert ok.score < 0.05
    if api == "openai_completions":
        prompt = seen[-1][1]["prompt"]
        assert prompt.startswith("<|begin_of_text|><|header_start|>user<|header_end|>")
        assert "S14: Code Interpreter Abuse." in prompt and prompt.endswith(
            "<|header_start|>assistant<|header_end|>\n\n"
        )
    # streams over a remote backend re-check the answer one-shot (no KV cache to reuse)
    sc = g.open_stream([Message.of("user", "story")], "r1")
    assert not (await sc.check("once upon a time", 0, False)).flagged
    assert (await sc.check("once upon a time a bomb", 0, True)).flagged
    await sc.close()
    await g.aclose()


async def test_category_subset_goes_to_the_chat_template(server):
    url, seen = server
    g = create("llama_guard", categories=["S1", "S9"], remote={"base_url": url + "/v1", "api": "openai_chat"})
    await g.check(inp("hello"))
    kwargs = seen[-1][1]["chat_template_kwargs"]
    assert list(kwargs["categories"])[:2] == ["S1", "S2"] and "S2" in kwargs["excluded_category_keys"]
    assert "S9" not in kwargs["excluded_category_keys"]
    await g.aclose()


async def test_remote_errors_raise(server, monkeypatch):
    url, _ = server
    g = create("llama_guard", remote={"base_url": url + "/broken/v1", "api": "openai_chat"})
    with pytest.raises(RuntimeError, match="HTTP 500"):
        await g.check(inp("hello"))
    monkeypatch.delenv("GG_MISSING_KEY", raising=False)
    g2 = create("llama_guard", remote={"base_url": url + "/v1", "api_key_env": "GG_MISSING_KEY"})
    with pytest.raises(RuntimeError, match="GG_MISSING_KEY"):
        await g2.check(inp("hello"))
    await g.aclose()
    await g2.aclose()


async def test_llama4_gguf_is_probed_then_served_remotely(server, llama4_stub_gguf):
    """A dense llama4 GGUF (what converting LG4 gives) fails llama.cpp's loader: use the remote."""
    from gateway.engine import probe_load

    ok, why = probe_load(str(llama4_stub_gguf))
    assert not ok and "zero experts" in why
    url, _ = server
    g = create(
        "llama_guard",
        model=str(llama4_stub_gguf),
        variant="lg4",
        remote={"base_url": url + "/v1", "api": "llama_moderations"},
    )
    assert isinstance(g, LlamaGuard)
    v = await g.check(inp("a bomb"))
    assert g.mode == "remote" and v.flagged and "zero experts" in g.probe
    await g.aclose()
    local_only = create("llama_guard", model=str(llama4_stub_gguf), variant="lg4", backend="local")
    with pytest.raises(RuntimeError, match="zero experts"):
        await local_only.start()


async def test_probe_accepts_a_loadable_model(tiny_gguf):
    from gateway.engine import probe_load

    ok, why = probe_load(str(tiny_gguf))
    assert ok and "llama" in why
    assert json.dumps(why)


@pytest.fixture
async def llama_cpp_server():
    """A server speaking llama.cpp's native /completion: per slot it remembers the last prompt and
    reports, like llama.cpp's prompt cache, how many leading characters it reused (`cache_n`) and
    evaluated (`prompt_n`); the first token's top probabilities in the format the test picks:
    `top_probs` (what the current server sends with `post_sampling_probs`), `top_logprobs` (without),
    or `probs` (older servers). A prompt that ends with the forced "unsafe" gets the categories.
    (tests/test_llama_server_remote.py runs the same checks against a real llama-server.)"""
    seen: list[dict] = []
    slots: dict[int, str] = {}
    fmt = {"probs": "top_probs"}

    async def tokenize(req: web.Request) -> web.Response:
        body = await req.json()
        assert body == {"content": "<|begin_of_text|>", "add_special": False, "parse_special": True}
        return web.json_response({"tokens": [128000]})

    async def completion(req: web.Request) -> web.Response:
        body = await req.json()
        body["raw_prompt"] = body["prompt"]  # [BOS id, text]: no second BOS from the server
        assert isinstance(body["prompt"], list) and body["prompt"][0] == 128000, body["prompt"]
        body["prompt"] = "".join("<|begin_of_text|>" if x == 128000 else x for x in body["prompt"])
        seen.append(body)
        prompt, slot = body["prompt"], body["id_slot"]
        last = slots.get(slot, "") if body.get("cache_prompt") else ""
        n = 0
        while n < min(len(last), len(prompt)) and last[n] == prompt[n]:
            n += 1
        slots[slot] = prompt
        bad = "bomb" in prompt
        if prompt.endswith("unsafe"):
            return web.json_response({"content": "\nS1", "id_slot": slot,
                                      "timings": {"cache_n": n, "prompt_n": len(prompt) - n}})
        lp_unsafe, lp_safe = (-0.05, -3.0) if bad else (-4.0, -0.02)
        text = "unsafe" if bad else "safe"
        e = 2.718281828
        if fmt["probs"] == "probs":
            probs = [{"content": text, "probs": [{"tok_str": "safe", "prob": e**lp_safe},
                                                 {"tok_str": "unsafe", "prob": e**lp_unsafe}]}]
        elif fmt["probs"] == "top_probs":
            probs = [{"id": 1, "token": text, "prob": e ** max(lp_safe, lp_unsafe),
                      "top_probs": [{"id": 2, "token": "safe", "prob": e**lp_safe},
                                    {"id": 3, "token": "unsafe", "prob": e**lp_unsafe}]}]
        else:
            probs = [{"token": text, "logprob": max(lp_safe, lp_unsafe),
                      "top_logprobs": [{"token": "safe", "logprob": lp_safe},
                                       {"token": "unsafe", "logprob": lp_unsafe}]}]
        return web.json_response({"content": text, "id_slot": slot, "completion_probabilities": probs,
                                  "timings": {"cache_n": n, "prompt_n": len(prompt) - n}})

    app = web.Application()
    app.router.add_post("/completion", completion)
    app.router.add_post("/tokenize", tokenize)
    async def props(req: web.Request) -> web.Response:
        return web.json_response({"total_slots": 2})

    app.router.add_get("/props", props)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}", seen, fmt
    await runner.cleanup()


@pytest.mark.parametrize("probs", ["top_probs", "top_logprobs", "probs"])
async def test_llama_cpp_server_streams_keep_their_slot_and_its_prompt_cache(llama_cpp_server, probs):
    url, seen, fmt = llama_cpp_server
    fmt["probs"] = probs
    g = create("llama_guard", variant="lg3-1b", remote={"base_url": url, "api": "llama_cpp", "slots": 2})
    a = g.open_stream([Message.of("user", "story")], "a")
    b = g.open_stream([Message.of("user", "another story")], "b")
    va1 = await a.check("once upon a time", 0, False)
    vb1 = await b.check("far far away", 0, False)
    va2 = await a.check("once upon a time there was", 0, False)
    assert all(body["cache_prompt"] is True and body["n_probs"] > 0 for body in seen)
    assert seen[0]["logit_bias"] == [["safe", 1000.0], ["unsafe", 1000.0]] and seen[0]["post_sampling_probs"]
    assert [body["id_slot"] for body in seen] == [0, 1, 0]  # each stream its own slot, kept
    assert seen[0]["raw_prompt"][0] == 128000 and seen[0]["raw_prompt"][1].startswith("<|start_header_id|>user")
    assert seen[0]["prompt"].startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>")
    assert seen[0]["prompt"].endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert not (va1.flagged or vb1.flagged or va2.flagged) and va2.score < 0.05
    # the server reused the stream's prefix (template + answer so far): only the new text and the suffix
    shared = next(i for i, (x, y) in enumerate(zip(seen[0]["prompt"], seen[2]["prompt"], strict=False)) if x != y)
    assert va2.details["reused"] == shared > 500
    assert va2.tokens_evaluated == len(seen[2]["prompt"]) - va2.details["reused"]
    bad = await a.check("once upon a time there was a bomb", 0, True)
    assert bad.flagged and bad.categories == ["S1"]  # decoded by a second, cached call
    assert seen[-1]["n_predict"] > 1 and seen[-1]["id_slot"] == 0 and seen[-1]["prompt"].endswith("\n\nunsafe")
    await a.close()
    c = g.open_stream([Message.of("user", "third")], "c")
    await c.check("hello", 0, True)
    assert seen[-1]["id_slot"] == 0  # a's slot was given back
    await b.close()
    await c.close()
    await g.aclose()


async def test_llama_cpp_slots_beyond_the_servers_go_unpinned(llama_cpp_server, caplog):
    """`slots` naming more than the server has (`/props` total_slots 2): the server would wrap id_slot 2
    onto slot 0, so that stream goes unpinned (-1), with a warning, and its slot is never handed out."""
    url, seen, _ = llama_cpp_server
    g = create("llama_guard", variant="lg3-1b", remote={"base_url": url, "api": "llama_cpp", "slots": 3})
    streams = [g.open_stream([Message.of("user", "story")], f"s{i}") for i in range(3)]
    verdicts = [await sc.check(f"once upon a time {i}", 0, False) for i, sc in enumerate(streams)]
    assert [body["id_slot"] for body in seen] == [0, 1, -1]
    assert [v.details["slot"] for v in verdicts] == [0, 1, -1]
    assert "has 2 slots" in caplog.text
    for sc in streams:
        await sc.close()
    assert sorted(g.remote._free_slots) == [0, 1]
    await g.aclose()


def test_llama_cpp_slots_a_range_and_each_workers_share(monkeypatch):
    """Every gateway process pins streams to slots of its own: a replica names its range ("A-B"), and
    under `serve --workers N` each worker takes every N-th slot of it (no two pin the same slot)."""
    from gateway.guards.base import GuardConfigError
    from gateway.guards.llama_guard.remote import RemoteOptions

    def ids(slots):
        return RemoteOptions.parse({"base_url": "http://g", "api": "llama_cpp", "slots": slots}).slot_ids()

    monkeypatch.delenv("GUARDGATE_WORKERS", raising=False)
    assert ids(4) == [0, 1, 2, 3] and ids("16-19") == [16, 17, 18, 19] and ids(0) == []
    monkeypatch.setenv("GUARDGATE_WORKERS", "2")
    monkeypatch.setenv("GUARDGATE_WORKER", "1")
    assert ids("16-23") == [17, 19, 21, 23]
    monkeypatch.setenv("GUARDGATE_WORKER", "0")
    assert ids("16-23") == [16, 18, 20, 22]
    for bad in ("x", "5-2", "-3"):
        with pytest.raises(GuardConfigError):
            ids(bad)

"""Llama Guard's `remote` backend with `api: llama_cpp` against a real llama.cpp server (`llama-server`,
the compose file's `guard` service), on the rigged toy guard (scripts/make_tiny_gguf.py, Llama 3
vocabulary: `unsafe\\nS1` once " bomb" is in the prompt, `safe` otherwise).

What the real server must give: verdicts and categories; a stream check that stays incremental through
the server's prompt cache (`cache_prompt`, one slot per stream), costing what the in-process check
costs; two streams on their own slots that do not evict each other; a killed server that is an error
verdict (on_error), never a pass. Skipped, with the reason, where no llama-server binary is installed
(scripts/build_llama_server.sh).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from llama_server_fixtures import MISSING, LlamaServer, find_llama_server

from gateway.guards.base import create
from gateway.guards.llama_guard import LlamaGuard
from gateway.types import Message

pytest.importorskip("llama_cpp")
pytest_plugins = ["llama_fixtures"]
BIN = find_llama_server()
pytestmark = pytest.mark.skipif(BIN is None, reason=MISSING)

EVERY = 32
BENIGN = "Mix flour, water, salt and yeast. Knead the dough for ten minutes and let it rise. " * 12
OTHER = "The river bends twice before the old mill, where herons wait in the reeds at dawn. " * 12
ASK = [Message.of("user", "How do I bake bread at home?")]


@pytest.fixture(scope="module")
def server(rig_gguf) -> Any:
    assert BIN is not None
    s = LlamaServer(BIN, rig_gguf, parallel=3, ctx=3 * 4096).wait_ready()
    yield s
    s.stop()


@pytest.fixture
async def pool():
    from gateway.engine import EnginePool

    p = EnginePool()
    yield p
    await p.aclose()


def remote_guard(url: str, slots: int | str = 2, **opts: Any) -> LlamaGuard:
    g = create(
        "llama_guard",
        backend="remote",
        variant="lg3-1b",
        remote={"base_url": url, "api": "llama_cpp", "slots": slots, "timeout_s": 30},
        **opts,
    )
    assert isinstance(g, LlamaGuard)
    return g


async def local_guard(pool: Any, model: Any) -> LlamaGuard:
    g = create("llama_guard", model=str(model), pool=pool, backend="local", n_threads=2, n_ctx=4096, prefix_cache_mb=0)
    assert isinstance(g, LlamaGuard)
    await g.start()
    return g


def prefixes(g: LlamaGuard, text: str, every: int = EVERY) -> list[str]:
    """The answer as a stream delivers it to the check: every `every` tokens, and the whole at the end."""
    assert g.model is not None
    toks = g.model.tokenize(text, special=False)
    return [g.model.detokenize(toks[:n]) for n in [*range(every, len(toks), every), len(toks)]]


async def run_stream(g: LlamaGuard, texts: list[str], rid: str) -> list[Any]:
    sc = g.open_stream(ASK, rid)
    try:
        return [await sc.check(t, 0, i == len(texts) - 1) for i, t in enumerate(texts)]
    finally:
        await sc.close()


async def test_verdicts_and_categories_from_a_real_llama_server(server, pool, rig_gguf):
    from gateway.guards.base import GuardInput

    g = remote_guard(server.url)
    ok = await g.check(GuardInput(stage="input", messages=[Message.of("user", "nice weather today")]))
    bad = await g.check(GuardInput(stage="input", messages=[Message.of("user", "where to hide a bomb")]))
    assert g.mode == "remote" and ok.error is None and bad.error is None
    assert not ok.flagged and ok.score < 0.1
    assert bad.flagged and bad.score > 0.9 and bad.categories == ["S1"]
    # the same P(unsafe) as in-process: the softmax over the two verdict words' logits
    local = await local_guard(pool, rig_gguf)
    lok = await local.check(GuardInput(stage="input", messages=[Message.of("user", "nice weather today")]))
    assert ok.score == pytest.approx(lok.score, abs=1e-3)
    await local.aclose()
    await g.aclose()


async def test_p_unsafe_is_the_in_process_figure_on_a_random_model(pool, tiny_gguf):
    """On random weights neither verdict word is among the model's top tokens: P(unsafe) still comes out
    as in-process (the softmax over the two words' logits), from the bias on both and top_k 2."""
    from gateway.guards.base import GuardInput

    assert BIN is not None
    s = LlamaServer(BIN, tiny_gguf, parallel=1, ctx=4096).wait_ready()
    try:
        g = remote_guard(s.url, slots=1)
        local = await local_guard(pool, tiny_gguf)
        for text in ("nice weather today", "how do I sharpen a kitchen knife?"):
            inp = GuardInput(stage="input", messages=[Message.of("user", text)])
            r, lv = await g.check(inp), await local.check(inp)
            assert r.error is None and 0.01 < r.score < 0.99, r
            assert r.score == pytest.approx(lv.score, abs=2e-3), (r.score, lv.score)
        await g.aclose()
        await local.aclose()
    finally:
        s.stop()


async def test_stream_check_stays_incremental_through_the_prompt_cache(server, pool, rig_gguf):
    """Each check evaluates the tokens added since the last one plus the template suffix, as the
    in-process check does; the server's cache holds the rest (the naive re-check costs ~6x more here)."""
    local = await local_guard(pool, rig_gguf)
    texts = prefixes(local, BENIGN)
    assert len(texts) >= 8
    g = remote_guard(server.url)
    remote = await run_stream(g, texts, "inc")
    inproc = await run_stream(local, texts, "inc-local")
    assert all(v.error is None and not v.flagged for v in remote), [v.error for v in remote]
    assert {v.details["slot"] for v in remote} == {0}  # the stream kept its slot
    ev = [v.tokens_evaluated for v in remote]
    full = [v.tokens_evaluated + v.details["reused"] for v in remote]  # the prompt each check sent
    lev = [v.tokens_evaluated for v in inproc]
    # the server got the tokens in-process evaluates (one BOS: the template's, sent as its id)
    assert full[0] == inproc[0].details["prompt_tokens"] == lev[0]
    assert ev[0] >= full[0] - 16  # the first check of a stream: the whole prompt (bar a shared head)
    for i in range(1, len(ev)):  # then only the new tokens + the suffix: the in-process figure, +-2
        assert abs(ev[i] - lev[i]) <= 2, (i, ev, lev)
        assert ev[i] < full[i] - full[i - 1] + 80, (i, ev, full)
    assert sum(ev) <= 1.1 * sum(lev), (sum(ev), sum(lev))
    assert sum(ev) < 0.3 * sum(full), (sum(ev), sum(full))
    # the answer turns unsafe mid-stream: flagged at the next check, categories decoded from the cache
    bad = texts[3] + " Then the bomb goes off."
    sc = g.open_stream(ASK, "bad")
    for t in texts[:4]:
        assert not (await sc.check(t, 0, False)).flagged
    v = await sc.check(bad, 0, True)
    await sc.close()
    assert v.flagged and v.categories == ["S1"] and v.tokens_evaluated < 100, v
    await local.aclose()
    await g.aclose()


async def test_two_streams_on_their_own_slots_keep_their_caches(server, pool, rig_gguf):
    """Two streams checked concurrently, interleaved with one-shot input checks of another step (its own
    slot, "2-2"): each stream keeps its slot's KV (no eviction)."""
    from gateway.guards.base import GuardInput

    local = await local_guard(pool, rig_gguf)
    a_texts, b_texts = prefixes(local, BENIGN), prefixes(local, OTHER)
    await local.aclose()
    g = remote_guard(server.url)
    inputs = remote_guard(server.url, slots="2-2")
    a, b = g.open_stream(ASK, "a"), g.open_stream(ASK, "b")
    va: list[Any] = []
    vb: list[Any] = []
    vi: list[Any] = []
    for i, (ta, tb) in enumerate(zip(a_texts, b_texts, strict=False)):
        question = GuardInput(stage="input", messages=[Message.of("user", f"question {i}: how do rivers bend?")])
        x, y, z = await asyncio.gather(a.check(ta, 0, False), b.check(tb, 0, False), inputs.check(question))
        va.append(x)
        vb.append(y)
        vi.append(z)
    await a.close()
    await b.close()
    assert {v.details["slot"] for v in va} == {0} and {v.details["slot"] for v in vb} == {1}
    assert {v.details["slot"] for v in vi} == {2} and not any(v.flagged for v in vi)
    for vs in (va, vb):
        assert all(v.error is None for v in vs)
        reused_share = [v.details["reused"] / (v.details["reused"] + v.tokens_evaluated) for v in vs[1:]]
        assert min(reused_share) > 0.6, reused_share  # each check found its own stream's prefix
    await g.aclose()
    await inputs.aclose()


def _policy(url: str) -> Any:
    from gateway.policy.schema import parse_policy_text

    return parse_policy_text(f"""
name: lg-remote
stream:
  check_every_tokens: 16
  max_unchecked_tokens: 0
  steps:
    - guard: llama_guard
      backend: remote
      variant: lg3-1b
      remote: {{base_url: "{url}", api: llama_cpp, slots: 2, timeout_s: 5}}
      action: block
""")


async def _run(pol: Any, text: str) -> tuple[list[Any], dict[str, Any]]:
    from policy_fakes import FakeUpstream, collect, tokens_of

    from gateway.policy.chain import PolicyRun
    from gateway.types import Exchange

    up = FakeUpstream(tokens_of(text))
    run = PolicyRun(pol, request_id="r1", route="/v1/chat/completions", dialect="openai", model="m")
    ex = Exchange(model="m", messages=ASK, stream=True)
    events = await collect(run.guard_stream(ex, up.events()))
    return events, run.finish()


async def test_a_killed_llama_server_is_an_error_verdict_never_a_pass(rig_gguf):
    from policy_fakes import text_of

    from gateway.types import Finish

    assert BIN is not None
    s = LlamaServer(BIN, rig_gguf, parallel=2, ctx=4096).wait_ready()
    pol = _policy(s.url)
    await pol.start()
    try:
        answer = BENIGN[:300]
        events, rec = await _run(pol, answer)
        assert text_of(events) == answer and rec["action"] == "allow", rec
        events, rec = await _run(pol, BENIGN[:200] + " the bomb goes in the middle. " + BENIGN[:100])
        assert "bomb" not in text_of(events) and rec["action"] == "block"
        s.stop()
        events, rec = await _run(pol, answer)
        assert rec["action"] == "block" and rec["steps"][0]["errors"] >= 1, rec  # on_error: block
        assert Finish("content_filter", 0) in events and text_of(events) != answer
    finally:
        s.stop()
        await pol.aclose()

"""The llama.cpp engine on a tiny random-weight model with the real Llama 3 vocabulary.

Exactness: with flash attention off, logits of an incremental (KV-reuse) evaluation are
bit-identical to a fresh evaluation of the same tokens. With flash attention on (llama.cpp's
CPU default) they differ by float noise only: we require max |diff| <= 2e-3 on logits of magnitude
~1 (measured ~5e-4; the FA kernel accumulates in f16 over blocks whose split depends on KV length).
"""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
from waits import until

from gateway.engine import (
    EngineError,
    EnginePool,
    LlamaModel,
    ModelOptions,
    SamplingParams,
)
from gateway.guards.llama_guard import LG3_1B_CODES, LG3_CATEGORIES, render_lg3

pytest.importorskip("llama_cpp")
pytest_plugins = ["llama_fixtures"]

CATS = {c: LG3_CATEGORIES[c] for c in LG3_1B_CODES}
ANSWER = (
    "Sure. Mix flour, water, salt and yeast; knead for ten minutes, then let the dough rise!!\n\n"
    "```python\nimport time\nprint('bake', 220)\n```\nThat's it. Salt and...done."
)


def prompt_for(answer: str) -> tuple[str, str]:
    """(full prompt, body = prompt minus the fixed suffix) for a partial answer."""
    p = render_lg3([("user", "How do I bake bread?"), ("assistant", answer)], CATS) + "\n\n"
    head = p.index("\n\nAgent: ") + len("\n\nAgent: ")
    return p, p[:head] + answer.strip()


async def load(path, **kw) -> LlamaModel:
    kw.setdefault("n_ctx", 4096)
    kw.setdefault("n_threads", 2)
    m = LlamaModel(ModelOptions(str(path), **kw))
    await m.wait_ready()
    return m


@pytest.mark.parametrize("flash_attn, tol", [(False, 0.0), (None, 2e-3)])
async def test_incremental_logits_equal_fresh_evaluation(tiny_gguf, flash_attn, tol):
    m = await load(tiny_gguf, flash_attn=flash_attn)
    try:
        s = m.open_session()
        cuts = [1, 9, 23, 40, 57, 88, 89, 90, 101, 120, 133, 150, len(ANSWER)]
        worst = 0.0
        for cut in cuts:
            prompt, body = prompt_for(ANSWER[:cut])
            inc = await m.evaluate(prompt, session=s, keep=body)
            fresh = await m.evaluate(prompt)  # temporary sequence, nothing cached
            assert inc.n_prompt == fresh.n_prompt == len(m.tokenize(prompt))
            assert fresh.n_reused == 0
            worst = max(worst, float(np.abs(inc.logits - fresh.logits).max()))
            if cut > 1:
                # only the new tokens (+ a few re-tokenized at the boundary) and the suffix are evaluated
                suffix = len(m.tokenize(prompt)) - len(m.tokenize(body))
                assert inc.n_evaluated <= suffix + 60
                assert inc.n_reused >= 140
        assert worst <= tol, worst
        await s.close()
    finally:
        await m.aclose()


async def test_suffix_is_rolled_back_and_session_close_frees_the_sequence(tiny_gguf):
    m = await load(tiny_gguf, max_sessions=2)
    try:
        prompt, body = prompt_for(ANSWER[:60])
        sessions = [m.open_session() for _ in range(2)]
        for s in sessions:
            await m.evaluate(prompt, session=s, keep=body)
        assert m.stats.sessions_alive == 2
        # The cache holds exactly `body`'s common prefix with the prompt: the suffix was removed.
        import llama_cpp.llama_cpp as C

        n_body = len(m.tokenize(body))
        for s in sessions:
            seq = m._seqs[s.id].seq
            assert C.llama_memory_seq_pos_max(m._mem, seq) + 1 <= n_body
        for s in sessions:
            await s.close()
        await m.evaluate("x")  # a round trip through the worker: closes are processed in order
        assert m.stats.sessions_alive == 0
        assert sorted(m._free_seq) == [0, 1]
        with pytest.raises(EngineError, match="closed"):
            await m.evaluate(prompt, session=sessions[0])
    finally:
        await m.aclose()


@pytest.mark.parametrize("kv_unified", [True, False])
async def test_batched_sessions_match_one_by_one(tiny_gguf, kv_unified):
    answers = [ANSWER[:n] for n in (30, 55, 80, 110)]
    seq_m = await load(tiny_gguf, batching=False, flash_attn=False)
    bat_m = await load(tiny_gguf, batching=True, flash_attn=False, kv_unified=kv_unified, max_sessions=4)
    try:
        one_by_one = []
        for a in answers:
            p, b = prompt_for(a)
            one_by_one.append(await seq_m.evaluate(p, session=seq_m.open_session(), keep=b))
        calls0 = bat_m.stats.decode_calls
        sess = [bat_m.open_session() for _ in answers]
        jobs = [(prompt_for(a), s) for a, s in zip(answers, sess, strict=True)]
        batched = await asyncio.gather(*(bat_m.evaluate(p, session=s, keep=b) for (p, b), s in jobs))
        assert bat_m.stats.decode_calls - calls0 < len(answers)  # shared decode calls
        for x, y in zip(one_by_one, batched, strict=True):
            assert int(np.argmax(x.logits)) == int(np.argmax(y.logits))
            np.testing.assert_allclose(x.logits, y.logits, atol=2e-3)
    finally:
        await seq_m.aclose()
        await bat_m.aclose()


async def test_lru_session_is_evicted_and_rebuilt(tiny_gguf):
    m = await load(tiny_gguf, max_sessions=2, flash_attn=False)
    try:
        p, b = prompt_for(ANSWER[:70])
        s1, s2, s3 = (m.open_session() for _ in range(3))
        r1 = await m.evaluate(p, session=s1, keep=b)
        await m.evaluate(p, session=s2, keep=b)
        await m.evaluate(p, session=s3, keep=b)  # no free sequence: s1 (least recently used) goes
        assert m.stats.sessions_evicted == 1
        again = await m.evaluate(p, session=s1, keep=b)
        assert again.n_reused == 0  # rebuilt from scratch
        np.testing.assert_array_equal(again.logits, r1.logits)
    finally:
        await m.aclose()


async def test_per_session_kv_streams_hold_each_session_up_to_its_share(tiny_gguf):
    """kv_unified=False: each session owns n_ctx / max_sessions cells, all resident at once."""
    m = await load(tiny_gguf, n_ctx=4 * 256, max_sessions=4, kv_unified=False, flash_attn=False)
    try:
        assert m.n_ctx_seq == 256
        words = "knead the dough slowly until smooth and elastic then let it rise " * 40
        toks = m.tokenize(words, special=False)[:250]
        sessions = [m.open_session() for _ in range(4)]
        # 4 x 250 tokens = 1,000 of the 1,024 cells: all four stay resident, none is evicted.
        first = await asyncio.gather(*(m.evaluate(toks, session=s) for s in sessions))
        again = await asyncio.gather(*(m.evaluate(toks, session=s) for s in sessions))
        assert m.stats.sessions_evicted == 0 and m.stats.requests_failed == 0
        assert [r.n_reused for r in again] == [249] * 4
        for x, y in zip(first, again, strict=True):
            np.testing.assert_allclose(x.logits, y.logits, atol=2e-3)
        # A prompt longer than one session's stream is refused even though n_ctx has room.
        with pytest.raises(EngineError, match="256 KV cells per session"):
            await m.evaluate(m.tokenize(words, special=False)[:300])
    finally:
        await m.aclose()


async def test_prompt_longer_than_context_is_an_error(tiny_gguf):
    m = await load(tiny_gguf, n_ctx=256)
    try:
        with pytest.raises(EngineError, match="n_ctx"):
            await m.evaluate(prompt_for(ANSWER * 3)[0])
        r = await m.evaluate("still works")
        assert r.n_prompt > 0
        assert m.stats.requests_failed == 1
    finally:
        await m.aclose()


async def test_greedy_decode_when_asked_and_cancelled_generation(tiny_gguf):
    m = await load(tiny_gguf)
    try:
        r = await m.evaluate("Hello there", decode_if=lambda row: True, force=(19193,), max_new=5)
        assert r.generated[0] == 19193 and 1 < len(r.generated) <= 6
        r2 = await m.evaluate("Hello there", decode_if=lambda row: False, force=(19193,), max_new=5)
        assert r2.generated == []
        toks = [t async for t in m.generate("Hello", sampling=SamplingParams(temperature=0), max_tokens=6)]
        toks2 = [t async for t in m.generate("Hello", sampling=SamplingParams(temperature=0), max_tokens=6)]
        assert toks == toks2 and len(toks) <= 6
        gen = m.generate("Hello", sampling=SamplingParams(temperature=0.8, seed=1), max_tokens=500)
        async for _ in gen:
            break
        await gen.aclose()  # stops the worker-side task at the next round
        r3 = await m.evaluate("after cancel")
        assert r3.n_prompt > 0
    finally:
        await m.aclose()


async def test_event_loop_keeps_running_during_inference(tiny_gguf, monkeypatch):
    """Each llama_decode call returns only once the event loop ran while it was under way: a decode on
    the loop's own thread would wait in vain (10 s) and say so. Order, not a wall-clock gap."""
    import llama_cpp.llama_cpp as C

    m = await load(tiny_gguf, n_batch=64)
    real = C.llama_decode
    in_decode, loop_ran = threading.Event(), threading.Event()
    saw_loop: list[bool] = []

    def gated(*a):
        in_decode.set()
        saw_loop.append(loop_ran.wait(10))
        return real(*a)

    async def on_the_loop() -> None:
        assert await until(in_decode.is_set, timeout=30)
        loop_ran.set()

    monkeypatch.setattr(C, "llama_decode", gated)
    try:
        t = asyncio.create_task(on_the_loop())
        await m.evaluate(prompt_for(ANSWER)[0])
        await t
        assert saw_loop and all(saw_loop)
    finally:
        monkeypatch.undo()
        await m.aclose()


async def test_pool_shares_models_and_reports_load_errors(tiny_gguf, tmp_path):
    pool = EnginePool()
    a = await pool.acquire(ModelOptions(str(tiny_gguf), n_ctx=1024, n_threads=2))
    b = await pool.acquire(ModelOptions(str(tiny_gguf), n_ctx=1024, n_threads=2))
    assert a is b
    await pool.release(a)
    assert not a._closed
    await pool.release(b)
    assert a._closed
    with pytest.raises(EngineError, match="not found"):
        await pool.acquire(ModelOptions(str(tmp_path / "missing.gguf")))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(EngineError, match="could not load"):
        await pool.acquire(ModelOptions(str(bad)))
    await pool.aclose()


async def test_more_requests_than_sequences_wait_instead_of_failing(tiny_gguf):
    m = await load(tiny_gguf, max_sessions=2, n_ctx=1024)
    try:
        held = m.open_session()
        await m.evaluate("a session that stays resident", session=held)
        prompts = [f"question number {i}: how are you?" for i in range(7)]
        res = await asyncio.gather(*(m.evaluate(p) for p in prompts))
        assert [r.n_prompt for r in res] == [len(m.tokenize(p)) for p in prompts]
        assert m.stats.requests_failed == 0

        def boom(row):
            raise ValueError("callback failed")

        bad, good = await asyncio.gather(
            m.evaluate("x y z", decode_if=boom, max_new=2), m.evaluate("fine"), return_exceptions=True
        )
        assert isinstance(bad, ValueError) and not isinstance(good, BaseException)
        assert (await m.evaluate("still alive")).n_prompt > 0
    finally:
        await m.aclose()


async def test_prefix_cache_second_turn_evaluates_only_new_tokens(tiny_gguf):
    """A new turn of a checked conversation restores the saved KV of the earlier prompt."""
    turn1 = render_lg3([("user", "How do I bake bread?")], CATS)
    turns2 = [("user", "How do I bake bread?"), ("assistant", ANSWER), ("user", "And rolls, same way?")]
    turn2 = render_lg3(turns2, CATS)
    m = await load(tiny_gguf, flash_attn=False, prefix_cache_mb=4)
    plain = await load(tiny_gguf, flash_attn=False)
    try:
        await m.evaluate(turn1)  # a temporary sequence: its KV is saved when it is released
        r2 = await m.evaluate(turn2)
        t1, t2 = m.tokenize(turn1), m.tokenize(turn2)
        shared = next(i for i, (a, b) in enumerate(zip(t1, t2, strict=False)) if a != b)
        assert shared > 100  # the template and the first user turn
        assert r2.n_reused == shared and r2.n_evaluated == len(t2) - shared
        assert m.stats.prefix_hits == 1 and m.stats.prefix_tokens_restored == shared
        fresh = await plain.evaluate(turn2)
        assert fresh.n_evaluated == len(t2)
        np.testing.assert_allclose(r2.logits, fresh.logits, atol=2e-3)
    finally:
        await m.aclose()
        await plain.aclose()


async def test_prefix_cache_is_bounded_and_evicts_least_recently_used(tiny_gguf):
    m = await load(tiny_gguf, flash_attn=False, prefix_cache_mb=0.12)
    try:
        limit = int(0.12 * 1024 * 1024)
        convs = [render_lg3([("user", f"Question {i}: {ANSWER}")], CATS) for i in range(4)]
        for c in convs:
            await m.evaluate(c)
            assert 0 < m.stats.prefix_bytes <= limit
        assert m.stats.prefix_evictions >= 1 and m.stats.prefix_entries < len(convs)
        # The newest conversation is still cached: its next turn restores it whole.
        again = await m.evaluate(convs[-1] + " More?")
        assert again.n_reused >= len(m.tokenize(convs[-1])) - 1
        # The oldest was evicted: only the template prefix shared with the others comes back.
        old = await m.evaluate(convs[0] + " More?")
        assert old.n_reused < len(m.tokenize(convs[0])) - 8
    finally:
        await m.aclose()

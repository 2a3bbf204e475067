"""The llama_guard guard end to end on real llama.cpp inference, with a hand-wired toy guard model.

The rigged GGUF (scripts/make_tiny_gguf.py --rig " bomb") answers `unsafe\\nS1` when the token
" bomb" occurs anywhere in the prompt and `safe` otherwise, so verdicts, thresholds, category
decoding and the incremental stream path are checked with exact expectations.
"""

from __future__ import annotations

import asyncio

import pytest

from gateway.guards.base import GuardInput, create
from gateway.guards.llama_guard import LlamaGuard
from gateway.guards.moderation import moderate
from gateway.types import Message

pytest.importorskip("llama_cpp")
pytest_plugins = ["llama_fixtures"]

BENIGN = "Mix flour, water, salt and yeast. Knead the dough for ten minutes and let it rise. " * 3
BAD = "First get a pressure cooker, then the bomb goes in the middle of the crowd. "


@pytest.fixture
async def pool():
    from gateway.engine import EnginePool

    p = EnginePool()
    yield p
    await p.aclose()


async def guard(pool, path, **opts) -> LlamaGuard:
    opts.setdefault("n_threads", 2)
    opts.setdefault("n_ctx", 4096)
    g = create("llama_guard", model=str(path), pool=pool, **opts)
    assert isinstance(g, LlamaGuard)
    await g.start()
    return g


def user(text: str) -> list[Message]:
    return [Message.of("system", "be nice"), Message.of("user", text)]


async def test_input_and_output_verdicts_from_first_token_logits(pool, rig_gguf):
    g = await guard(pool, rig_gguf)
    ok = await g.check(GuardInput(stage="input", messages=user("How do I bake bread?")))
    assert not ok.flagged and ok.score < 1e-6 and ok.categories == [] and ok.error is None
    assert ok.tokens_evaluated > 100 and ok.details["mass"] > 0.99  # P(safe)+P(unsafe) at that position
    assert "output" not in ok.details  # nothing decoded when safe
    bad = await g.check(GuardInput(stage="input", messages=user("How do I build a bomb?")))
    assert bad.flagged and bad.score > 0.999 and bad.categories == ["S1"]
    assert bad.details["output"].startswith("unsafe\nS1") and bad.reason == "unsafe: S1"
    # Output stage judges the answer (the last Agent turn) with the prompt as context.
    out = await g.check(GuardInput(stage="output", messages=user("Tell me a story"), text=BAD))
    assert out.flagged and out.categories == ["S1"]
    assert g.stats.checks == 3 and g.stats.flagged == 2
    await g.aclose()


async def test_threshold_and_excluded_categories(pool, rig_gguf):
    always = await guard(pool, rig_gguf, threshold=0.0)
    v = await always.check(GuardInput(stage="input", messages=user("hello")))
    assert v.flagged and v.categories == ["S1"]  # categories decoded after forcing "unsafe"
    # The model names S1, which this policy does not enable: not flagged (llama-stack's rule).
    narrow = await guard(pool, rig_gguf, categories=["S2", "S10"])
    v = await narrow.check(GuardInput(stage="input", messages=user("a bomb")))
    assert not v.flagged and v.categories == [] and "excluded" in v.reason
    assert "S1:" not in narrow.prompter.render([("user", "x")])
    nodecode = await guard(pool, rig_gguf, decode_categories=False)
    v = await nodecode.check(GuardInput(stage="input", messages=user("a bomb")))
    assert v.flagged and v.categories == [] and "output" not in v.details


async def test_stream_is_incremental_and_flags_when_the_trigger_arrives(pool, rig_gguf):
    g = await guard(pool, rig_gguf)
    msgs = user("Tell me a story")
    sc = g.open_stream(msgs, "req-1")
    text = ""
    verdicts = []
    pieces = [BENIGN[i : i + 37] for i in range(0, len(BENIGN), 37)] + [BAD]
    for piece in pieces:
        start = len(text)
        text += piece
        verdicts.append(await sc.check(text, start, final=False))
    assert [v.flagged for v in verdicts] == [False] * (len(pieces) - 1) + [True]
    assert verdicts[-1].categories == ["S1"]
    first, later = verdicts[0], verdicts[1:-1]
    assert first.details["reused"] == 0
    suffix = first.details["prompt_tokens"] - len(g.model.tokenize(g.prompter.split(
        [("user", "Tell me a story"), ("assistant", "x")])[0]))
    for v in later:  # each check evaluates ~the new text + the fixed suffix, never the whole prompt
        assert v.details["reused"] > 140
        assert v.tokens_evaluated <= suffix + 20
    # One-shot full check of the same text gives the same verdict and score.
    full = await g.check(GuardInput(stage="output", messages=msgs, text=text))
    assert full.flagged and full.score == pytest.approx(verdicts[-1].score, abs=1e-3)
    assert g.stats.sessions_alive == 1 and g.model.stats.sessions_alive == 1
    await sc.close()
    await sc.close()  # idempotent
    await g.model.evaluate("sync")  # the worker has processed the close
    assert g.stats.sessions_alive == 0 and g.model.stats.sessions_alive == 0
    with pytest.raises(RuntimeError, match="after close"):
        await sc.check(text, 0, True)


async def test_concurrent_streams_batched_match_one_by_one(pool, rig_gguf):
    texts = [BENIGN[:60], BENIGN[:90] + BAD, BENIGN, BAD + BENIGN[:30], BENIGN[:45]]
    g = await guard(pool, rig_gguf, max_sessions=8)
    solo = await guard(pool, rig_gguf, batching=False, max_sessions=8, n_ctx=4097)  # a separate model

    async def run(gd: LlamaGuard, parallel: bool) -> list[tuple[bool, float, list[str]]]:
        streams = [gd.open_stream(user("story"), f"r{i}") for i in range(len(texts))]

        async def drive(sc, t):
            out = None
            for cut in range(20, len(t) + 20, 40):
                out = await sc.check(t[:cut], 0, cut >= len(t))
            await sc.close()
            return (out.flagged, out.score, out.categories)

        if parallel:
            return list(await asyncio.gather(*(drive(s, t) for s, t in zip(streams, texts, strict=True))))
        return [await drive(s, t) for s, t in zip(streams, texts, strict=True)]

    calls0 = g.model.stats.decode_calls
    batched = await run(g, True)
    batched_calls = g.model.stats.decode_calls - calls0
    one_by_one = await run(solo, False)
    assert [b[0] for b in batched] == [o[0] for o in one_by_one] == [False, True, False, True, False]
    assert [b[2] for b in batched] == [o[2] for o in one_by_one]
    for b, o in zip(batched, one_by_one, strict=True):
        assert b[1] == pytest.approx(o[1], abs=1e-3)
    assert batched_calls < solo.model.stats.decode_calls  # checks shared decode calls


async def test_moderation_served_by_the_guard(pool, rig_gguf):
    g = await guard(pool, rig_gguf)

    class Req:  # what the dialects decode: one conversation per input
        def __init__(self) -> None:
            self.inputs = [[Message.of("user", "nice weather")], [Message.of("user", "make a bomb")]]

    res = await moderate(g, Req())
    assert res[0] == {"flagged": False, "categories": [], "scores": {}}
    assert res[1]["flagged"] and res[1]["categories"] == ["S1"] and res[1]["scores"]["S1"] > 0.99
    res = await moderate(g, ["fine", [Message.of("user", "q"), Message.of("assistant", "a bomb")]])
    assert [r["flagged"] for r in res] == [False, True]


async def test_errors_surface_as_exceptions(pool, rig_gguf, tmp_path):
    from gateway.models import ModelError

    g = create("llama_guard", model=str(tmp_path / "nope.gguf"), pool=pool)
    with pytest.raises(ModelError):
        await g.start()
    g = await guard(pool, rig_gguf, n_ctx=256)
    with pytest.raises(Exception, match="n_ctx"):
        await g.check(GuardInput(stage="output", messages=user("x"), text=BENIGN * 4))
    assert g.stats.errors == 1
    slow = await guard(pool, rig_gguf, timeout_ms=0.01)
    with pytest.raises(TimeoutError):
        await slow.check(GuardInput(stage="input", messages=user("hello")))
    # the engine survives a cancelled check
    ok = await guard(pool, rig_gguf)
    assert not (await ok.check(GuardInput(stage="input", messages=user("hello")))).flagged


# --------------------------------------------------------------------------- in the policy chain


def _policy(path, on_error: str = "block", timeout: str = "5000", every: int = 8):
    from gateway.policy.schema import parse_policy_text

    return parse_policy_text(f"""
name: lg
stream:
  check_every_tokens: {every}
  max_unchecked_tokens: 0
  steps:
    - guard: llama_guard
      model: {path}
      n_threads: 2
      n_ctx: 4096
      action: block
      on_error: {on_error}
      timeout_ms: {timeout}
""")


async def _run(pol, deltas):
    from policy_fakes import FakeUpstream, collect

    from gateway.policy.chain import PolicyRun
    from gateway.types import Exchange

    await pol.start()
    up = FakeUpstream(deltas)
    run = PolicyRun(pol, request_id="r1", route="/v1/chat/completions", dialect="openai", model="m")
    ex = Exchange(model="m", messages=[Message.of("user", "tell me a story")], stream=True)
    events = await collect(run.guard_stream(ex, up.events()))
    return events, run.finish(), up


async def test_policy_stream_step_blocks_before_the_trigger_is_released(rig_gguf):
    from policy_fakes import text_of, tokens_of

    from gateway.types import Finish

    pol = _policy(rig_gguf)
    answer = BENIGN + BAD + BENIGN
    events, rec, up = await _run(pol, tokens_of(answer))
    out = text_of(events)
    assert "bomb" not in out and answer.startswith(out) and len(out) > 20
    assert Finish("content_filter", 0) in events
    assert rec["action"] == "block" and rec["leaked_tokens"] == 0
    assert up.closed
    g = pol.stream.steps[0].guard
    await g.model.evaluate("sync")
    assert g.stats.sessions_alive == 0 and g.model.stats.sessions_alive == 0  # closed on block
    events, rec, _ = await _run(pol, tokens_of(BENIGN))
    assert text_of(events) == BENIGN and rec["action"] == "allow"
    await pol.aclose()


@pytest.mark.parametrize("on_error, blocked", [("block", True), ("allow", False)])
async def test_policy_guard_timeout_follows_on_error(rig_gguf, on_error, blocked):
    from policy_fakes import text_of, tokens_of

    pol = _policy(rig_gguf, on_error=on_error, timeout="0.01")
    events, rec, _ = await _run(pol, tokens_of(BENIGN))
    assert rec["steps"][0]["outcome"] == ("block" if blocked else None)
    assert rec["steps"][0]["errors"] >= 1
    assert (text_of(events) == BENIGN) is not blocked
    assert rec["action"] == ("block" if blocked else "allow")
    await pol.aclose()


async def test_policy_missing_model_follows_on_error(tmp_path):
    from policy_fakes import text_of, tokens_of

    pol = _policy(tmp_path / "absent.gguf", on_error="allow")
    events, _, _ = await _run(pol, tokens_of("hello there"))
    assert text_of(events) == "hello there"
    assert pol.stream.steps[0].unavailable and "absent.gguf" in pol.stream.steps[0].unavailable
    await pol.aclose()


async def test_next_turn_evaluates_only_its_new_tokens(pool, rig_gguf):
    """Prefix cache across requests. LG3's prompt names the checked role in its first lines, so an
    input check reuses the last input check of the conversation, and the first output check of a
    turn reuses the last output check (template, earlier turns and the answer already checked)."""
    g = await guard(pool, rig_gguf)
    _, post = g.prompter.split([("user", "q"), ("assistant", "a")])
    suffix = len(g.model.tokenize(post))  # the output prompt's suffix; the input one is as long
    msgs1 = user("How do I bake bread?")
    v1 = await g.check(GuardInput(stage="input", messages=msgs1))
    assert v1.details["reused"] == 0 and v1.tokens_evaluated == v1.details["prompt_tokens"]
    sc = g.open_stream(msgs1, "turn1")
    o1 = await sc.check(BENIGN, 0, True)
    await sc.close()
    assert o1.details["reused"] == 0
    msgs2 = [*msgs1, Message.of("assistant", BENIGN), Message.of("user", "And rolls, the same way?")]
    v2 = await g.check(GuardInput(stage="input", messages=msgs2))
    # Template, system and first user turn come back from turn 1's input check.
    assert v2.details["reused"] >= v1.details["prompt_tokens"] - suffix - 3
    assert v2.tokens_evaluated == v2.details["prompt_tokens"] - v2.details["reused"]
    assert not v2.flagged
    sc = g.open_stream(msgs2, "turn2")
    o2 = await sc.check("Yes: shape small rolls and bake them for less time.", 0, True)
    await sc.close()
    # The first output check of turn 2 evaluates only the new user turn, the new answer and the suffix.
    assert o2.details["reused"] >= o1.details["prompt_tokens"] - suffix - 3
    assert o2.tokens_evaluated == o2.details["prompt_tokens"] - o2.details["reused"] < 90
    assert not o2.flagged
    # Verdicts stay exact on restored state: the rigged trigger in the new turn is still caught.
    msgs3 = [*msgs1, Message.of("assistant", BENIGN), Message.of("user", "And then a bomb?")]
    v3 = await g.check(GuardInput(stage="input", messages=msgs3))
    assert v3.flagged and v3.categories == ["S1"] and v3.details["reused"] > 100
    assert g.model.stats.prefix_hits >= 3

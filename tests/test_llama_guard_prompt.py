"""Llama Guard prompts: our rendering equals Meta's reference templates token for token."""

from __future__ import annotations

import pytest

from gateway.engine.chat_template import TemplateError
from gateway.guards.base import GuardConfigError
from gateway.guards.llama_guard import (
    LG3_1B_CODES,
    LG3_1B_TEMPLATE,
    LG3_8B_CODES,
    LG3_8B_TEMPLATE,
    LG3_CATEGORIES,
    LlamaGuard,
    conversation_turns,
    parse_output,
    render_lg3,
    render_with_template,
)
from gateway.types import Message, ToolCall

CATS_1B = {c: LG3_CATEGORIES[c] for c in LG3_1B_CODES}
CATS_8B = {c: LG3_CATEGORIES[c] for c in LG3_8B_CODES}

CONVERSATIONS = [
    [("user", "How do I bake bread?")],
    [("user", "  How do I bake bread?\n"), ("assistant", " Mix flour, water and salt.\n\n")],
    [("user", "hi"), ("assistant", "hello!"), ("user", "Tell me how to make a b0mb 💣 — ok?")],
    [("user", "code?"), ("assistant", "```python\nimport os\nos.system('rm -rf /')\n```\nDone!!")],
    [("user", "Quote: '{{ not jinja }}' {% raw %}"), ("assistant", "")],
]


def test_lg3_1b_reference_template_equals_our_text():
    for turns in CONVERSATIONS:
        assert render_with_template(LG3_1B_TEMPLATE, turns, CATS_1B) == render_lg3(turns, CATS_1B, "lg3-1b")


def test_lg3_8b_reference_template_equals_our_text():
    for turns in CONVERSATIONS:
        assert render_with_template(LG3_8B_TEMPLATE, turns, CATS_8B) == render_lg3(turns, CATS_8B, "lg3-8b")


def test_1b_template_category_subset_and_custom_text_keep_the_original_codes():
    cats = {**CATS_1B, "S15": "Crypto scams."}
    excluded = [c for c in cats if c not in ("S1", "S10", "S15")]
    text = render_with_template(LG3_1B_TEMPLATE, CONVERSATIONS[0], cats, excluded)
    shown = {c: cats[c] for c in ("S1", "S10", "S15")}
    assert text == render_lg3(CONVERSATIONS[0], shown, "lg3-1b")
    assert "S1: Violent Crimes.\nS10: Hate.\nS15: Crypto scams.\n<END UNSAFE" in text  # never renumbered


def test_reference_details():
    text = render_lg3(CONVERSATIONS[1], CATS_1B, "lg3-1b")
    assert "according our safety policy" in text  # the trained wording, no "to"
    assert "ONLY THE LAST Agent message" in text and "in 'Agent' messages" in text
    assert "\n - First line must read 'safe' or 'unsafe'.\n - If unsafe," in text
    assert "User: How do I bake bread?\n\nAgent: Mix flour, water and salt.\n\n<END CONVERSATION>" in text
    assert "ONLY THE LAST User message" in render_lg3(CONVERSATIONS[0], CATS_1B)
    assert render_lg3(CONVERSATIONS[0], CATS_8B, "lg3-8b").startswith(" <|begin_of_text|>")


def test_roles_must_alternate_in_both_renderings():
    bad = [("user", "a"), ("user", "b")]
    with pytest.raises(ValueError, match="alternate"):
        render_lg3(bad, CATS_1B)
    with pytest.raises(TemplateError, match="alternate"):
        render_with_template(LG3_1B_TEMPLATE, bad, CATS_1B)


def test_conversation_turns_role_handling():
    msgs = [
        Message.of("system", "You are nice."),
        Message.of("assistant", "(greeting)"),
        Message.of("user", "first"),
        Message.of("assistant", "answer one"),
        Message.of("user", "second"),
        Message(role="assistant", tool_calls=[ToolCall("c1", "search", '{"q": "x"}')]),
        Message.of("tool", "result text"),
        Message.of("user", "third"),
    ]
    # input stage: judged up to the last user turn; tool result + user merged as the user side
    t = conversation_turns(msgs)
    assert t[0] == ("user", "first") and t[-1] == ("user", "result text\n\nthird")
    assert t[-2] == ("assistant", 'search({"q": "x"})')
    assert [r for r, _ in t] == ["user", "assistant"] * 2 + ["user"]
    # output stage: the answer is the last Agent turn; history limits the context
    t = conversation_turns(msgs, answer="the answer", history=0)
    assert t == [("user", "result text\n\nthird"), ("assistant", "the answer")]
    t = conversation_turns(msgs[:3], answer="x", history=1)
    assert t == [("user", "first"), ("assistant", "x")]
    # an assistant prefill is continued by the answer; no user turn at all gets an empty one
    prefill = [Message.of("user", "q"), Message.of("assistant", "Sure,")]
    assert conversation_turns(prefill, answer=" yes")[-1] == ("assistant", "Sure, yes")
    assert conversation_turns([], answer="x") == [("user", ""), ("assistant", "x")]
    assert conversation_turns([Message.of("system", "s")]) == []


@pytest.mark.parametrize(
    "text, expected",
    [
        ("safe", (False, [])),
        ("\n\nsafe<|eot_id|>", (False, [])),
        ("unsafe\nS1", (True, ["S1"])),
        ("unsafe\nS1,S10", (True, ["S1", "S10"])),
        ("unsafe \nS2, S3 ", (True, ["S2", "S3"])),
        ("\n\nunsafe\nS14", (True, ["S14"])),
        ("unsafe", (True, [])),
        ("I cannot", (None, [])),
        ("", (None, [])),
    ],
)
def test_parse_output(text, expected):
    assert parse_output(text) == expected


def test_option_validation():
    with pytest.raises(GuardConfigError, match="unknown options"):
        LlamaGuard(model="x.gguf", thresold=0.3)
    with pytest.raises(GuardConfigError, match="S<n>"):
        LlamaGuard(model="x.gguf", categories=["violence"])
    with pytest.raises(GuardConfigError, match="threshold"):
        LlamaGuard(model="x.gguf", threshold=2)
    with pytest.raises(GuardConfigError, match="model"):
        LlamaGuard()
    with pytest.raises(GuardConfigError, match="base_url"):
        LlamaGuard(remote={"api": "openai_chat"})
    g = LlamaGuard(model="x.gguf", categories=["S1", "S99"])
    with pytest.raises(GuardConfigError, match="S99"):
        g._make_prompter(None, "lg3-1b", 16)
    g = LlamaGuard(model="x.gguf", categories=["S1", "S14"])  # S14: 8B-only, rendered with its text
    assert g._make_prompter(None, "lg3-1b", 16).categories == {
        "S1": "Violent Crimes.",
        "S14": "Code Interpreter Abuse.",
    }
    g = LlamaGuard(model="x.gguf", categories=["S1"])
    assert g._make_prompter(None, "lg3-1b", 16).excluded == [c for c in LG3_1B_CODES if c != "S1"]


# --------------------------------------------------------------------------- token level (llama.cpp)


async def test_guard_prompt_tokens_equal_reference_template_tokens(tiny_gguf, rig8b_gguf):
    pytest.importorskip("llama_cpp")
    from gateway.engine import EnginePool

    pool = EnginePool()
    try:
        embedded = LlamaGuard(model=str(tiny_gguf), n_threads=2, pool=pool)
        builtin = LlamaGuard(model=str(tiny_gguf), n_threads=2, pool=pool, template="builtin")
        await embedded.start()
        await builtin.start()
        assert embedded.prompter.template == LG3_1B_TEMPLATE  # read from the GGUF
        assert builtin.prompter.template is None
        m = embedded.model
        for turns in CONVERSATIONS:
            ref = m.tokenize(render_with_template(LG3_1B_TEMPLATE, turns, CATS_1B) + "\n\n")
            assert m.tokenize(embedded.prompter.render(turns)) == ref
            assert m.tokenize(builtin.prompter.render(turns)) == ref
            assert ref[0] == 128000
            assert ref[-2:] == [128007, 271]  # <|end_header_id|> then "\n\n"
        # Stream split: prefix + answer + suffix is the full prompt, whatever whitespace the answer has.
        for answer in ("Mix flour.", "  Mix flour.\n\n", "a", "```py\nx=1\n```\n"):
            base = [("user", "How do I bake bread?")]
            pre, post = embedded.prompter.split([*base, ("assistant", "?")])
            assert pre + answer.strip() + post == embedded.prompter.render([*base, ("assistant", answer)])
        assert m.tokenize("safe", special=False) == [19193] and m.tokenize("unsafe", special=False) == [39257]
        assert embedded._ids == (19193, 39257)

        # The LG3-8B template has its categories built in: a subset is rendered with our own text.
        full = LlamaGuard(model=str(rig8b_gguf), n_threads=2, pool=pool)
        subset = LlamaGuard(model=str(rig8b_gguf), n_threads=2, pool=pool, categories=["S9", "S14"])
        await full.start()
        await subset.start()
        assert full.prompter.template == LG3_8B_TEMPLATE and subset.prompter.template is None
        turns = CONVERSATIONS[1]
        m8 = full.model
        assert m8.tokenize(full.prompter.render(turns)) == m8.tokenize(
            render_with_template(LG3_8B_TEMPLATE, turns, CATS_8B) + "\n\n"
        )
        text = subset.prompter.render(turns)
        assert "S9: Indiscriminate Weapons.\nS14: Code Interpreter Abuse.\n<END UNSAFE" in text
        assert "S1:" not in text and text.startswith(" <|begin_of_text|>")
        for g in (embedded, builtin, full, subset):
            await g.aclose()
    finally:
        await pool.aclose()


pytest_plugins = ["llama_fixtures"]

"""Issue 35: the Llama Guard 4 prompt with image placeholders, compared with Meta's reference rendering.

The reference is what `AutoProcessor.from_pretrained("meta-llama/Llama-Guard-4-12B").apply_chat_template`
printed in the Hugging Face Llama Guard 4 notebook (huggingface/huggingface-llama-recipes,
llama_guard_4.ipynb), for a text-only and a text + image conversation. The weights and their template are
gated, and no Llama 4 vocabulary ships with llama-cpp-python 0.3.36's sdist (its vocab-only GGUFs are
aquila, baichuan, bert-bge, command-r, deepseek-coder/llm, falcon, gemma-4, gpt-2, gpt-neox, llama-bpe,
llama-spm, mpt, nomic-bert-moe, phi-3, qwen2, qwen35, refact, starcoder), so the comparison is as text:
character for character, which is token for token under any tokenizer.
"""

from __future__ import annotations

import pytest

from gateway.guards.llama_guard import render_lg4 as completions_prompt
from gateway.guards.llama_guard.vision import chat_messages, render_lg4, vision_turns
from gateway.types import Message, Part

CATS = (
    "S1: Violent Crimes.\nS2: Non-Violent Crimes.\nS3: Sex Crimes.\nS4: Child Exploitation.\nS5: Defamation.\n"
    "S6: Specialized Advice.\nS7: Privacy.\nS8: Intellectual Property.\nS9: Indiscriminate Weapons.\nS10: Hate.\n"
    "S11: Self-Harm.\nS12: Sexual Content.\nS13: Elections.\n"
)


def reference(role: str, conversation: str, cats: str) -> str:
    """The notebook's printed renderings, line by line (print's own trailing newline left out)."""
    lines = [
        "<|begin_of_text|><|header_start|>user<|header_end|>",
        "",
        f"Task: Check if there is unsafe content in '{role}' messages in conversations according to our safety "
        "policy with the below categories.",
        "",
        "<BEGIN UNSAFE CONTENT CATEGORIES>",
        *cats.splitlines(),
        "<END UNSAFE CONTENT CATEGORIES>",
        "",
        "<BEGIN CONVERSATION>",
        *conversation.splitlines(),
        "",
        "<END CONVERSATION>",
        "",
        f"Provide your safety assessment for ONLY THE LAST {role} message in the above conversation:",
        " - First line must read 'safe' or 'unsafe'.",
        " - If unsafe, a second line must include a comma-separated list of violated categories. "
        "<|eot|><|header_start|>assistant<|header_end|>",
    ]
    return "\n".join(lines)


def test_text_only_matches_reference() -> None:
    """Notebook cell 1: [{"role": "user", "content": [{"type": "text", "text": "How to make a bomb?"}]}];
    S14 is listed (text only)."""
    want = reference("User", "User: How to make a bomb?\\n\\n\n", CATS + "S14: Code Interpreter Abuse.\n")
    assert render_lg4([("user", "How to make a bomb?", [])]) == want


def test_text_and_image_matches_reference() -> None:
    """Notebook cell 2: text "How to use this?" then an image part: the placeholder goes before the turn's
    text, and S14 (text only) is left out of the categories."""
    ex = [Message("user", [Part("text", "How to use this?"), Part("image", image_url="https://x/fruit_knife.png")])]
    want = reference("User", "User: <|image|>How to use this?\\n\\n\n", CATS)
    turns = vision_turns(ex)
    assert turns == [("user", "How to use this?", ["https://x/fruit_knife.png"])]
    assert render_lg4(turns) == want


@pytest.mark.parametrize(
    ("messages", "conversation"),
    [
        # inferred from the template's per-turn rule (the notebook prints one-turn conversations only)
        (
            [
                Message(
                    "user",
                    [Part("text", "Is this safe to eat?"), Part("image", image_url="a"), Part("image", image_url="b")],
                )
            ],
            "User: <|image|><|image|>Is this safe to eat?\\n\\n\n",
        ),
        (
            [
                Message("user", [Part("image", image_url="a"), Part("text", "  What is it? ")]),
                Message.of("assistant", "A knife."),
                Message("user", [Part("text", "And this?"), Part("image", image_url="b")]),
            ],
            "User: <|image|>What is it?\\n\\n\n\nAgent: A knife.\\n\\n\n\nUser: <|image|>And this?\\n\\n\n",
        ),
    ],
)
def test_placeholders_one_per_image_in_its_turn(messages: list[Message], conversation: str) -> None:
    assert render_lg4(vision_turns(messages)) == reference("User", conversation, CATS)


def test_chat_messages_carry_every_image_with_its_turn() -> None:
    msgs = [
        Message.of("system", "be nice"),
        Message("user", [Part("text", "x"), Part("image", image_url="data:a")]),
        Message.of("assistant", "ok"),
        Message("tool", [Part("text", "t")], tool_call_id="c"),
        Message("user", [Part("image", image_url="data:b")]),
    ]
    assert chat_messages(vision_turns(msgs)) == [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": "data:a"}}, {"type": "text", "text": "x"}],
        },
        {"role": "assistant", "content": "ok"},
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": "data:b"}}, {"type": "text", "text": "t"}],
        },
    ]


def test_completions_prompt_is_the_reference_text_plus_the_blank_line() -> None:
    """The text path's LG4 prompt for a raw completions server (`remote.api: openai_completions`) is the
    same reference text, plus the blank line the model writes before its verdict."""
    from gateway.guards.llama_guard import LG3_CATEGORIES

    want = reference("User", "User: How to make a bomb?\\n\\n\n", CATS + "S14: Code Interpreter Abuse.\n")
    assert completions_prompt([("user", "How to make a bomb?")], LG3_CATEGORIES) == want + "\n\n"

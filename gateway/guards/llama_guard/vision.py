"""Llama Guard 4 with images: the conversation and its image parts through `llama_guard`'s remote backend.

Used when a policy says `content: {images: guard}` (policy/content.py): the `llama_guard` input step
hands a request with images here instead of its text path. The backend must take images:

- `api: llama_moderations`: the Llama API's `/moderations` (Llama Guard 4 there classifies text and
  images); the messages go in the Llama API shape, images as `image_url` content items;
- `api: openai_chat`: an OpenAI-compatible server running Llama Guard 4 with its vision projector
  (llama.cpp's `llama-server --mmproj`, vLLM); the server applies the model's own chat template, which
  puts an `<|image|>` placeholder (expanded to `<|image_start|>…<|patch|>…<|image_end|>`) in the turn
  that carries the image.

`openai_completions` (a raw prompt) cannot carry image bytes, and the in-process llama.cpp backend
runs Llama Guard 3 (text only): neither is accepted for `images: guard`. The verdict says how many
images it judged (`details.images_checked`); a request under `images: guard` whose images no step
judged is blocked by the policy, never relayed.

`render_lg4` is Meta's Llama Guard 4 prompt with image placeholders, as the model's chat template
renders it (HF `AutoProcessor.apply_chat_template` for meta-llama/Llama-Guard-4-12B); tests compare it
with that reference rendering (tests/test_lg4_prompt.py, docs/configuration.md).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from gateway.guards.llama_guard.prompt import LG3_CATEGORIES, Turn, message_side
from gateway.types import Message, Verdict

VISION_APIS = ("llama_moderations", "openai_chat")
IMAGE_TOKEN = "<|image|>"
VTurn = tuple[str, str, list[str]]  # ("user" | "assistant", text, image URLs in the turn)

# Llama Guard 4's default categories: S1..S14 for text; the template leaves S14 (Code Interpreter
# Abuse, "text only" on the model card) out when the conversation has an image.
LG4_CATEGORIES: dict[str, str] = dict(LG3_CATEGORIES)  # the same labels, never renumbered
TEXT_ONLY_CODES = ("S14",)


def sees_images(guard: Any) -> bool:
    """Can this `llama_guard` step judge images (a remote backend whose api takes them)?"""
    opts = getattr(guard, "remote_opts", None)
    return opts is not None and opts.api in VISION_APIS and getattr(guard, "backend", "auto") != "local"


def has_images(messages: Sequence[Message]) -> bool:
    return any(p.type == "image" for m in messages for p in m.parts)


def vision_turns(messages: Sequence[Message], history: int | None = None) -> list[VTurn]:
    """Alternating user/assistant turns ending with the last user turn, each with its images.

    As `llama_guard.conversation_turns` for the input stage (system/developer left out, tool results on
    the user side, same-side messages merged, `history` earlier exchanges kept), plus the image URLs of
    each turn in order."""
    turns: list[tuple[str, str, list[str]]] = []
    for m in messages:
        side = message_side(m)
        if side is None:
            continue
        role, text = side
        images = [p.image_url or "" for p in m.parts if p.type == "image"]
        if not text.strip() and not images:
            continue
        if turns and turns[-1][0] == role:
            r, t, imgs = turns[-1]
            joined = "\n\n".join(x for x in (t.rstrip(), text.strip()) if x)
            turns[-1] = (r, joined, imgs + images)
        else:
            turns.append((role, text, images))
    while turns and turns[0][0] != "user":
        turns.pop(0)
    while turns and turns[-1][0] != "user":
        turns.pop()
    if history is not None:
        turns = turns[-(2 * history + 1) :]
    return turns


def render_lg4(
    turns: Sequence[VTurn], categories: Mapping[str, str] | None = None, excluded: Sequence[str] = ()
) -> str:
    """Llama Guard 4's prompt as its chat template renders it, one `<|image|>` per image in the turn
    that carries it (before the turn's text). Default categories: S1..S14, S14 left out when an image
    is present. Quirks of the reference kept on purpose: "according to our" (LG3: "according our"),
    one newline after `<BEGIN CONVERSATION>`, a literal `\\n\\n` after each turn's text, a space
    before `<|eot|>`, nothing after the assistant header."""
    if not turns:
        raise ValueError("Llama Guard needs at least one user turn")
    any_image = any(imgs for _, _, imgs in turns)
    if categories is None:
        categories = {c: t for c, t in LG4_CATEGORIES.items() if not (any_image and c in TEXT_ONLY_CODES)}
    role = "Agent" if turns[-1][0] == "assistant" else "User"
    out = [
        "<|begin_of_text|><|header_start|>user<|header_end|>\n\n",
        f"Task: Check if there is unsafe content in '{role}' messages in conversations according to our "
        "safety policy with the below categories.\n\n",
        "<BEGIN UNSAFE CONTENT CATEGORIES>\n",
        *(f"{c}: {t}\n" for c, t in categories.items() if c not in excluded),
        "<END UNSAFE CONTENT CATEGORIES>\n\n",
        "<BEGIN CONVERSATION>\n",
    ]
    for i, (r, text, imgs) in enumerate(turns):
        if (r == "user") != (i % 2 == 0):
            raise ValueError("Conversation roles must alternate user/assistant/user/assistant/...")
        who = "User" if r == "user" else "Agent"
        out.append(f"{who}: {IMAGE_TOKEN * len(imgs)}{text.strip()}\\n\\n\n\n")
    out += [
        "<END CONVERSATION>\n\n",
        f"Provide your safety assessment for ONLY THE LAST {role} message in the above conversation:\n",
        " - First line must read 'safe' or 'unsafe'.\n",
        " - If unsafe, a second line must include a comma-separated list of violated categories. ",
        "<|eot|><|header_start|>assistant<|header_end|>",
    ]
    return "".join(out)


def chat_messages(turns: Sequence[VTurn]) -> list[dict[str, Any]]:
    """The turns as chat messages with image content parts (the shape both the Llama API's
    moderations and OpenAI-compatible chat servers read): images first, as the template puts them."""
    out: list[dict[str, Any]] = []
    for role, text, imgs in turns:
        if role == "assistant":
            out.append({"role": "assistant", "content": text})
            continue
        content: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": u}} for u in imgs]
        if text.strip():
            content.append({"type": "text", "text": text})
        out.append({"role": "user", "content": content})
    return out


def _score(tops: Sequence[Mapping[str, float]]) -> float | None:
    """P(unsafe) renormalised over safe/unsafe at the first position offering either (as the text path)."""
    for top in tops:
        ls = {k.strip(): v for k, v in top.items()}
        if "safe" in ls or "unsafe" in ls:
            d = ls.get("unsafe", -1e9) - ls.get("safe", -1e9)
            return 1.0 / (1.0 + math.exp(-d)) if d >= 0 else math.exp(d) / (1.0 + math.exp(d))
    return None


async def judge(
    guard: Any,
    messages: Sequence[Message],
    parse_output: Callable[[str], tuple[bool | None, list[str]]],
    t0: float | None = None,
) -> Verdict:
    """One check of the conversation with its images by `guard`'s remote backend (a started
    `llama_guard` in remote mode); `parse_output` is the text path's answer parser, so the verdict names
    the categories the same way (passed in: this module imports nothing of `llama_guard`)."""
    t0 = time.perf_counter() if t0 is None else t0
    backend, prompter = guard.remote, guard.prompter
    if backend is None or prompter is None or not sees_images(guard):
        raise RuntimeError(
            "llama_guard: images need a remote backend that takes them (llama_moderations or "
            "openai_chat serving Llama Guard 4 with its vision projector)"
        )
    turns = vision_turns(messages, guard.history)
    n = sum(len(imgs) for _, _, imgs in turns)
    if not turns:
        return guard.verdict(t0, reason="nothing to check")
    opts = backend.opts
    msgs = chat_messages(turns)
    score: float | None = None
    if opts.api == "llama_moderations":
        data = await backend._post("/moderations", {"model": opts.model, "messages": msgs})
        results = data.get("results") or []
        flagged = any(bool(r.get("flagged")) for r in results)
        codes = list(dict.fromkeys(c for r in results for c in r.get("flagged_categories") or []))
        raw = str(results)
    else:
        body: dict[str, Any] = {
            "model": opts.model,
            "messages": msgs,
            "max_tokens": 20,
            "temperature": 0,
            "logprobs": True,
            "top_logprobs": 5,
        }
        if prompter.excluded or guard.custom:
            body["chat_template_kwargs"] = {
                "categories": dict(prompter.all_categories),
                "excluded_category_keys": list(prompter.excluded),
            }
        data = await backend._post("/chat/completions", body)
        choice = (data.get("choices") or [{}])[0]
        raw = (choice.get("message") or {}).get("content") or ""
        lp = (choice.get("logprobs") or {}).get("content") or []
        score = _score(
            [{e.get("token", ""): e.get("logprob", -1e9) for e in item.get("top_logprobs") or []} for item in lp]
        )
        parsed, codes = parse_output(raw)
        if parsed is None:
            raise RuntimeError(f"llama_guard remote: unparseable answer {raw[:80]!r}")
        flagged = parsed
    if score is not None:
        flagged = score >= guard.threshold
    v: Verdict = guard._finish(
        t0, flagged, score if score is not None else float(flagged), codes, 0, raw=raw, images_checked=n
    )
    guard.stats.observe(v)
    return v


def completion_prompt(turns: Sequence[Turn], categories: Mapping[str, str]) -> str:
    """Llama Guard 4's text prompt for a raw completions endpoint: the model's own template text
    (`render_lg4`, compared with Meta's reference rendering in tests/test_lg4_prompt.py; not LG3's
    text: "according to our", one newline after `<BEGIN CONVERSATION>`, ...), plus the blank line the
    model writes before its verdict."""
    return render_lg4([(r, t, []) for r, t in turns], categories) + "\n\n"

"""`/v1/moderations` and `/llama/v1/moderations` served by a local guard (e.g. `llama_guard`).

Each input (one conversation) is judged as the input stage would judge it, or, when the
conversation ends with an assistant turn, as the output stage judges that answer. Results come
back in the neutral moderation shape the dialects render: `{flagged, categories, scores}` with
Llama Guard category codes; `scores` carries the guard's P(unsafe) for each flagged code.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from gateway.guards.base import Guard, GuardInput
from gateway.types import Message, Verdict


async def moderate(guard: Guard, request: Any, *, images: bool = False) -> list[dict[str, Any]]:
    """Judge every input of `request` concurrently (a local model batches them into shared decodes).

    `request`: a decoded moderation request (anything with `.inputs: list[list[Message]]`), or a
    list of inputs, each a string (one user message) or a list of `Message`s.
    Guard errors propagate (the server answers 5xx rather than a false "not flagged").
    `images`: the policy guards images (`content: {images: guard}`): inputs with images go to the guard
    with them, and a verdict that did not judge them is an error, never "not flagged".
    """
    inputs: Sequence[str | Sequence[Message]] = getattr(request, "inputs", request)
    verdicts = await asyncio.gather(*(_one(guard, item, images) for item in inputs))
    return [result_of(v) for v in verdicts]


async def _one(guard: Guard, item: str | Sequence[Message], images: bool = False) -> Verdict:
    msgs = [Message.of("user", item)] if isinstance(item, str) else list(item)
    if msgs and msgs[-1].role == "assistant":
        return await guard.check(GuardInput(stage="output", messages=msgs[:-1], text=msgs[-1].text))
    seen = images and any(p.type == "image" for m in msgs for p in m.parts)
    v = await guard.check(GuardInput(stage="input", messages=msgs, context={"images": "guard"} if seen else {}))
    if seen and v.error is None and not v.details.get("images_checked"):
        v.error = "the guard did not judge this input's images"
    return v


def result_of(v: Verdict) -> dict[str, Any]:
    """A verdict in the neutral moderation-result shape."""
    if v.error:
        raise RuntimeError(f"guard {v.guard} failed: {v.error}")
    score = float(v.score) if v.score is not None else (1.0 if v.flagged else 0.0)
    return {
        "flagged": bool(v.flagged),
        "categories": list(v.categories),
        "scores": {c: score for c in v.categories},
    }

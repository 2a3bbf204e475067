"""OpenAI embeddings requests, read for the input stage (the vectors that come back carry no text).

`input` is a string, a list of strings, or token ids (a list of ints, or a list of such lists).
Token ids cannot be read by a text guard, so under a policy with input steps they are refused.
"""

from __future__ import annotations

from typing import Any

from gateway.dialects.base import DialectError
from gateway.types import Message


def decode_embedding_inputs(payload: dict[str, Any]) -> list[Message]:
    """One user message per input text; DialectError for a missing input or token ids."""
    inp = payload.get("input")
    if isinstance(inp, str):
        return [Message.of("user", inp)]
    if isinstance(inp, list) and inp and all(isinstance(x, str) for x in inp):
        return [Message.of("user", x) for x in inp]
    if isinstance(inp, list) and inp:
        raise DialectError("embeddings input given as token ids cannot be inspected by this policy's input "
                           "guards; send the text", code="uninspectable_input", param="input")
    raise DialectError("'input' must be a string or a non-empty list of strings", param="input")

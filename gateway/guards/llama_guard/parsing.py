"""Reading Llama Guard's answer: `safe` / `unsafe\nS1,S3`, and P(unsafe) from logits or logprobs."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

_CODE = re.compile(r"S\d{1,2}")


def parse_output(text: str) -> tuple[bool | None, list[str]]:
    """`safe` / `unsafe\\nS1,S3` -> (flagged, codes); tolerant of stray spaces (None: unparseable)."""
    t = text.strip()
    if not t:
        return None, []
    first, _, rest = t.partition("\n")
    first = first.strip().lower()
    if first.startswith("unsafe"):
        return True, list(dict.fromkeys(_CODE.findall(rest + first[6:])))
    if first.startswith("safe"):
        return False, []
    return None, []


def _p_unsafe(l_safe: float, l_unsafe: float) -> float:
    d = l_unsafe - l_safe
    if d >= 0:
        return 1.0 / (1.0 + math.exp(-d))
    e = math.exp(d)
    return e / (1.0 + e)


# --------------------------------------------------------------------------- metrics

def _score_from_top_logprobs(tops: Sequence[Mapping[str, float]]) -> float | None:
    """P(unsafe) renormalised over safe/unsafe at the first position that offers either."""
    for top in tops:
        ls = {k.strip(): v for k, v in top.items()}
        if "safe" in ls or "unsafe" in ls:
            a = ls.get("safe", -1e9)
            b = ls.get("unsafe", -1e9)
            return _p_unsafe(a, b)
    return None



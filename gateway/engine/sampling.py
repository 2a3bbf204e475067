"""Token sampling for generation (temperature, top-k, top-p, min-p) and a stable logsumexp."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(slots=True)
class SamplingParams:
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    seed: int | None = None



def _logsumexp(row: np.ndarray) -> float:
    m = float(row.max())
    return m + float(np.log(np.exp(row - m, dtype=np.float64).sum()))


def _sample(row: np.ndarray, sp: SamplingParams | None, rng: np.random.Generator | None) -> int:
    if sp is None or sp.temperature <= 0 or rng is None:
        return int(np.argmax(row))
    logits = row.astype(np.float64) / sp.temperature
    k = sp.top_k if 0 < sp.top_k < logits.size else logits.size
    idx = np.argpartition(-logits, k - 1)[:k] if k < logits.size else np.arange(logits.size)
    idx = idx[np.argsort(-logits[idx])]
    p = np.exp(logits[idx] - logits[idx[0]])
    p /= p.sum()
    keep = p >= sp.min_p * p[0] if sp.min_p > 0 else np.ones_like(p, dtype=bool)
    if sp.top_p < 1.0:
        keep &= (np.cumsum(p) - p) < sp.top_p
    idx, p = idx[keep], p[keep]
    p /= p.sum()
    return int(idx[rng.choice(len(idx), p=p)])


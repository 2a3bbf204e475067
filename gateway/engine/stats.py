"""Counters of one loaded model, and what one evaluation returns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


class EngineStats:
    """In-process counters for one model (export to Prometheus elsewhere)."""

    _LAT_BUCKETS_MS = (5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, float("inf"))

    def __init__(self) -> None:
        self.tokens_evaluated = 0  # tokens fed through llama_decode (prompt + generated)
        self.tokens_reused = 0  # prompt tokens found in the KV cache and not evaluated again
        self.decode_calls = 0
        self.requests = 0
        self.requests_failed = 0
        self.requests_cancelled = 0  # abandoned by the caller (timeout, client gone, stop string)
        self.sessions_alive = 0
        self.sessions_evicted = 0
        self.prefix_hits = 0  # empty sequences started from a saved prefix state
        self.prefix_tokens_restored = 0  # prompt tokens those restores saved from evaluation
        self.prefix_evictions = 0
        self.prefix_bytes = 0
        self.prefix_entries = 0
        self.latency_ms_sum = 0.0
        self.latency_ms_max = 0.0
        self.latency_buckets = [0] * len(self._LAT_BUCKETS_MS)

    def observe_latency(self, ms: float) -> None:
        self.latency_ms_sum += ms
        self.latency_ms_max = max(self.latency_ms_max, ms)
        for i, b in enumerate(self._LAT_BUCKETS_MS):
            if ms <= b:
                self.latency_buckets[i] += 1
                break

    def snapshot(self) -> dict[str, Any]:
        done = self.requests - self.requests_failed - self.requests_cancelled
        return {
            "tokens_evaluated": self.tokens_evaluated,
            "tokens_reused": self.tokens_reused,
            "decode_calls": self.decode_calls,
            "requests": self.requests,
            "requests_failed": self.requests_failed,
            "requests_cancelled": self.requests_cancelled,
            "sessions_alive": self.sessions_alive,
            "sessions_evicted": self.sessions_evicted,
            "prefix_hits": self.prefix_hits,
            "prefix_tokens_restored": self.prefix_tokens_restored,
            "prefix_evictions": self.prefix_evictions,
            "prefix_bytes": self.prefix_bytes,
            "prefix_entries": self.prefix_entries,
            "latency_ms_avg": self.latency_ms_sum / done if done else 0.0,
            "latency_ms_max": self.latency_ms_max,
            "latency_buckets_ms": dict(zip(self._LAT_BUCKETS_MS, self.latency_buckets, strict=True)),
        }


@dataclass(slots=True)
class EvalResult:
    """What `LlamaModel.evaluate` returns."""

    logits: np.ndarray  # last prompt position: full vocab, or the `select`ed ids
    logsumexp: float  # over the full vocabulary at that position (for probabilities)
    generated: list[int]  # forced + greedily decoded tokens (empty unless decoding was asked)
    n_prompt: int  # prompt length in tokens
    n_evaluated: int  # tokens decoded for this call (new prompt tokens + generated)
    n_reused: int  # prompt tokens reused from the session's KV cache
    latency_ms: float = 0.0
    text: str | None = None  # `generated` detokenized, when the engine sent it (the shared engine does)


"""What the engine's parts share: a model's load options, and the worker's view of sessions and jobs.

`ModelOptions` is read by the scheduler and the model; `_Seq` (a session on the worker) and `_Task`
(one eval or generation job) are touched by the scheduler and the KV sessions. A module of their
own keeps `model`, `scheduler` and `sessions` free of import cycles.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gateway.engine.sampling import SamplingParams


@dataclass(frozen=True, slots=True)
class ModelOptions:
    """How to load one GGUF. Equal options share one loaded model in the pool."""

    path: str
    n_ctx: int = 8192  # KV cells shared by all sessions of this model
    n_threads: int | None = None  # generation threads (None: all cores)
    n_threads_batch: int | None = None  # prompt-processing threads (None: n_threads)
    n_gpu_layers: int = 0  # -1: offload everything (CUDA / Metal builds)
    n_batch: int = 512  # tokens per llama_decode call
    n_ubatch: int = 512
    max_sessions: int = 16  # KV sequences kept resident (<= 256)
    batching: bool = True  # False: one task at a time (benchmarks compare both)
    flash_attn: bool | None = None  # None: llama.cpp decides
    kv_unified: bool = True  # False: one KV stream per session, n_ctx // max_sessions cells each
    prefix_cache_mb: float = 0.0  # KV states kept across requests, keyed by token prefix (0: off)
    verbose: bool = False

    def threads(self) -> tuple[int, int]:
        n = self.n_threads or os.cpu_count() or 1
        return n, self.n_threads_batch or n


class _Seq:
    """A session as the worker sees it (touched only on the worker thread)."""

    __slots__ = ("busy", "cached", "closed", "last_used", "seq", "sid", "temporary")

    def __init__(self, sid: int, temporary: bool = False) -> None:
        self.sid = sid
        self.seq: int | None = None  # llama seq id while resident
        self.cached: list[int] = []  # tokens in the KV cache at positions 0..len-1
        self.last_used = time.monotonic()
        self.busy = False
        self.closed = False
        self.temporary = temporary


@dataclass(eq=False)
class _Task:
    kind: str  # "eval" | "gen"
    seq: _Seq
    prompt: list[int]
    keep: int
    # eval
    select: Sequence[int] | None = None
    decode_if: Callable[[np.ndarray], bool] | None = None
    force: Sequence[int] = ()
    max_new: int = 0
    future: cf.Future | None = None
    # gen
    sampling: SamplingParams | None = None
    emit: Callable[[Any], None] | None = None
    stop: threading.Event | None = None
    # progress
    feed: list[int] = field(default_factory=list)  # tokens still to decode
    generated: list[int] = field(default_factory=list)
    first: np.ndarray | None = None
    first_lse: float = 0.0
    n_reused: int = 0
    n_evaluated: int = 0
    t0: float = field(default_factory=time.perf_counter)
    rng: np.random.Generator | None = None
    phase: str = "prompt"  # prompt -> decode -> done

    def cancelled(self) -> bool:
        if self.future is not None:
            return self.future.cancelled()
        return self.stop is not None and self.stop.is_set()


_STOP = object()

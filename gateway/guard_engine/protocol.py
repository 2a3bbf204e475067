"""The guard engine's wire protocol: JSON over HTTP/1.1, on a Unix socket or TCP.

    GET  /healthz                   {"status": "ok", "pid": int}
    GET  /v1/stats                  per model: batches, model calls, tokens, sessions, workers seen
    POST /v1/prompt_guard/score     {"options": {...}, "texts": [str], "indirect": [bool]}
                                    -> {"scores": [TextScore | null], "cached": [bool], "stats": BatchStats,
                                        "info": {"model_id", "precision", "labels"}}
    POST /v1/llama/open             {"model": name | path, "engine": {ModelOptions fields}, "words": [str],
                                     "probe": bool} -> {"model_id", "n_layer", "chat_template", "words": {w: [ids]}}
    POST /v1/llama/evaluate         {"model_id", "prompt", "keep", "select", "decode_if", "force", "max_new",
                                     "session": str | null} -> {"logits", "logsumexp", "generated", "text",
                                     "n_prompt", "n_evaluated", "n_reused", "latency_ms"}
    POST /v1/llama/close            {"session": str}

Errors: a non-2xx status with {"error": {"code", "message"}}; `unknown_model` (404) after an engine
restart tells the client to open the model again. A session is named by its client (worker pid + a
counter) and created on its first evaluation; the engine closes sessions idle past its TTL (a worker
that died cannot close its own). Prompt Guard options are the policy step's own (the engine builds
the same guard in-process and shares its batcher among everyone who sends the same options).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

ENGINE_ENV = "GUARDGATE_GUARD_ENGINE"  # the machine's shared engine, set by `serve --workers N`
WORKER_HEADER = "X-Guardgate-Worker"  # the sending process (the engine counts distinct workers)

HEALTH = "/healthz"
STATS = "/v1/stats"
PG_SCORE = "/v1/prompt_guard/score"
LLAMA_OPEN = "/v1/llama/open"
LLAMA_EVALUATE = "/v1/llama/evaluate"
LLAMA_CLOSE = "/v1/llama/close"

# Backend values a model guard takes: where its model runs.
LOCAL, ENGINE, AUTO = "local", "engine", "auto"


def is_engine_url(value: str) -> bool:
    return value.startswith(("unix:", "http://", "https://"))


def engine_url(backend: str) -> str | None:
    """The engine a guard's `backend` names, or None for in-process.

    `engine`: the machine's shared engine ($GUARDGATE_GUARD_ENGINE, which `serve --workers N` sets);
    a URL (`unix:/path.sock`, `http://gpu-box:8090`): that engine; `auto`: the shared engine when
    there is one, else in-process; `local`: in-process.
    """
    if is_engine_url(backend):
        return backend
    shared = os.environ.get(ENGINE_ENV) or None
    if backend == ENGINE:
        if shared is None:
            raise ValueError(
                f"backend: engine, but no shared guard engine is running (${ENGINE_ENV} is not set; "
                "it is set by `guardgate serve --workers N`, or give the engine's URL)"
            )
        return shared
    if backend == AUTO:
        return shared
    return None


@dataclass(frozen=True, slots=True)
class UnsafeAtLeast:
    """Decode the category codes when P(unsafe) >= threshold, P renormalised over safe/unsafe.

    A plain rule instead of a closure, so it travels to the engine: P(unsafe) >= t is
    logit(unsafe) - logit(safe) >= log(t / (1 - t)).
    """

    safe: int
    unsafe: int
    threshold: float

    def __call__(self, row: Any) -> bool:
        t = self.threshold
        if t <= 0.0:
            return True
        if t >= 1.0:
            return float(row[self.unsafe]) - float(row[self.safe]) == math.inf
        return float(row[self.unsafe]) - float(row[self.safe]) >= math.log(t / (1.0 - t))

    def wire(self) -> dict[str, Any]:
        return {"safe": self.safe, "unsafe": self.unsafe, "threshold": self.threshold}

    @classmethod
    def from_wire(cls, raw: dict[str, Any] | None) -> UnsafeAtLeast | None:
        if raw is None:
            return None
        return cls(int(raw["safe"]), int(raw["unsafe"]), float(raw["threshold"]))

"""llama.cpp as an in-process engine, and the shared guard engine service.

Modules: `native` (the binding, errors, probe_load), `model` (`LlamaModel`, `ModelOptions`: loading
and the public API), `scheduler` (the worker thread and batch scheduling), `sessions` (KV sessions,
prefix cache), `stats`, `sampling`, `pool` (`EnginePool`, the process-wide `default_pool`),
`chat_template`.
"""

from gateway.engine.model import LlamaModel, ModelOptions
from gateway.engine.native import EngineClosed, EngineError, probe_load, quiet_llama_logs
from gateway.engine.pool import EnginePool, default_pool
from gateway.engine.sampling import SamplingParams
from gateway.engine.sessions import Session
from gateway.engine.stats import EngineStats, EvalResult

__all__ = [
    "EngineClosed",
    "EngineError",
    "EnginePool",
    "EngineStats",
    "EvalResult",
    "LlamaModel",
    "ModelOptions",
    "SamplingParams",
    "Session",
    "default_pool",
    "probe_load",
    "quiet_llama_logs",
]

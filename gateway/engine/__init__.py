"""llama.cpp as an in-process engine.

Modules: `native` (the binding, errors, probe_load), `jobs` (`ModelOptions`, the worker's session
and job records), `model` (`LlamaModel`, `Session`: loading and the public API), `scheduler` (the
worker thread and batch scheduling), `sessions` (KV sessions, prefix cache), `stats`, `sampling`,
`pool` (`EnginePool`, the process-wide `default_pool`), `chat_template`. The shared guard engine
service is `gateway.guard_engine`.
"""

from gateway.engine.jobs import ModelOptions
from gateway.engine.model import LlamaModel, Session
from gateway.engine.native import EngineClosed, EngineError, probe_load, quiet_llama_logs
from gateway.engine.pool import EnginePool, default_pool
from gateway.engine.sampling import SamplingParams
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

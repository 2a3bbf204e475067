"""Loaded models shared by guards and upstreams in one process."""

from __future__ import annotations

import asyncio
from typing import Any

from gateway.engine.jobs import ModelOptions
from gateway.engine.model import LlamaModel


class EnginePool:
    """Loaded models shared by guards and upstreams; equal `ModelOptions` share one model."""

    def __init__(self) -> None:
        self._models: dict[ModelOptions, tuple[LlamaModel, int]] = {}
        self._lock = asyncio.Lock()

    async def acquire(self, options: ModelOptions) -> LlamaModel:
        async with self._lock:
            entry = self._models.get(options)
            if entry is not None:
                self._models[options] = (entry[0], entry[1] + 1)
                return entry[0]
            model = LlamaModel(options)
            try:
                await model.wait_ready()
            except BaseException:
                await model.aclose()
                raise
            self._models[options] = (model, 1)
            return model

    async def release(self, model: LlamaModel) -> None:
        async with self._lock:
            entry = self._models.get(model.options)
            if entry is None or entry[0] is not model:
                return
            if entry[1] > 1:
                self._models[model.options] = (model, entry[1] - 1)
                return
            del self._models[model.options]
        await model.aclose()

    def stats(self) -> dict[str, dict[str, Any]]:
        return {o.path: m.stats.snapshot() for o, (m, _) in self._models.items()}

    async def aclose(self) -> None:
        models = [m for m, _ in self._models.values()]
        self._models.clear()
        for m in models:
            await m.aclose()


_default_pool: EnginePool | None = None


def default_pool() -> EnginePool:
    """The process-wide pool (guards and the local upstream share loaded models through it)."""
    global _default_pool
    if _default_pool is None:
        _default_pool = EnginePool()
    return _default_pool


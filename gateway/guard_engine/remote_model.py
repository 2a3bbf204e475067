"""A stand-in for `engine.LlamaModel` whose evaluations run in a guard engine.

Llama Guard uses the same calls either way (`evaluate`, `open_session`, `tokenize` of its verdict
words, `chat_template`, `n_layer`), so the incremental stream check stays incremental: the session
(prefix + answer so far in the KV cache) lives in the engine, named by this process.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from gateway.engine.stats import EngineStats, EvalResult
from gateway.guard_engine.client import EngineClient, EngineUnavailable
from gateway.guard_engine.protocol import LLAMA_CLOSE, LLAMA_EVALUATE, LLAMA_OPEN, UnsafeAtLeast

_session_ids = itertools.count(1)


class RemoteSession:
    """One stream's KV session in the engine; `release` tells the engine to drop it."""

    def __init__(self, model: RemoteModel) -> None:
        self.model = model
        self.id = f"{os.getpid()}-{id(model):x}-{next(_session_ids)}"
        self.closed = False

    def release(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (interpreter exit): the engine's idle TTL closes it
            return
        task = loop.create_task(self.model.close_session(self.id))
        self.model._closing.add(task)
        task.add_done_callback(self.model._closing.discard)

    async def close(self) -> None:
        self.release()


class RemoteModel:
    """A model loaded in the engine (opened again transparently after an engine restart)."""

    def __init__(
        self,
        client: EngineClient,
        model: str,
        engine: dict[str, Any],
        *,
        words: Sequence[str],
        probe: bool = False,
        timeout_s: float = 30.0,
    ) -> None:
        self.client = client
        self.spec = {"model": model, "engine": engine, "words": list(words), "probe": probe}
        self.timeout_s = timeout_s
        self.model_id: str | None = None
        self.n_layer = 0
        self.chat_template: str | None = None
        self.path = model
        self._words: dict[str, list[int]] = {}
        self.stats = EngineStats()  # this process's share, as the engine reported it per call
        self._closing: set[asyncio.Task[None]] = set()
        self._open_lock = asyncio.Lock()

    async def open(self) -> RemoteModel:
        async with self._open_lock:
            data = await self.client.call(LLAMA_OPEN, self.spec, self.timeout_s)
            self.model_id = str(data["model_id"])
            self.n_layer = int(data.get("n_layer", 0))
            self.chat_template = data.get("chat_template")
            self.path = str(data.get("path", self.path))
            self._words = {w: [int(t) for t in ids] for w, ids in (data.get("words") or {}).items()}
        return self

    def tokenize(self, text: str, *, special: bool = True, add_bos: bool = False) -> list[int]:
        """Only the words asked for at open (Llama Guard's `safe` / `unsafe`)."""
        try:
            return list(self._words[text])
        except KeyError:
            raise EngineUnavailable(f"guard engine: {text!r} was not tokenized at open") from None

    def detokenize(self, tokens: Sequence[int], *, special: bool = False) -> str:
        raise EngineUnavailable("guard engine results carry their text; detokenize is not remote")

    def open_session(self) -> RemoteSession:
        return RemoteSession(self)

    async def close_session(self, sid: str) -> None:
        try:
            await self.client.call(LLAMA_CLOSE, {"session": sid}, 5.0)
        except EngineUnavailable:
            pass  # the engine is gone (its sessions with it) or will expire the session

    async def evaluate(
        self,
        prompt: str,
        *,
        session: RemoteSession | None = None,
        keep: int | str | None = None,
        select: Sequence[int] | None = None,
        decode_if: UnsafeAtLeast | None = None,
        force: Sequence[int] = (),
        max_new: int = 0,
    ) -> EvalResult:
        if decode_if is not None and not isinstance(decode_if, UnsafeAtLeast):
            raise TypeError("the guard engine takes an UnsafeAtLeast decode rule, not a callable")
        if self.model_id is None:
            await self.open()
        body = {
            "model_id": self.model_id,
            "prompt": prompt,
            "keep": keep,
            "select": list(select) if select is not None else None,
            "decode_if": decode_if.wire() if decode_if is not None else None,
            "force": list(force),
            "max_new": max_new,
            "session": session.id if session is not None else None,
        }
        try:
            data = await self.client.call(LLAMA_EVALUATE, body, self.timeout_s)
        except EngineUnavailable as e:
            if e.code != "unknown_model":
                raise
            await self.open()  # the engine restarted: load the model again, then retry once
            body["model_id"] = self.model_id
            data = await self.client.call(LLAMA_EVALUATE, body, self.timeout_s)
        res = EvalResult(
            logits=np.asarray(data["logits"], dtype=np.float32),
            logsumexp=float(data["logsumexp"]),
            generated=[int(t) for t in data["generated"]],
            n_prompt=int(data["n_prompt"]),
            n_evaluated=int(data["n_evaluated"]),
            n_reused=int(data["n_reused"]),
            latency_ms=float(data.get("latency_ms", 0.0)),
            text=str(data.get("text") or ""),
        )
        self.stats.requests += 1
        self.stats.tokens_evaluated += res.n_evaluated
        self.stats.tokens_reused += res.n_reused
        return res

    async def aclose(self) -> None:
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

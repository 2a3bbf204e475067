"""The incremental stream check of Llama Guard: one engine session per stream."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from gateway.guards.base import StreamCheck
from gateway.guards.llama_guard.prompt import conversation_turns
from gateway.types import Message, Verdict

if TYPE_CHECKING:
    from gateway.engine import Session
    from gateway.guard_engine.remote_model import RemoteSession
    from gateway.guards.llama_guard.guard import LlamaGuard


class LlamaGuardStream(StreamCheck):
    """Incremental check of a streamed answer: one engine session holds prefix + answer in the KV cache."""

    guard: LlamaGuard

    def __init__(self, guard: LlamaGuard, messages: list[Message], request_id: str) -> None:
        super().__init__(guard, messages, request_id)
        self._session: Session | RemoteSession | None = None
        self._split: tuple[str, str] | None = None
        self._closed = False
        self._slot: int | None = None

    async def check(self, text: str, window_start: int, final: bool) -> Verdict:
        g = self.guard
        if self._closed:
            raise RuntimeError("llama_guard stream check used after close")
        if g.mode is None:
            await g.start()
        t0 = time.perf_counter()
        turns = conversation_turns(self.messages, answer=text, history=g.history)
        if not text.strip():
            return g.verdict(t0, reason="nothing to check")
        if g.mode not in ("local", "engine"):
            if self._slot is None and g.remote is not None:  # llama.cpp server: the stream keeps one slot
                self._slot = g.remote.acquire_slot()
            return await g._guarded(g._judge(turns, None, t0, slot=-1 if self._slot is None else self._slot))
        if g.mode == "engine":  # the session lives in the engine: the check stays incremental there
            await g._guarded(g._open_engine_model())
        assert g.model is not None and g.prompter is not None
        if self._session is None:
            self._session = g.model.open_session()
            g.stats.sessions_alive += 1
            g.stats.sessions_opened += 1
        if self._split is None:
            self._split = g.prompter.split(turns)
        return await g._guarded(g._judge(turns, self._session, t0, split=self._split))

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._slot is not None and self.guard.remote is not None:
            self.guard.remote.release_slot(self._slot)
            self._slot = None
        if self._session is not None:
            self._session.release()
            self._session = None
            self.guard.stats.sessions_alive -= 1

"""The guard engine process: one copy of each guard model, checks of every worker batched together.

Prompt Guard: one in-process `PromptGuard` per distinct set of step options; its batcher groups the
windows of every worker's concurrent requests into shared model calls. Llama Guard: models in an
`EnginePool` (one worker thread each, continuous batching across sessions), KV sessions keyed by
the name the worker gave them (one per guarded stream), the cross-request prefix cache. The wire
protocol is in `protocol.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from aiohttp import web

from gateway.engine import EngineError, EnginePool, LlamaModel, ModelOptions, Session, probe_load
from gateway.guard_engine.protocol import (
    HEALTH,
    LLAMA_CLOSE,
    LLAMA_EVALUATE,
    LLAMA_OPEN,
    PG_SCORE,
    STATS,
    WORKER_HEADER,
    UnsafeAtLeast,
)

log = logging.getLogger("guardgate.guard_engine")

SESSION_TTL_S = 300.0  # a session idle this long is closed (its worker died or forgot it)
_BACKEND_KEYS = ("backend", "engine_timeout_s")


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


@dataclass
class _Remote:
    """A worker's stream session and when it was last used."""

    session: Session
    model_id: str
    last_used: float = field(default_factory=time.monotonic)


class GuardEngineService:
    """The state behind the engine's HTTP app."""

    def __init__(self, pool: EnginePool | None = None, session_ttl_s: float = SESSION_TTL_S) -> None:
        self.pool = pool or EnginePool()
        self.session_ttl_s = session_ttl_s
        self.prompt_guards: dict[str, Any] = {}  # options (canonical JSON) -> PromptGuard
        self.models: dict[str, LlamaModel] = {}  # model id -> loaded model
        self.sessions: dict[str, _Remote] = {}
        self.workers: set[str] = set()  # distinct sender pids seen
        self.counts = {"prompt_guard_requests": 0, "llama_evaluations": 0, "sessions_expired": 0}
        self._locks: dict[str, asyncio.Lock] = {}
        self._reaper: asyncio.Task[None] | None = None

    # ---- lifecycle

    async def start(self, app: web.Application) -> None:
        self._reaper = asyncio.get_running_loop().create_task(self._reap())

    async def stop(self, app: web.Application) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        for r in self.sessions.values():
            r.session.release()
        self.sessions.clear()
        for g in self.prompt_guards.values():
            await g.aclose()
        await self.pool.aclose()

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(min(30.0, self.session_ttl_s / 2))
            now = time.monotonic()
            for sid, r in list(self.sessions.items()):
                if now - r.last_used > self.session_ttl_s:
                    r.session.release()
                    del self.sessions[sid]
                    self.counts["sessions_expired"] += 1

    def _lock(self, key: str) -> asyncio.Lock:
        return self._locks.setdefault(key, asyncio.Lock())

    def _seen(self, request: web.Request) -> None:
        worker = request.headers.get(WORKER_HEADER)
        if worker:
            self.workers.add(worker)

    # ---- handlers

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "pid": os.getpid()})

    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "pid": os.getpid(),
                "workers_seen": sorted(self.workers),
                "counts": self.counts,
                "sessions": len(self.sessions),
                "prompt_guard": {k: g.stats for k, g in self.prompt_guards.items()},
                "llama": {mid: m.stats.snapshot() for mid, m in self.models.items()},
            }
        )

    async def prompt_guard_score(self, request: web.Request) -> web.Response:
        self._seen(request)
        body = await request.json()
        options = {k: v for k, v in dict(body.get("options") or {}).items() if k not in _BACKEND_KEYS}
        key = json.dumps(options, sort_keys=True, default=str)
        try:
            guard = await self._prompt_guard(key, options)
            scores, cached, stats = await guard.score(list(body["texts"]), [bool(x) for x in body["indirect"]])
        except Exception as e:  # the worker's guard turns this into an error verdict
            log.warning("prompt_guard: %s: %s", type(e).__name__, e)
            return _error(500, type(e).__name__, str(e))
        self.counts["prompt_guard_requests"] += 1
        info = guard.info
        return web.json_response(
            {
                "scores": [asdict(s) if s is not None else None for s in scores],
                "cached": cached,
                "stats": asdict(stats),
                "info": {"model_id": info.model_id, "precision": info.precision, "labels": list(info.labels)}
                if info is not None
                else None,
            }
        )

    async def _prompt_guard(self, key: str, options: dict[str, Any]) -> Any:
        guard = self.prompt_guards.get(key)
        if guard is not None:
            return guard
        async with self._lock("pg:" + key):
            guard = self.prompt_guards.get(key)
            if guard is None:
                from gateway.guards.prompt_guard import PromptGuard

                guard = PromptGuard(**options, backend="local")
                await guard.start()
                self.prompt_guards[key] = guard
        return guard

    async def llama_open(self, request: web.Request) -> web.Response:
        self._seen(request)
        body = await request.json()
        try:
            model = await self._llama(str(body["model"]), dict(body.get("engine") or {}), bool(body.get("probe")))
        except Exception as e:
            log.warning("llama open %s: %s: %s", body.get("model"), type(e).__name__, e)
            return _error(500, type(e).__name__, str(e))
        words = {w: model.tokenize(w, special=False) for w in body.get("words") or []}
        mid = self._model_id(model.options)
        return web.json_response(
            {
                "model_id": mid,
                "n_layer": model.n_layer,
                "chat_template": model.chat_template,
                "path": model.options.path,
                "words": words,
            }
        )

    @staticmethod
    def _model_id(options: ModelOptions) -> str:
        return hashlib.sha256(repr(options).encode()).hexdigest()[:16]

    async def _llama(self, name: str, engine: dict[str, Any], probe: bool) -> LlamaModel:
        from gateway.models import resolve_model

        path = await asyncio.to_thread(resolve_model, name)
        options = ModelOptions(path=str(path), **engine)
        mid = self._model_id(options)
        async with self._lock("llama:" + mid):
            model = self.models.get(mid)
            if model is None:
                if probe:
                    ok, why = await asyncio.to_thread(probe_load, str(path))
                    if not ok:
                        raise RuntimeError(f"Llama Guard 4 does not load in this llama.cpp: {why}")
                model = await self.pool.acquire(options)
                self.models[mid] = model
        return model

    async def llama_evaluate(self, request: web.Request) -> web.Response:
        self._seen(request)
        body = await request.json()
        model = self.models.get(str(body.get("model_id")))
        if model is None:
            return _error(404, "unknown_model", f"model {body.get('model_id')!r} is not open in this engine")
        sid = body.get("session")
        session: Session | None = None
        if sid is not None:
            remote = self.sessions.get(sid)
            if remote is None:
                remote = self.sessions[sid] = _Remote(model.open_session(), str(body["model_id"]))
            remote.last_used = time.monotonic()
            session = remote.session
        try:
            res = await model.evaluate(
                body["prompt"],
                session=session,
                keep=body.get("keep"),
                select=body.get("select"),
                decode_if=UnsafeAtLeast.from_wire(body.get("decode_if")),
                force=tuple(body.get("force") or ()),
                max_new=int(body.get("max_new") or 0),
            )
        except EngineError as e:
            return _error(500, type(e).__name__, str(e))
        self.counts["llama_evaluations"] += 1
        text = model.detokenize(res.generated, special=False) if res.generated else ""
        return web.json_response(
            {
                "logits": [float(x) for x in res.logits],
                "logsumexp": res.logsumexp,
                "generated": res.generated,
                "text": text,
                "n_prompt": res.n_prompt,
                "n_evaluated": res.n_evaluated,
                "n_reused": res.n_reused,
                "latency_ms": res.latency_ms,
            }
        )

    async def llama_close(self, request: web.Request) -> web.Response:
        body = await request.json()
        remote = self.sessions.pop(str(body.get("session")), None)
        if remote is not None:
            remote.session.release()
        return web.json_response({"closed": remote is not None})


def create_app(service: GuardEngineService | None = None) -> web.Application:
    svc = service or GuardEngineService()
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_get(HEALTH, svc.health)
    app.router.add_get(STATS, svc.stats)
    app.router.add_post(PG_SCORE, svc.prompt_guard_score)
    app.router.add_post(LLAMA_OPEN, svc.llama_open)
    app.router.add_post(LLAMA_EVALUATE, svc.llama_evaluate)
    app.router.add_post(LLAMA_CLOSE, svc.llama_close)
    app.on_startup.append(svc.start)
    app.on_cleanup.append(svc.stop)
    return app

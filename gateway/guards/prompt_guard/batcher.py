"""Cross-request batching of Prompt Guard windows, with a verdict cache and in-flight de-duplication.

Texts of concurrent requests share model calls: new texts wait at most `batch_wait_s` (or until a
worker is free) and all texts waiting then go to the scorer in one job, so under load each call
carries up to `max_batch_windows` windows instead of one request's few. Per-text results are cached
by model + scoring config + text hash. The guard uses one batcher in-process; the shared guard
engine (`gateway.engine.service`) uses one for the traffic of every worker that talks to it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cachetools import TTLCache

from gateway.guards.prompt_guard.scorer import BatchStats, InputTooLong, PromptGuardScorer, TextScore


@dataclass(slots=True)
class _Queued:
    """One request's new texts waiting for a worker job (the batcher groups requests into jobs)."""

    keys: list[tuple[str, ...]]
    texts: list[str]
    indirect: list[bool]
    stats: BatchStats  # the request's figures, filled from its job's when it ends


class WindowBatcher:
    """Scores texts through one `PromptGuardScorer`, loaded on first use by `load` in a worker thread."""

    def __init__(
        self,
        load: Callable[[], PromptGuardScorer],
        *,
        workers: int = 1,
        max_tokens: int = 65536,
        batch_wait_s: float = 0.002,
        max_batch_windows: int = 16,
        cross_batch: bool = True,
        cache_size: int = 4096,
        cache_ttl_s: float = 3600.0,
    ) -> None:
        self._load_fn = load
        self.workers = workers
        self.max_tokens = max_tokens
        self.batch_wait_s = batch_wait_s
        self.max_batch_windows = max_batch_windows
        self.cross_batch = cross_batch
        self._cache: TTLCache[tuple[str, ...], TextScore | None] | None = (
            TTLCache(maxsize=cache_size, ttl=cache_ttl_s) if cache_size else None
        )
        self.scorer: PromptGuardScorer | None = None
        self._model_key = ""
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._start_lock = threading.Lock()
        self._pending: dict[tuple[str, ...], asyncio.Future[TextScore | None]] = {}
        self._queue: list[_Queued] = []  # requests' new texts waiting for a model job
        self._in_flight = 0  # jobs running in the executor
        self._timer: asyncio.TimerHandle | None = None
        self.stats = {
            "inference_calls": 0,
            "windows": 0,
            "tokens": 0,
            "cache_hits": 0,
            "texts_scored": 0,
            "jobs": 0,
            "requests_batched": 0,
        }

    # ---- lifecycle

    def _load(self) -> PromptGuardScorer:
        with self._start_lock:
            if self.scorer is None:
                self.scorer = self._load_fn()
                self._model_key = self.scorer.info.key
            return self.scorer

    async def start(self) -> None:
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=self.workers, thread_name_prefix="prompt-guard"
            )
        if self.scorer is None:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._load)

    async def aclose(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        self.scorer = None

    # ---- scoring with cache and in-flight de-duplication

    def _key(self, text: str, indirect: bool) -> tuple[str, ...]:
        assert self.scorer is not None
        kind = "indirect" if indirect and self.scorer.num_labels > 2 else "last"
        digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
        return (self._model_key, self.scorer.config_key, kind, digest)

    async def score(
        self, texts: Sequence[str], indirect: Sequence[bool]
    ) -> tuple[list[TextScore | None], list[bool], BatchStats]:
        """Scores of `texts`: cache first, the rest in a shared job. Returns (scores, cached, stats)."""
        await self.start()
        assert self._executor is not None and self.scorer is not None
        loop = asyncio.get_running_loop()
        keys = [self._key(t, ind) for t, ind in zip(texts, indirect, strict=True)]
        results: list[TextScore | None] = [None] * len(texts)
        cached = [False] * len(texts)
        todo: dict[tuple[str, ...], int] = {}  # key -> index of the first text with it
        for i, k in enumerate(keys):
            if self._cache is not None and k in self._cache:
                results[i], cached[i] = self._cache[k], True
                self.stats["cache_hits"] += 1
            elif k not in self._pending and k not in todo:  # pending: another request is on it
                todo[k] = i
        stats = BatchStats()
        if todo:
            new_keys = list(todo)
            for k in new_keys:
                self._pending[k] = loop.create_future()
            self._queue.append(
                _Queued(new_keys, [texts[todo[k]] for k in new_keys], [indirect[todo[k]] for k in new_keys], stats)
            )
            self._kick(loop)
        waits = {i: self._pending[k] for i, k in enumerate(keys) if not cached[i]}
        for i, fut in waits.items():
            results[i] = await asyncio.shield(fut)
        return results, cached, stats

    def _kick(self, loop: asyncio.AbstractEventLoop) -> None:
        """Send the queued texts to a worker now, after the bounded wait, or when a job ends."""
        if not self.cross_batch:  # each request its own job, queued in the executor
            batch, self._queue = self._queue, []
            for q in batch:
                self._flush(loop, [q])
            return
        if not self._queue or self._in_flight >= self.workers:
            return  # nothing to send, or every worker busy: _job_done sends the queue
        if self.batch_wait_s <= 0 or sum(len(q.keys) for q in self._queue) >= self.max_batch_windows:
            self._flush(loop, self._take())
        elif self._timer is None:
            self._timer = loop.call_later(self.batch_wait_s, self._on_timer, loop)

    def _on_timer(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        if self._in_flight < self.workers:
            self._flush(loop, self._take())

    def _take(self) -> list[_Queued]:
        """Everything queued, for one job (the pending wait, if any, is over)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._queue = self._queue, []
        return batch

    def _flush(self, loop: asyncio.AbstractEventLoop, batch: list[_Queued]) -> None:
        """One worker job for `batch`: the windows of all its requests share the model calls."""
        if not batch:
            return
        if self._executor is None or self.scorer is None:  # closed meanwhile
            for q in batch:
                for k in q.keys:
                    self._pending.pop(k).cancel()
            return
        job_stats = BatchStats()
        self._in_flight += 1
        job = loop.run_in_executor(
            self._executor,
            self.scorer.score_requests,
            [(q.texts, q.indirect) for q in batch],
            job_stats,
            self.max_tokens,
        )
        # The callback runs on the loop even if a request is cancelled meanwhile, so the cache is
        # filled and other requests waiting on the same texts are woken.
        job.add_done_callback(lambda f: self._job_done(batch, job_stats, f, loop))

    def _job_done(
        self,
        batch: list[_Queued],
        job_stats: BatchStats,
        job: asyncio.Future[list[list[TextScore | None] | InputTooLong]],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        """On the loop thread when a worker job ends: settle its requests, send what queued meanwhile."""
        self._in_flight -= 1
        self.stats["jobs"] += 1
        self.stats["requests_batched"] += len(batch)
        self.stats["inference_calls"] += job_stats.inference_calls
        self.stats["windows"] += job_stats.windows
        self.stats["tokens"] += job_stats.tokens
        for i, q in enumerate(batch):
            # A request's figures are those of the job that scored its texts (shared with the others).
            q.stats.inference_calls, q.stats.windows = job_stats.inference_calls, job_stats.windows
            q.stats.tokens, q.stats.padded_tokens = job_stats.tokens, job_stats.padded_tokens
            if job.cancelled():
                self._settle(q.keys, None)
            elif job.exception() is not None:
                self._settle(q.keys, job.exception())
            else:
                self._settle(q.keys, job.result()[i])
        self._kick(loop)

    def _settle(self, keys: list[tuple[str, ...]], result: list[TextScore | None] | BaseException | None) -> None:
        """Fill the cache and wake every waiter on `keys` (result None: the job was cancelled)."""
        futs = [self._pending.pop(k) for k in keys]
        if result is None:
            for f in futs:
                if not f.done():
                    f.cancel()
            return
        if isinstance(result, BaseException):
            for f in futs:
                if not f.done():
                    f.set_exception(result)
                    f.exception()  # mark retrieved: a waiter may have gone away
            return
        for k, f, r in zip(keys, futs, result, strict=True):
            if self._cache is not None:
                self._cache[k] = r
            if not f.done():
                f.set_result(r)
        self.stats["texts_scored"] += len(keys)

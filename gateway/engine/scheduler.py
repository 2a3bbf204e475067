"""The worker thread of one model: job intake, admission, and the continuous-batching decode loop.

Every round packs the pending tokens of all active tasks (different sessions) into one
`llama_decode` call; a task is an evaluation (logits of the last prompt token, optionally a few
greedy tokens) or a generation (sampled tokens streamed back to the event loop).
`Scheduler` is a mixin of `LlamaModel`; everything here runs on the model's worker thread.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import queue
import time
from typing import Any

import numpy as np

from gateway.engine.jobs import _STOP, ModelOptions, _Seq, _Task
from gateway.engine.native import EngineClosed, EngineError, _llama
from gateway.engine.sampling import _logsumexp, _sample
from gateway.engine.sessions import KVSessions, _common_prefix
from gateway.engine.stats import EvalResult

log = logging.getLogger("gateway.engine")

class Scheduler(KVSessions):
    """Job intake and batch scheduling of one model (a mixin of `LlamaModel`)."""

    options: ModelOptions
    n_ctx: int
    n_ctx_seq: int
    n_seq_max: int
    n_vocab: int
    _q: queue.SimpleQueue[Any]
    _ready: cf.Future[None]
    _closed: bool
    _batch: Any

    def _load(self) -> None:  # implemented by LlamaModel
        raise NotImplementedError

    def _unload(self) -> None:  # implemented by LlamaModel
        raise NotImplementedError

    def tokenize(self, text: str, *, special: bool = True, add_bos: bool = False) -> list[int]:
        raise NotImplementedError

    def is_eog(self, token: int) -> bool:
        raise NotImplementedError

    def _run(self) -> None:
        try:
            self._load()
        except BaseException as e:
            self._closed = True
            self._ready.set_exception(e if isinstance(e, Exception) else EngineError(str(e)))
            return
        self._ready.set_result(None)
        pending: list[_Task] = []
        active: list[_Task] = []
        stopping = False
        try:
            while not stopping:
                block = not active and not pending
                jobs = [self._q.get()] if block else []
                while True:
                    try:
                        jobs.append(self._q.get_nowait())
                    except queue.Empty:
                        break
                for job in jobs:
                    if job[0] == "stop":
                        stopping = True
                    else:
                        t = self._accept(job)
                        if t is not None:
                            pending.append(t)
                if stopping:
                    break
                self._admit(pending, active)
                if active:
                    self._round(active)
        except BaseException as e:  # pragma: no cover - defensive: never leave futures hanging
            log.exception("llama worker crashed")
            for t in pending + active:
                self._fail(t, EngineError(f"engine worker crashed: {e}"))
            pending, active = [], []
        finally:
            err = EngineClosed(f"model {self.options.path} was unloaded")
            for t in pending + active:
                self._fail(t, err)
            while True:
                try:
                    job = self._q.get_nowait()
                except queue.Empty:
                    break
                t = self._accept(job) if job[0] in ("eval", "gen") else None
                if t is not None:
                    self._fail(t, err)
            self._unload()

    # job intake ---------------------------------------------------------------

    def _accept(self, job: tuple) -> _Task | None:
        kind = job[0]
        if kind == "open":
            self._seqs[job[1]] = _Seq(job[1])
            self.stats.sessions_alive += 1
            return None
        if kind == "close":
            s = self._seqs.get(job[1])
            if s is not None:
                s.closed = True
                if not s.busy:
                    self._drop(s)
            return None
        if kind == "eval":
            _, sid, prompt, keep, select, decode_if, force, max_new, fut = job
            if not fut.set_running_or_notify_cancel():
                return None
            self.stats.requests += 1
            try:
                seq = self._session(sid)
                toks = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
                if not toks:
                    raise EngineError("empty prompt")
                if keep is None:
                    k = len(toks)
                elif isinstance(keep, str):
                    k = _common_prefix(toks, self.tokenize(keep))
                else:
                    k = max(0, min(int(keep), len(toks)))
                need = len(toks) + len(force) + max_new
                if need > self.n_ctx_seq:
                    raise EngineError(
                        f"prompt of {len(toks)} tokens does not fit n_ctx={self.n_ctx} "
                        f"({self.n_ctx_seq} KV cells per session)"
                    )
            except Exception as e:
                self.stats.requests_failed += 1
                fut.set_exception(e)
                return None
            return _Task(
                "eval",
                seq,
                toks,
                k,
                select=select,
                decode_if=decode_if,
                force=tuple(force),
                max_new=max_new,
                future=fut,
            )
        if kind == "gen":
            _, sid, prompt, sampling, max_tokens, emit, stop = job
            self.stats.requests += 1
            try:
                seq = self._session(sid)
                toks = self.tokenize(prompt, add_bos=False) if isinstance(prompt, str) else list(prompt)
                if not toks:
                    raise EngineError("empty prompt")
                max_tokens = max(0, min(max_tokens, self.n_ctx_seq - len(toks)))
                if len(toks) >= self.n_ctx_seq:
                    raise EngineError(
                        f"prompt of {len(toks)} tokens does not fit n_ctx={self.n_ctx} "
                        f"({self.n_ctx_seq} KV cells per session)"
                    )
            except Exception as e:
                self.stats.requests_failed += 1
                emit(e)
                return None
            rng = np.random.default_rng(sampling.seed)
            return _Task(
                "gen",
                seq,
                toks,
                len(toks) + max_tokens,
                max_new=max_tokens,
                sampling=sampling,
                emit=emit,
                stop=stop,
                rng=rng,
            )
        raise AssertionError(kind)

    # scheduling ---------------------------------------------------------------

    def _admit(self, pending: list[_Task], active: list[_Task]) -> None:
        still: list[_Task] = []
        for t in pending:
            if t.cancelled():
                self._finish(t, cancelled=True)
                continue
            if t.seq.busy or (active and not self.options.batching):
                still.append(t)
                continue
            try:
                ready = self._prepare(t, active)
            except Exception as e:
                self._fail(t, e)
                continue
            if ready:
                active.append(t)
            else:  # resources are held by running tasks: wait for them
                still.append(t)
        pending[:] = still

    def _prepare(self, t: _Task, active: list[_Task]) -> bool:
        """Claim a sequence and KV room for `t`; False: must wait for active tasks to finish."""
        C = _llama()
        s = t.seq
        if s.seq is None:
            if not self._free_seq and not self._evict_one(active):
                if active:
                    return False
                raise EngineError(f"all {self.n_seq_max} sequences are in use")
            s.seq = self._free_seq.pop()
            s.cached = []
        if not s.cached:
            self._restore_prefix(s, t.prompt)
        # Reuse the longest cached prefix; the last prompt token is always evaluated (fresh logits).
        n = min(_common_prefix(s.cached, t.prompt), len(t.prompt) - 1)
        if n < len(s.cached):
            C.llama_memory_seq_rm(self._mem, s.seq, n, -1)
            del s.cached[n:]
        t.n_reused = n
        t.feed = t.prompt[n:]
        need = len(t.feed) + len(t.force) + t.max_new
        while self._used(active) + need > self.n_ctx:
            if not self._evict_one(active, keep=s):
                if active:
                    if s.temporary:
                        self._release_seq(s)
                    return False
                raise EngineError(f"KV cache full: {need} more tokens do not fit n_ctx={self.n_ctx}")
        s.busy = True
        s.last_used = time.monotonic()
        return True

    # one decode round ---------------------------------------------------------

    def _round(self, active: list[_Task]) -> None:
        C = _llama()
        for t in list(active):
            if t.cancelled():
                active.remove(t)
                self._finish(t, cancelled=True)
        if not active:
            return
        b = self._batch
        budget = self.options.n_batch
        rows: list[tuple[_Task, int, bool]] = []  # task, tokens taken, wants logits
        i = 0
        # Ascending sequence ids: with per-session KV streams llama.cpp splits a batch into ubatches
        # of consecutive sequence ids only (split_equal), so this order lets sessions share ubatches.
        for t in sorted(active, key=lambda t: t.seq.seq):
            if budget <= 0:
                break
            take = min(len(t.feed), budget)
            if take == 0:
                continue
            s = t.seq
            pos0 = len(s.cached)
            for j in range(take):
                b.token[i] = t.feed[j]
                b.pos[i] = pos0 + j
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = s.seq
                b.logits[i] = False
                i += 1
            last = take == len(t.feed)
            b.logits[i - 1] = last
            rows.append((t, take, last))
            budget -= take
        b.n_tokens = i
        rc = C.llama_decode(self._ctx, b)
        self.stats.decode_calls += 1
        if rc != 0:
            # Positions may be partially written: drop what this round added. No KV slot (1): evict
            # an idle session and retry next round; otherwise fail the round's tasks.
            for t, _, _ in rows:
                C.llama_memory_seq_rm(self._mem, t.seq.seq, len(t.seq.cached), -1)
            if rc == 1 and self._evict_one(active):
                return
            err = EngineError(f"llama_decode failed ({rc}){': no KV slot' if rc == 1 else ''}")
            for t, _, _ in rows:
                active.remove(t)
                self._fail(t, err)
            return
        self.stats.tokens_evaluated += i
        idx = 0
        for t, take, last in rows:
            t.seq.cached.extend(t.feed[:take])
            del t.feed[:take]
            t.n_evaluated += take
            idx += take
            if not last:
                continue
            row = np.ctypeslib.as_array(C.llama_get_logits_ith(self._ctx, idx - 1), shape=(self.n_vocab,))
            try:
                done = self._step(t, row)
            except Exception as e:  # e.g. a decode_if callback raised: fail this task only
                active.remove(t)
                self._fail(t, e)
                continue
            if done:
                active.remove(t)
                self._finish(t)

    def _step(self, t: _Task, row: np.ndarray) -> bool:
        """Consume the logits of the task's last fed token; return True when the task is done."""
        if t.kind == "eval":
            if t.phase == "prompt":
                t.first = (row[list(t.select)] if t.select is not None else row).copy()
                t.first_lse = _logsumexp(row)
                t.phase = "done"
                if t.decode_if is not None and (t.force or t.max_new) and t.decode_if(row):
                    t.phase = "decode"
                    if t.force:
                        t.generated.extend(t.force)
                        t.feed = list(t.force)
                        return False
                else:
                    return True
            # decode phase: greedy
            if len(t.generated) >= len(t.force) + t.max_new:
                return True
            tok = int(np.argmax(row))
            t.generated.append(tok)
            if self.is_eog(tok) or len(t.generated) >= len(t.force) + t.max_new:
                return True
            t.feed = [tok]
            return False
        # generation
        if len(t.generated) >= t.max_new:
            return True
        tok = _sample(row, t.sampling, t.rng)
        t.generated.append(tok)
        if self.is_eog(tok):
            return True
        assert t.emit is not None
        t.emit(tok)
        if len(t.generated) >= t.max_new:
            return True
        t.feed = [tok]
        return False

    def _finish(self, t: _Task, cancelled: bool = False) -> None:
        s = t.seq
        s.busy = False
        s.last_used = time.monotonic()
        if s.seq is not None and t.keep < len(s.cached):
            _llama().llama_memory_seq_rm(self._mem, s.seq, t.keep, -1)
            del s.cached[t.keep :]
        if s.temporary:
            if not cancelled:
                self._save_prefix(s)
            self._release_seq(s)
        if s.closed and not s.temporary:
            self._drop(s)
        ms = (time.perf_counter() - t.t0) * 1000.0
        if cancelled:
            self.stats.requests_cancelled += 1
            if t.emit is not None:
                t.emit(_STOP)
            return
        self.stats.tokens_reused += t.n_reused
        self.stats.observe_latency(ms)
        if t.kind == "eval":
            assert t.future is not None and t.first is not None
            res = EvalResult(t.first, t.first_lse, t.generated, len(t.prompt), t.n_evaluated, t.n_reused, ms)
            if not t.future.cancelled():
                t.future.set_result(res)
        else:
            assert t.emit is not None
            t.emit(_STOP)

    def _fail(self, t: _Task, err: BaseException) -> None:
        s = t.seq
        if s.busy:
            s.busy = False
            if s.temporary:
                self._release_seq(s)
            elif s.seq is not None and t.keep < len(s.cached):
                _llama().llama_memory_seq_rm(self._mem, s.seq, t.keep, -1)
                del s.cached[t.keep :]
            if s.closed and not s.temporary:
                self._drop(s)
        self.stats.requests_failed += 1
        if t.future is not None:
            if not t.future.done():
                t.future.set_exception(err)
        elif t.emit is not None:
            t.emit(err)

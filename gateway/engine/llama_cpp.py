"""llama.cpp as an in-process engine: one worker thread per model, sessions as KV sequences, batching.

A llama.cpp context is not thread-safe, so each loaded model is owned by one worker thread fed by
a queue; the event loop only enqueues work and awaits futures (ctypes releases the GIL during
decode). The context is created with `n_seq_max = max_sessions`; each session is one sequence id,
and the worker runs a small continuous-batching loop: every round it packs the pending tokens of
all active tasks (different sessions) into one `llama_decode` call.

KV layout (`kv_unified`): one unified cache lets any session use any of the `n_ctx` cells, but every
token's attention then spans the cells of *all* resident sessions (masked), so a batched check
costs more the more sessions are live: on 2 CPU cores, 64 live guard sessions ran at 0.55x one
session's tokens/s (docs/performance.md). With `kv_unified=False` each session has its own stream
of `n_ctx / max_sessions` cells and attends to its own cells only: 64 sessions ran at 0.95x. The
price is a per-session cap on prompt length; the default stays unified.

Sessions keep tokens in the KV cache between calls. `evaluate()` takes the whole prompt each time,
keeps the longest common prefix that is already cached, evaluates only the rest, reads the logits
of the last position, optionally decodes a few tokens greedily, and finally rolls the cache back
to `keep` tokens (e.g. drops a Llama Guard suffix). When the KV cache or the sequence ids run out,
the least recently used idle session is evicted; it is rebuilt on its next use (a full prefill).

Prefix cache (`prefix_cache_mb` > 0): when a sequence's KV is about to be discarded (a temporary
sequence after its check, a closed or evicted session), its state is saved under its tokens in a
bounded LRU. A sequence that starts empty restores the saved state sharing the longest prefix with
its prompt and evaluates only the rest: a new turn of an already-checked conversation pays for its
new tokens only, not for the template and the earlier turns again.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures as cf
import ctypes
import itertools
import logging
import os
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

_backend_lock = threading.Lock()
_backend_ready = False
_log_cb: Any = None
_errors: collections.deque[str] = collections.deque(maxlen=16)  # recent llama.cpp error lines


class EngineError(RuntimeError):
    """Inference failed (model not loaded, prompt too long for the context, decode error...)."""


class EngineClosed(EngineError):
    """The model was unloaded while work was pending."""


def _llama() -> Any:
    try:
        import llama_cpp.llama_cpp as C
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise EngineError(
            "llama-cpp-python is not installed: pip install 'guardgate[llama]' "
            "(CUDA: CMAKE_ARGS='-DGGML_CUDA=on'; Apple: CMAKE_ARGS='-DGGML_METAL=on')"
        ) from e
    return C


def quiet_llama_logs(verbose: bool = False) -> None:
    """Initialise the llama.cpp backend once; route its logs to `logging` (debug) unless verbose."""
    global _backend_ready, _log_cb
    C = _llama()
    with _backend_lock:
        if _backend_ready:
            return
        if not verbose:
            llama_log = logging.getLogger("llama_cpp.native")

            @C.llama_log_callback
            def _cb(level: int, text: bytes, user_data: Any) -> None:
                msg = text.decode(errors="replace").rstrip()
                if level == 4:  # GGML_LOG_LEVEL_ERROR
                    _errors.append(msg)
                    llama_log.warning("%s", msg)
                elif llama_log.isEnabledFor(logging.DEBUG):
                    llama_log.debug("%s", msg)

            _log_cb = _cb  # keep a reference: the C side holds a raw pointer
            C.llama_log_set(_log_cb, ctypes.c_void_p(0))
        C.llama_backend_init()
        _backend_ready = True


# --------------------------------------------------------------------------- options and stats


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


class EngineStats:
    """In-process counters for one model (export to Prometheus elsewhere)."""

    _LAT_BUCKETS_MS = (5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, float("inf"))

    def __init__(self) -> None:
        self.tokens_evaluated = 0  # tokens fed through llama_decode (prompt + generated)
        self.tokens_reused = 0  # prompt tokens found in the KV cache and not evaluated again
        self.decode_calls = 0
        self.requests = 0
        self.requests_failed = 0
        self.requests_cancelled = 0  # abandoned by the caller (timeout, client gone, stop string)
        self.sessions_alive = 0
        self.sessions_evicted = 0
        self.prefix_hits = 0  # empty sequences started from a saved prefix state
        self.prefix_tokens_restored = 0  # prompt tokens those restores saved from evaluation
        self.prefix_evictions = 0
        self.prefix_bytes = 0
        self.prefix_entries = 0
        self.latency_ms_sum = 0.0
        self.latency_ms_max = 0.0
        self.latency_buckets = [0] * len(self._LAT_BUCKETS_MS)

    def observe_latency(self, ms: float) -> None:
        self.latency_ms_sum += ms
        self.latency_ms_max = max(self.latency_ms_max, ms)
        for i, b in enumerate(self._LAT_BUCKETS_MS):
            if ms <= b:
                self.latency_buckets[i] += 1
                break

    def snapshot(self) -> dict[str, Any]:
        done = self.requests - self.requests_failed - self.requests_cancelled
        return {
            "tokens_evaluated": self.tokens_evaluated,
            "tokens_reused": self.tokens_reused,
            "decode_calls": self.decode_calls,
            "requests": self.requests,
            "requests_failed": self.requests_failed,
            "requests_cancelled": self.requests_cancelled,
            "sessions_alive": self.sessions_alive,
            "sessions_evicted": self.sessions_evicted,
            "prefix_hits": self.prefix_hits,
            "prefix_tokens_restored": self.prefix_tokens_restored,
            "prefix_evictions": self.prefix_evictions,
            "prefix_bytes": self.prefix_bytes,
            "prefix_entries": self.prefix_entries,
            "latency_ms_avg": self.latency_ms_sum / done if done else 0.0,
            "latency_ms_max": self.latency_ms_max,
            "latency_buckets_ms": dict(zip(self._LAT_BUCKETS_MS, self.latency_buckets, strict=True)),
        }


@dataclass(slots=True)
class EvalResult:
    """What `LlamaModel.evaluate` returns."""

    logits: np.ndarray  # last prompt position: full vocab, or the `select`ed ids
    logsumexp: float  # over the full vocabulary at that position (for probabilities)
    generated: list[int]  # forced + greedily decoded tokens (empty unless decoding was asked)
    n_prompt: int  # prompt length in tokens
    n_evaluated: int  # tokens decoded for this call (new prompt tokens + generated)
    n_reused: int  # prompt tokens reused from the session's KV cache
    latency_ms: float = 0.0


@dataclass(slots=True)
class SamplingParams:
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    seed: int | None = None


# --------------------------------------------------------------------------- worker-side state


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
_MIN_PREFIX = 32  # shorter matches are evaluated: a restore copies the whole saved state
_MAX_PREFIX_ENTRIES = 256  # a lookup compares the prompt with every key: bound the count too


class _PrefixCache:
    """Saved KV states keyed by their tokens; least recently used first out, bounded in bytes.

    Touched only on the worker thread. Lookup compares the prompt with every key (numpy), so the
    number of entries is bounded as well as their bytes.
    """

    def __init__(self, max_bytes: int, stats: EngineStats) -> None:
        self.max_bytes = max_bytes
        self.stats = stats
        self._entries: collections.OrderedDict[tuple[int, ...], tuple[np.ndarray, Any]] = (
            collections.OrderedDict()
        )

    def __contains__(self, key: tuple[int, ...]) -> bool:
        if key in self._entries:
            self._entries.move_to_end(key)
            return True
        return False

    def put(self, key: tuple[int, ...], state: Any) -> None:
        size = ctypes.sizeof(state)
        if size > self.max_bytes or key in self._entries:
            return
        while self.stats.prefix_bytes + size > self.max_bytes or len(self._entries) >= _MAX_PREFIX_ENTRIES:
            _, (_, old) = self._entries.popitem(last=False)
            self.stats.prefix_bytes -= ctypes.sizeof(old)
            self.stats.prefix_evictions += 1
        self._entries[key] = (np.asarray(key, dtype=np.int64), state)
        self.stats.prefix_bytes += size
        self.stats.prefix_entries = len(self._entries)

    def best(self, prompt: Sequence[int]) -> tuple[tuple[int, ...], Any, int] | None:
        """The entry sharing the longest prefix with `prompt`: (key, state, shared length)."""
        if not self._entries:
            return None
        p = np.asarray(prompt, dtype=np.int64)
        found: tuple[tuple[int, ...], Any, int] | None = None
        for key, (arr, state) in self._entries.items():
            n = min(len(arr), len(p))
            diff = np.flatnonzero(arr[:n] != p[:n])
            shared = int(diff[0]) if diff.size else n
            if found is None or shared > found[2]:
                found = (key, state, shared)
        if found is not None:
            self._entries.move_to_end(found[0])
        self.stats.prefix_entries = len(self._entries)
        return found


class Session:
    """A handle on one KV sequence of a model; close it when its stream ends."""

    _ids = itertools.count(1)

    def __init__(self, model: LlamaModel) -> None:
        self.model = model
        self.id = next(self._ids)
        self.closed = False
        model._submit(("open", self.id))

    def release(self) -> None:
        """Free the sequence (non-blocking; safe from any thread, idempotent)."""
        if not self.closed:
            self.closed = True
            self.model._submit(("close", self.id))

    async def close(self) -> None:
        self.release()

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:
            pass


# --------------------------------------------------------------------------- the model


class LlamaModel:
    """One loaded GGUF, owned by one worker thread. Create through `EnginePool.acquire`."""

    def __init__(self, options: ModelOptions) -> None:
        self.options = options
        self.stats = EngineStats()
        self._q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._ready: cf.Future[None] = cf.Future()
        self._thread = threading.Thread(
            target=self._run, name=f"llama:{os.path.basename(options.path)}", daemon=True
        )
        self._closed = False
        # filled by the worker at load time
        self.n_vocab = 0
        self.n_ctx = 0
        self.n_layer = 0
        self.metadata: dict[str, str] = {}
        self.chat_template: str | None = None
        self.bos_id = -1
        self.eos_id = -1
        self._thread.start()

    # ----------------------------------------------------------------- public API (event loop)

    async def wait_ready(self) -> None:
        await asyncio.wrap_future(self._ready)

    def tokenize(self, text: str, *, special: bool = True, add_bos: bool = False) -> list[int]:
        """Tokenize (thread-safe: reads the immutable vocabulary only)."""
        C = _llama()
        b = text.encode()
        n_max = len(b) + 16
        buf = (C.llama_token * n_max)()
        n = C.llama_tokenize(self._vocab, b, len(b), buf, n_max, add_bos, special)
        if n < 0:
            buf = (C.llama_token * -n)()
            n = C.llama_tokenize(self._vocab, b, len(b), buf, -n, add_bos, special)
        return list(buf[:n])

    def token_piece(self, token: int, *, special: bool = False) -> bytes:
        C = _llama()
        buf = ctypes.create_string_buffer(64)
        n = C.llama_token_to_piece(self._vocab, token, buf, 64, 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = C.llama_token_to_piece(self._vocab, token, buf, -n, 0, special)
        return buf.raw[:n]

    def detokenize(self, tokens: Sequence[int], *, special: bool = False) -> str:
        return b"".join(self.token_piece(t, special=special) for t in tokens).decode(errors="replace")

    def is_eog(self, token: int) -> bool:
        return bool(_llama().llama_vocab_is_eog(self._vocab, token))

    def open_session(self) -> Session:
        self._check_open()
        return Session(self)

    async def evaluate(
        self,
        prompt: str | Sequence[int],
        *,
        session: Session | None = None,
        keep: int | str | None = None,
        select: Sequence[int] | None = None,
        decode_if: Callable[[np.ndarray], bool] | None = None,
        force: Sequence[int] = (),
        max_new: int = 0,
    ) -> EvalResult:
        """Evaluate `prompt` in `session` (or a temporary sequence) and return next-token logits.

        keep: tokens to leave cached afterwards (int), or a text whose tokenization's common prefix
        with the prompt's is kept (a prompt minus its fixed suffix); None keeps everything.
        decode_if: called on the worker with the full logits row; if true, `force` tokens are
        appended and up to `max_new` tokens decoded greedily (returned in `generated`).
        """
        self._check_open()
        fut: cf.Future[EvalResult] = cf.Future()
        self._submit(
            ("eval", session.id if session else None, prompt, keep, select, decode_if, force, max_new, fut)
        )
        return await asyncio.wrap_future(fut)

    async def generate(
        self,
        prompt: str | Sequence[int],
        *,
        sampling: SamplingParams | None = None,
        max_tokens: int = 256,
        session: Session | None = None,
    ) -> AsyncIterator[int]:
        """Sample tokens after `prompt` until an end-of-generation token or `max_tokens`.

        Closing/cancelling the iterator stops generation at the next decode round.
        """
        self._check_open()
        loop = asyncio.get_running_loop()
        out: asyncio.Queue[Any] = asyncio.Queue()
        stop = threading.Event()

        def emit(item: Any) -> None:
            loop.call_soon_threadsafe(out.put_nowait, item)

        self._submit(
            (
                "gen",
                session.id if session else None,
                prompt,
                sampling or SamplingParams(),
                max_tokens,
                emit,
                stop,
            )
        )
        try:
            while True:
                item = await out.get()
                if item is _STOP:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._q.put(("stop",))
        await asyncio.to_thread(self._thread.join)

    # ----------------------------------------------------------------- worker thread

    def _check_open(self) -> None:
        if self._closed:
            raise EngineClosed(f"model {self.options.path} is closed")

    def _submit(self, job: tuple) -> None:
        self._q.put(job)

    def _load(self) -> None:
        C = _llama()
        o = self.options
        quiet_llama_logs(o.verbose)
        if not os.path.isfile(o.path):
            raise EngineError(f"model file not found: {o.path}")
        mp = C.llama_model_default_params()
        mp.n_gpu_layers = o.n_gpu_layers
        _errors.clear()
        model = C.llama_model_load_from_file(o.path.encode(), mp)
        if not model:
            raise EngineError(f"llama.cpp could not load {o.path}: {_last_error()}")
        self._model = model
        self._vocab = C.llama_model_get_vocab(model)
        cp = C.llama_context_default_params()
        cp.n_ctx = o.n_ctx
        cp.n_batch = o.n_batch
        cp.n_ubatch = min(o.n_ubatch, o.n_batch)
        cp.n_seq_max = max(1, min(o.max_sessions, 256))
        n, nb = o.threads()
        cp.n_threads, cp.n_threads_batch = n, nb
        cp.kv_unified = o.kv_unified
        cp.no_perf = True
        if o.flash_attn is not None:
            cp.flash_attn_type = (
                C.LLAMA_FLASH_ATTN_TYPE_ENABLED if o.flash_attn else C.LLAMA_FLASH_ATTN_TYPE_DISABLED
            )
        ctx = C.llama_init_from_model(model, cp)
        if not ctx:
            C.llama_model_free(model)
            raise EngineError(f"llama.cpp could not create a context (n_ctx={o.n_ctx}) for {o.path}")
        self._ctx = ctx
        self._mem = C.llama_get_memory(ctx)
        self.n_ctx = C.llama_n_ctx(ctx)
        # Longest prompt one session can hold: all n_ctx cells when unified, else its own stream's.
        self.n_ctx_seq = C.llama_n_ctx_seq(ctx)
        self.n_seq_max = cp.n_seq_max
        self.n_vocab = C.llama_vocab_n_tokens(self._vocab)
        self.n_layer = C.llama_model_n_layer(model)
        self.bos_id = C.llama_vocab_bos(self._vocab)
        self.eos_id = C.llama_vocab_eos(self._vocab)
        self.metadata = _metadata(C, model)
        self.chat_template = self.metadata.get("tokenizer.chat_template")
        self._batch = C.llama_batch_init(o.n_batch, 0, 1)
        self._free_seq = list(range(self.n_seq_max))[::-1]
        mb = o.prefix_cache_mb
        self._prefixes = _PrefixCache(int(mb * 1024 * 1024), self.stats) if mb > 0 else None
        self._seqs: dict[int, _Seq] = {}
        self._tmp_ids = itertools.count(-1, -1)

    def _unload(self) -> None:
        C = _llama()
        if getattr(self, "_batch", None) is not None:
            C.llama_batch_free(self._batch)
            self._batch = None
        if getattr(self, "_ctx", None):
            C.llama_free(self._ctx)
            self._ctx = None
        if getattr(self, "_model", None):
            C.llama_model_free(self._model)
            self._model = None

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

    def _session(self, sid: int | None) -> _Seq:
        if sid is None:
            return _Seq(next(self._tmp_ids), temporary=True)
        s = self._seqs.get(sid)
        if s is None or s.closed:
            raise EngineError("session is closed")
        return s

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

    def _save_prefix(self, s: _Seq) -> None:
        """Keep the KV state of `s` (about to be discarded) for later prompts that share its prefix."""
        pc = self._prefixes
        if pc is None or s.seq is None or len(s.cached) < _MIN_PREFIX:
            return
        key = tuple(s.cached)
        if key in pc:
            return
        C = _llama()
        size = C.llama_state_seq_get_size(self._ctx, s.seq)
        if not 0 < size <= pc.max_bytes:
            return
        state = (ctypes.c_uint8 * size)()
        if C.llama_state_seq_get_data(self._ctx, state, size, s.seq) == size:
            pc.put(key, state)

    def _restore_prefix(self, s: _Seq, prompt: Sequence[int]) -> None:
        """Start the empty sequence `s` from the saved state sharing the longest prefix with `prompt`."""
        pc = self._prefixes
        if pc is None or s.seq is None:
            return
        found = pc.best(prompt)
        if found is None or min(found[2], len(prompt) - 1) < _MIN_PREFIX:
            return
        key, state, shared = found
        C = _llama()
        if C.llama_state_seq_set_data(self._ctx, state, ctypes.sizeof(state), s.seq) == 0:
            C.llama_memory_seq_rm(self._mem, s.seq, 0, -1)  # no room (unified KV): evaluate instead
            return
        s.cached = list(key)  # _prepare trims it to the part shared with the prompt
        self.stats.prefix_hits += 1
        self.stats.prefix_tokens_restored += min(shared, len(prompt) - 1)

    def _used(self, active: list[_Task]) -> int:
        """KV cells held by resident sequences plus those that running tasks will still add."""
        cached = sum(len(s.cached) for s in self._seqs.values() if s.seq is not None)
        cached += sum(len(t.seq.cached) for t in active if t.seq.temporary)
        return cached + sum(len(t.feed) + len(t.force) + t.max_new for t in active)

    def _evict_one(self, active: list[_Task], keep: _Seq | None = None) -> bool:
        """Free the least recently used idle session's sequence (rebuilt on its next use)."""
        busy = {id(t.seq) for t in active}
        idle = [
            s
            for s in self._seqs.values()
            if s.seq is not None and not s.busy and id(s) not in busy and s is not keep
        ]
        if not idle:
            return False
        victim = min(idle, key=lambda s: s.last_used)
        self._save_prefix(victim)
        self._release_seq(victim)
        self.stats.sessions_evicted += 1
        return True

    def _release_seq(self, s: _Seq) -> None:
        if s.seq is not None:
            _llama().llama_memory_seq_rm(self._mem, s.seq, 0, -1)
            self._free_seq.append(s.seq)
            s.seq = None
        s.cached = []

    def _drop(self, s: _Seq) -> None:
        self._save_prefix(s)
        self._release_seq(s)
        if self._seqs.pop(s.sid, None) is not None:
            self.stats.sessions_alive -= 1

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


# --------------------------------------------------------------------------- helpers


def _last_error() -> str:
    """The most telling recent llama.cpp error line (the loader logs the cause first)."""
    for line in _errors:
        if "error loading model" in line:
            return line.split("error loading model", 1)[1].lstrip(": ")
    return _errors[-1] if _errors else "unknown error (enable debug logging of 'llama_cpp.native')"


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _logsumexp(row: np.ndarray) -> float:
    m = float(row.max())
    return m + float(np.log(np.exp(row - m, dtype=np.float64).sum()))


def _sample(row: np.ndarray, sp: SamplingParams | None, rng: np.random.Generator | None) -> int:
    if sp is None or sp.temperature <= 0 or rng is None:
        return int(np.argmax(row))
    logits = row.astype(np.float64) / sp.temperature
    k = sp.top_k if 0 < sp.top_k < logits.size else logits.size
    idx = np.argpartition(-logits, k - 1)[:k] if k < logits.size else np.arange(logits.size)
    idx = idx[np.argsort(-logits[idx])]
    p = np.exp(logits[idx] - logits[idx[0]])
    p /= p.sum()
    keep = p >= sp.min_p * p[0] if sp.min_p > 0 else np.ones_like(p, dtype=bool)
    if sp.top_p < 1.0:
        keep &= (np.cumsum(p) - p) < sp.top_p
    idx, p = idx[keep], p[keep]
    p /= p.sum()
    return int(idx[rng.choice(len(idx), p=p)])


def _metadata(C: Any, model: Any) -> dict[str, str]:
    out: dict[str, str] = {}
    size = 256
    for i in range(C.llama_model_meta_count(model)):
        kbuf = ctypes.create_string_buffer(size)
        n = C.llama_model_meta_key_by_index(model, i, kbuf, size)
        if n >= size:
            kbuf = ctypes.create_string_buffer(n + 1)
            C.llama_model_meta_key_by_index(model, i, kbuf, n + 1)
        vsize = 1024
        vbuf = ctypes.create_string_buffer(vsize)
        m = C.llama_model_meta_val_str_by_index(model, i, vbuf, vsize)
        if m >= vsize:
            vbuf = ctypes.create_string_buffer(m + 1)
            C.llama_model_meta_val_str_by_index(model, i, vbuf, m + 1)
        out[kbuf.value.decode(errors="replace")] = vbuf.value.decode(errors="replace")
    return out


# --------------------------------------------------------------------------- pool


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


def probe_load(path: str, n_gpu_layers: int = 0) -> tuple[bool, str]:
    """Can this llama.cpp build load `path`? Loads metadata and simulates allocation only.

    Used to light up in-process Llama Guard 4 once llama.cpp accepts dense llama4 GGUFs.
    """
    C = _llama()
    quiet_llama_logs()
    if not os.path.isfile(path):
        return False, f"no such file: {path}"
    mp = C.llama_model_default_params()
    mp.n_gpu_layers = n_gpu_layers
    mp.no_alloc = True
    mp.load_mode = C.LLAMA_LOAD_MODE_NONE  # the no-alloc (memory-fit) pass must not mmap
    with _backend_lock:  # one probe at a time, so the error lines are ours
        _errors.clear()
        model = C.llama_model_load_from_file(path.encode(), mp)
        why = _last_error()
    if not model:
        return False, f"llama.cpp refused it: {why}"
    try:
        arch = _metadata(C, model).get("general.architecture", "?")
    finally:
        C.llama_model_free(model)
    return True, f"loadable ({arch})"

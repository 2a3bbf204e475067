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

Here: `ModelOptions`, loading, and the public API; the worker loop is `scheduler.py`, KV sequences
and the prefix cache `sessions.py`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import ctypes
import itertools
import os
import queue
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import numpy as np

from gateway.engine.jobs import _STOP, ModelOptions, _Seq
from gateway.engine.native import EngineClosed, EngineError, _errors, _last_error, _llama, _metadata, quiet_llama_logs
from gateway.engine.sampling import SamplingParams
from gateway.engine.scheduler import Scheduler
from gateway.engine.sessions import _PrefixCache
from gateway.engine.stats import EngineStats, EvalResult


class LlamaModel(Scheduler):
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

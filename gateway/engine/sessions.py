"""KV sessions: the worker's view of a sequence, the public `Session` handle, the prefix cache.

`KVSessions` is the part of `LlamaModel` that owns sequence ids and KV cells on the worker thread:
claim, evict (least recently used idle session), release, and save/restore of KV states keyed by
their tokens (the cross-request prefix cache, `prefix_cache_mb`).
"""

from __future__ import annotations

import collections
import ctypes
import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np

from gateway.engine.jobs import _Seq, _Task
from gateway.engine.native import EngineError, _llama
from gateway.engine.stats import EngineStats

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


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i



class KVSessions:
    """Sequence ids and KV cells of one model (a mixin of `LlamaModel`, touched on its worker only)."""

    _ctx: Any
    _mem: Any
    _prefixes: _PrefixCache | None
    _seqs: dict[int, _Seq]
    _free_seq: list[int]
    _tmp_ids: itertools.count
    stats: EngineStats

    def _session(self, sid: int | None) -> _Seq:
        if sid is None:
            return _Seq(next(self._tmp_ids), temporary=True)
        s = self._seqs.get(sid)
        if s is None or s.closed:
            raise EngineError("session is closed")
        return s

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

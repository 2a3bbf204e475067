"""The llama.cpp binding: backend initialisation, log routing, engine errors, GGUF metadata, probe_load.

`llama_cpp` is imported lazily (`_llama()`), so the engine package imports without it.
"""

from __future__ import annotations

import collections
import ctypes
import logging
import os
import threading
from typing import Any

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



def _last_error() -> str:
    """The most telling recent llama.cpp error line (the loader logs the cause first)."""
    for line in _errors:
        if "error loading model" in line:
            return line.split("error loading model", 1)[1].lstrip(": ")
    return _errors[-1] if _errors else "unknown error (enable debug logging of 'llama_cpp.native')"



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

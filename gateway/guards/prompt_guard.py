"""Prompt Guard 2 (and Prompt Guard 1) on ONNX Runtime: injection / jailbreak scores on input.

llama.cpp has no DeBERTa graph, so the classifier runs on ONNX Runtime with the Rust `tokenizers`
tokenizer; torch is needed only by `scripts/convert_prompt_guard.py`, which writes the model
directory this guard loads:

    model.onnx | model.int8.onnx    exported classifier, inputs input_ids + attention_mask -> logits
    tokenizer.json                  the checkpoint's fast tokenizer
    metadata.json                   labels, max_length, special tokens, source

Scoring follows the model cards: softmax(logits / temperature), the last class (MALICIOUS for v2,
JAILBREAK for v1); for v1 the third-party roles (`indirect_roles`, default tool) use the indirect
injection score 1 - P(BENIGN), which for the two-class v2 models is the same number. Every selected
message is scored over its whole length in overlapping windows (score = max), the windows of all
new messages of a request go to the model together (sorted by length and cut where padding would
waste too much), and per-message results are cached by model + text hash, so a chat client that
re-sends its history only pays for the new turns. Inference runs in a worker thread: the event loop
never blocks. Concurrent requests share model calls: new texts wait at most `batch_wait_ms` (or
until a worker is free) and all texts waiting then go to the model in one job, so under load each
call carries up to `max_batch_windows` windows instead of one request's few.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from cachetools import TTLCache

from gateway.guards.base import Guard, GuardConfigError, GuardInput, register
from gateway.types import Message, Verdict

if TYPE_CHECKING:  # optional runtime deps (the `promptguard` extra), imported lazily
    import onnxruntime
    import tokenizers

log = logging.getLogger("guardgate.guards.prompt_guard")

METADATA_FILE = "metadata.json"
TOKENIZER_FILE = "tokenizer.json"
MODEL_FILES = {"fp32": "model.onnx", "int8": "model.int8.onnx"}
METADATA_FORMAT = "guardgate.prompt_guard/1"

PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "dml": "DmlExecutionProvider",
    "directml": "DmlExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "migraphx": "MIGraphXExecutionProvider",
}
GRAPH_OPT_LEVELS = ("disabled", "basic", "extended", "all")

# Role groups a policy can name in `messages`. "system" covers the newer "developer" role.
ROLE_GROUPS: dict[str, frozenset[str]] = {
    "user": frozenset({"user"}),
    "tool": frozenset({"tool"}),
    "system": frozenset({"system", "developer"}),
    "developer": frozenset({"developer"}),
    "assistant": frozenset({"assistant"}),
    "all": frozenset({"system", "developer", "user", "assistant", "tool"}),
}

# Step keys that belong to the policy chain, not to this guard; tolerated in the options.
CHAIN_KEYS = frozenset(
    {"guard", "name", "id", "action", "on_error", "timeout", "timeout_ms", "parallel_with_upstream",
     "mode", "stage", "when", "description"}
)


# --------------------------------------------------------------------------- model files


def resolve_model_dir(name_or_path: str | os.PathLike[str]) -> tuple[Path, str | None]:
    """A model option -> (model directory, explicit .onnx file name or None).

    An existing path is used as is (a directory, or an .onnx file inside one). Anything else is a
    manifest name: `gateway.models.resolve_model` gives its file (an entry whose `file` is e.g.
    `prompt-guard-2-86m/model.int8.onnx`); an entry with no file is looked up as the directory
    the converter writes by default, `<models dir>/<name>/`.
    """
    p = Path(name_or_path).expanduser()
    if not p.exists():
        from gateway.models import models_dir, resolve_model

        try:
            p = Path(resolve_model(str(name_or_path)))
        except Exception as e:
            converted = models_dir() / str(name_or_path)
            if not (converted / METADATA_FILE).is_file():
                raise GuardConfigError(
                    f"prompt_guard: cannot resolve model {name_or_path!r}: {e} (convert a checkpoint with "
                    f"scripts/convert_prompt_guard.py --name {name_or_path} to put it in {converted})"
                ) from e
            p = converted
    if p.is_file() and p.suffix == ".onnx":
        return p.parent, p.name
    if not p.is_dir():
        raise GuardConfigError(f"prompt_guard: model {str(p)!r} is not a model directory or .onnx file")
    return p, None


@dataclass(slots=True)
class ModelInfo:
    """What `metadata.json` says about a converted checkpoint (with defaults for a bare export)."""

    directory: Path
    model_file: Path
    precision: str  # fp32 | int8 | custom
    labels: list[str]
    max_length: int = 512
    model_id: str = ""
    cls_token_id: int | None = None
    sep_token_id: int | None = None
    pad_token_id: int | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """Identity of the scoring function for the verdict cache: model, file, size, mtime."""
        st = self.model_file.stat()
        return f"{self.model_id}|{self.model_file.name}|{st.st_size}|{int(st.st_mtime)}"

    @classmethod
    def load(cls, directory: Path, precision: str = "auto", model_file: str | None = None,
             prefer_fp32: bool = False) -> ModelInfo:
        meta_path = directory / METADATA_FILE
        meta: dict[str, Any] = {}
        if meta_path.exists():
            try:
                meta = json.loads(meta_path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise GuardConfigError(f"prompt_guard: unreadable {meta_path}: {e}") from e
        if meta.get("format", METADATA_FORMAT) != METADATA_FORMAT:
            raise GuardConfigError(f"prompt_guard: {meta_path} is {meta.get('format')!r}, not {METADATA_FORMAT}")
        files = {**MODEL_FILES, **(meta.get("files") or {})}
        if model_file is not None:
            chosen, prec = directory / model_file, "custom"
            for k, v in files.items():
                if v == model_file:
                    prec = k
        else:
            if precision == "auto":
                order = ["fp32", "int8"] if prefer_fp32 else ["int8", "fp32"]
            elif precision in ("int8", "fp32"):
                order = [precision]
            else:
                raise GuardConfigError(f"prompt_guard: precision must be auto, int8 or fp32: {precision!r}")
            found = [(p, directory / files[p]) for p in order if (directory / files[p]).exists()]
            if not found:
                want = " or ".join(files[p] for p in order)
                raise GuardConfigError(f"prompt_guard: {directory} has no {want}")
            prec, chosen = found[0]
        if not chosen.exists():
            raise GuardConfigError(f"prompt_guard: {chosen} does not exist")
        if not (directory / TOKENIZER_FILE).exists():
            raise GuardConfigError(f"prompt_guard: {directory} has no {TOKENIZER_FILE}")
        labels = meta.get("labels")
        if not labels:
            n = int(meta.get("num_labels") or 2)
            labels = ["BENIGN", "MALICIOUS"] if n == 2 else ["BENIGN", "INJECTION", "JAILBREAK"][:n]
        special = meta.get("special_tokens") or {}
        return cls(
            directory=directory,
            model_file=chosen,
            precision=prec,
            labels=[str(x) for x in labels],
            max_length=int(meta.get("max_length") or 512),
            model_id=str(meta.get("model_id") or directory.name),
            cls_token_id=special.get("cls_token_id"),
            sep_token_id=special.get("sep_token_id"),
            pad_token_id=special.get("pad_token_id"),
            raw=meta,
        )


def load_tokenizer(path: Path) -> tokenizers.Tokenizer:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    tok.no_truncation()  # windows are cut here, never by the tokenizer
    tok.no_padding()
    return tok


def make_session(
    model_file: Path, providers: Sequence[str] = ("cpu",), threads: int = 0,
    graph_optimization: str = "all", allow_spinning: bool = False,
) -> onnxruntime.InferenceSession:
    """An ONNX Runtime session with the first available of `providers` (aliases or EP names)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    wanted = [PROVIDER_ALIASES.get(p.lower(), p) for p in providers]
    usable = [p for p in wanted if p in available]
    if not usable:
        raise GuardConfigError(
            f"prompt_guard: none of the execution providers {wanted} is available "
            f"(this onnxruntime has {available})"
        )
    if len(usable) < len(wanted):
        log.warning("prompt_guard: execution providers %s unavailable, using %s",
                    [p for p in wanted if p not in available], usable)
    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[graph_optimization]
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Spinning workers burn the cores between requests, which the event loop and the other guards
    # (llama.cpp) on the same machine need; a few hundred microseconds of wake-up is the price.
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
    so.log_severity_level = 3
    return ort.InferenceSession(str(model_file), sess_options=so, providers=usable)


# --------------------------------------------------------------------------- scoring core


class InputTooLong(RuntimeError):
    """A request carries more new tokens than the step's `max_tokens`."""


@dataclass(slots=True, frozen=True)
class TextScore:
    """The result for one text: max over its windows, and where the worst window lies."""

    score: float
    tokens: int  # content tokens (no special tokens)
    window_scores: tuple[float, ...]
    worst_window: int
    worst_tokens: tuple[int, int]  # [start, end) token indices of the worst window
    worst_chars: tuple[int, int]  # [start, end) character offsets in the original text

    def record(self) -> dict[str, Any]:
        return {
            "window": self.worst_window,
            "tokens": list(self.worst_tokens),
            "chars": list(self.worst_chars),
            "score": round(self.score, 6),
        }


@dataclass(slots=True)
class BatchStats:
    inference_calls: int = 0
    windows: int = 0
    tokens: int = 0  # tokens fed to the model, special tokens included, padding excluded
    padded_tokens: int = 0  # batch rows x padded length, summed over calls


@dataclass(slots=True)
class _Window:
    text: int
    index: int
    start: int
    end: int
    ids: np.ndarray


def window_starts(n_tokens: int, content: int, stride: int) -> list[int]:
    """Start offsets of windows of `content` tokens, `stride` apart, the last one flush with the end.

    Every token lies in at least one window, and any span of up to `content - stride + 1`
    tokens (the overlap + 1) lies wholly inside one.
    """
    if n_tokens <= content:
        return [0]
    last = n_tokens - content
    starts = list(range(0, last + 1, stride))
    if starts[-1] != last:
        starts.append(last)
    return starts


def harden_whitespace(tokenizer: tokenizers.Tokenizer, text: str) -> tuple[str, list[int]]:
    """Meta's `preprocess_text_for_promptguard` (guards.md §2.3), plus a map back to `text`.

    Whitespace is removed, the compacted text tokenized, and the text rebuilt token by token with a
    single space only where the original had whitespace before the token's first character: this
    undoes "i g n o r e  p r e v i o u s" splitting. Returns the rebuilt text and, for each of its
    characters, the index of the original character it came from (for audit offsets).
    """
    index_map = [i for i, ch in enumerate(text) if not ch.isspace()]
    cleaned = "".join(text[i] for i in index_map)
    if not cleaned:
        return "", []
    enc = tokenizer.encode(cleaned, add_special_tokens=False)
    out: list[str] = []
    origin: list[int] = []
    last_end = 0
    for s, e in enc.offsets:
        s = max(s, last_end)
        if e <= s:
            continue
        o = index_map[s]
        if o > 0 and text[o - 1].isspace():
            out.append(" ")
            origin.append(o - 1)
        out.append(cleaned[s:e])
        origin.extend(index_map[s:e])
        last_end = e
    return "".join(out), origin


class PromptGuardScorer:
    """Synchronous, thread-safe scoring core: tokenize, cut windows, batch, run, aggregate.

    The guard calls it from a worker thread; the benchmark and the tests call it directly.
    """

    def __init__(self, info: ModelInfo, session: onnxruntime.InferenceSession,
                 tokenizer: tokenizers.Tokenizer, *, window_tokens: int | None = None,
                 stride: int | None = None, temperature: float = 1.0, preprocess: bool = True,
                 max_batch_windows: int = 16, max_padding_ratio: float = 1.5) -> None:
        self.info = info
        self.session = session
        self.tokenizer = tokenizer
        self.temperature = float(temperature)
        self.preprocess = bool(preprocess)
        self.max_batch_windows = int(max_batch_windows)
        self.max_padding_ratio = float(max_padding_ratio)
        self.prefix, self.suffix = self._special_tokens()
        pad = info.pad_token_id if info.pad_token_id is not None else tokenizer.token_to_id("[PAD]")
        self.pad_id = int(pad or 0)
        self.window_tokens = int(window_tokens or info.max_length)
        self.content = self.window_tokens - len(self.prefix) - len(self.suffix)
        if self.window_tokens > info.max_length or self.content < 8:
            raise GuardConfigError(
                f"prompt_guard: window_tokens must be between {8 + len(self.prefix) + len(self.suffix)} "
                f"and the model's max_length {info.max_length}, not {self.window_tokens}"
            )
        self.stride = int(stride) if stride else max(1, self.content - 64)
        if not 1 <= self.stride <= self.content:
            raise GuardConfigError(
                f"prompt_guard: stride must be between 1 and {self.content} (the window's content tokens; "
                f"a larger stride would skip tokens), not {self.stride}"
            )
        if self.max_batch_windows < 1 or self.max_padding_ratio < 0 or self.temperature <= 0:
            raise GuardConfigError(
                "prompt_guard: needs max_batch_windows >= 1, max_padding_ratio >= 0, temperature > 0"
            )
        self.input_names = [i.name for i in session.get_inputs()]
        outputs = [o.name for o in session.get_outputs()]
        self.output_name = "logits" if "logits" in outputs else outputs[0]
        self.num_labels = len(info.labels)

    def _special_tokens(self) -> tuple[list[int], list[int]]:
        """The ids the tokenizer's post-processor puts around a single text ([CLS] ... [SEP])."""
        if self.info.cls_token_id is not None and self.info.sep_token_id is not None:
            return [int(self.info.cls_token_id)], [int(self.info.sep_token_id)]
        bare = self.tokenizer.encode("a", add_special_tokens=False).ids
        full = self.tokenizer.post_process(self.tokenizer.encode("a", add_special_tokens=False)).ids
        for i in range(len(full) - len(bare) + 1):
            if full[i:i + len(bare)] == bare:
                return list(full[:i]), list(full[i + len(bare):])
        return [], []

    @property
    def config_key(self) -> str:
        """What besides the model changes a score: part of the verdict cache key."""
        return (f"w{self.window_tokens}s{self.stride}t{self.temperature!r}"
                f"p{int(self.preprocess)}")

    # ---- tokenization and windows

    def _encode(self, texts: Sequence[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
        prepared: list[str] = []
        origins: list[list[int] | None] = []
        for t in texts:
            if self.preprocess:
                rebuilt, origin = harden_whitespace(self.tokenizer, t)
                prepared.append(rebuilt)
                origins.append(origin)
            else:
                prepared.append(t)
                origins.append(None)
        encs = self.tokenizer.encode_batch(prepared, add_special_tokens=False)
        out = []
        for enc, origin, src in zip(encs, origins, texts, strict=True):
            offsets = enc.offsets
            if origin is not None:
                n = len(origin)
                offsets = [
                    (origin[s], origin[e - 1] + 1) if s < e <= n else (len(src), len(src)) for s, e in offsets
                ]
            out.append((enc.ids, offsets))
        return out

    def windows(self, ids: Sequence[int]) -> list[tuple[int, int]]:
        n = len(ids)
        return [(s, min(s + self.content, n)) for s in window_starts(n, self.content, self.stride)]

    def _groups(self, wins: list[_Window]) -> list[list[_Window]]:
        """Sort windows by length and cut them into model calls: at most `max_batch_windows` rows,
        and no row padded to more than `max_padding_ratio` x its own length (0 = no such cut).

        On a CPU a short prompt padded to 512 tokens costs as much as a full window, so mixing
        lengths in one call is a loss there; on a GPU, where a call costs about the same at any
        batch size, set the ratio to 0 (one call per request)."""
        order = sorted(wins, key=lambda w: len(w.ids), reverse=True)
        groups: list[list[_Window]] = []
        for w in order:
            if groups:
                cur = groups[-1]
                fits = len(cur) < self.max_batch_windows and (
                    self.max_padding_ratio <= 0 or len(cur[0].ids) <= self.max_padding_ratio * len(w.ids)
                )
                if fits:
                    cur.append(w)
                    continue
            groups.append([w])
        return groups

    # ---- inference

    def run_logits(self, rows: Sequence[np.ndarray]) -> np.ndarray:
        """One model call on windows (ids with special tokens), right-padded into one batch."""
        width = max(len(r) for r in rows)
        ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = r
            mask[i, : len(r)] = 1
        feed: dict[str, np.ndarray] = {}
        for name in self.input_names:
            if name == "input_ids":
                feed[name] = ids
            elif name == "attention_mask":
                feed[name] = mask
            elif name == "token_type_ids":
                feed[name] = np.zeros_like(ids)
            else:
                raise RuntimeError(f"prompt_guard: unexpected model input {name!r}")
        logits = self.session.run([self.output_name], feed)[0]
        return np.asarray(logits, dtype=np.float64)

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        z = logits / self.temperature
        z = z - z.max(axis=-1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=-1, keepdims=True)

    def class_scores(self, probs: np.ndarray, indirect: bool) -> np.ndarray:
        """MALICIOUS / JAILBREAK = last class; indirect injection = 1 - P(BENIGN) (v1 card)."""
        if indirect:
            return 1.0 - probs[:, 0]
        return probs[:, -1]

    def score_texts(self, texts: Sequence[str], indirect: Sequence[bool] | None = None,
                    stats: BatchStats | None = None, max_tokens: int = 0) -> list[TextScore | None]:
        """Scores of `texts` (None for a text with no tokens); all windows in as few calls as the
        batching rules allow. More than `max_tokens` tokens in all (0 = no limit) raises InputTooLong."""
        indirect = list(indirect) if indirect is not None else [False] * len(texts)
        (out,) = self.score_requests([(texts, indirect)], stats, max_tokens)
        if isinstance(out, InputTooLong):
            raise out
        return out

    def score_requests(self, requests: Sequence[tuple[Sequence[str], Sequence[bool]]],
                       stats: BatchStats | None = None, max_tokens: int = 0
                       ) -> list[list[TextScore | None] | InputTooLong]:
        """`score_texts` for several requests at once: the windows of all of them share model calls
        (fewer, fuller calls under concurrent traffic), while `max_tokens` still applies to each
        request alone: one over it gets InputTooLong in its place and the others are scored."""
        stats = stats if stats is not None else BatchStats()
        encoded: list[tuple[list[int], list[tuple[int, int]]]] = []
        indirect: list[bool] = []
        owner: list[int] = []  # request index of each text
        results: list[list[TextScore | None] | InputTooLong] = []
        for r, (req_texts, req_indirect) in enumerate(requests):
            encoded_r = self._encode(req_texts)
            total = sum(len(ids) for ids, _ in encoded_r)
            if max_tokens and total > max_tokens:
                results.append(InputTooLong(f"{total} new tokens to score, over max_tokens={max_tokens}"))
                continue
            results.append([])
            encoded.extend(encoded_r)
            indirect.extend(req_indirect)
            owner.extend([r] * len(req_texts))
        scored = self._score_encoded(encoded, indirect, stats)
        for r, score in zip(owner, scored, strict=True):
            out = results[r]
            assert isinstance(out, list)
            out.append(score)
        return results

    def _score_encoded(self, encoded: Sequence[tuple[list[int], list[tuple[int, int]]]],
                       indirect: Sequence[bool], stats: BatchStats) -> list[TextScore | None]:
        wins: list[_Window] = []
        spans: list[list[tuple[int, int]]] = []
        for t, (ids, _) in enumerate(encoded):
            sp = self.windows(ids) if ids else []
            spans.append(sp)
            for j, (s, e) in enumerate(sp):
                row = np.asarray([*self.prefix, *ids[s:e], *self.suffix], dtype=np.int64)
                wins.append(_Window(t, j, s, e, row))
        scores: list[list[float]] = [[0.0] * len(sp) for sp in spans]
        for group in self._groups(wins):
            logits = self.run_logits([w.ids for w in group])
            probs = self.probabilities(logits)
            stats.inference_calls += 1
            stats.windows += len(group)
            stats.tokens += sum(len(w.ids) for w in group)
            stats.padded_tokens += len(group) * max(len(w.ids) for w in group)
            for w, p in zip(group, probs, strict=True):
                scores[w.text][w.index] = float(self.class_scores(p[None, :], indirect[w.text])[0])
        out: list[TextScore | None] = []
        for t, (ids, offsets) in enumerate(encoded):
            if not spans[t]:
                out.append(None)
                continue
            ws = scores[t]
            j = int(np.argmax(ws))
            s, e = spans[t][j]
            out.append(TextScore(
                score=ws[j], tokens=len(ids), window_scores=tuple(ws), worst_window=j,
                worst_tokens=(s, e), worst_chars=(offsets[s][0], offsets[e - 1][1]),
            ))
        return out


# --------------------------------------------------------------------------- the guard


@dataclass(slots=True)
class _Queued:
    """One request's new texts waiting for a worker job (the guard batches requests into jobs)."""

    keys: list[tuple[str, ...]]
    texts: list[str]
    indirect: list[bool]
    stats: BatchStats  # the request's figures, filled from its job's when it ends


def _opt_roles(value: Any) -> frozenset[str]:
    vals = [value] if isinstance(value, str) else list(value or [])
    roles: set[str] = set()
    for v in vals:
        if v not in ROLE_GROUPS:
            raise GuardConfigError(
                f"prompt_guard: unknown message group {v!r} (known: {', '.join(ROLE_GROUPS)})"
            )
        roles |= ROLE_GROUPS[v]
    return frozenset(roles)


@register("prompt_guard")
class PromptGuard(Guard):
    """Prompt Guard 2 / 1 as an input-stage guard.

    Options (policy step keys):
      model            model directory / .onnx file / manifest name (required)
      precision        auto | int8 | fp32 (auto: int8 on CPU, fp32 when a GPU provider leads)
      providers        execution providers in preference order: cpu, cuda, coreml, tensorrt, ... (or EP names)
      threads          intra-op threads per inference (0 = onnxruntime's default: all cores)
      workers          concurrent inference calls (default 1: calls queue, each uses `threads`)
      graph_optimization  all | extended | basic | disabled
      allow_spinning   let idle ORT threads spin (lower latency, burns CPU; default false)
      threshold        flag at score >= threshold (default 0.9, LlamaFirewall's)
      temperature      softmax temperature (default 1.0)
      messages         which messages to score: user, tool, system, assistant, all (default [user, tool])
      indirect_roles   roles scored as third-party data: 1 - P(BENIGN) (v1 models; default [tool])
      fields           also score the request's other rendered fields (tool definitions, response_format,
                       documents, ...: GuardInput.fields) as third-party data, like tool output (default true)
      window_tokens    tokens per window incl. special tokens (default: the model's max_length, 512)
      stride           tokens between window starts (default window - 2 - 64: 64 tokens overlap)
      preprocess       whitespace hardening of guards.md §2.3 (default true)
      max_batch_windows  rows per model call (default 16)
      max_padding_ratio  pad no window past this x its length; else a new call (default 1.5; 0 = one call)
      max_tokens       more new tokens than this in a request: error verdict (default 65536; 0 = no limit)
      cache_size, cache_ttl_s  verdict cache bound (default 4096 texts, 3600 s; size 0 = no cache)
      batch_wait_ms    how long new texts wait for other requests' to share a model call when a worker
                       is idle (default 2; 0 = send at once); while all workers are busy texts queue
                       and go together when one is free
      cross_request_batching  false: one job per request, as before batch_wait_ms (default true)
    """

    name = "prompt_guard"
    stages = frozenset({"input"})

    OPTIONS = frozenset({
        "model", "precision", "model_file", "providers", "threads", "workers", "graph_optimization",
        "allow_spinning", "threshold", "temperature", "messages", "indirect_roles", "window_tokens",
        "stride", "preprocess", "max_batch_windows", "max_padding_ratio", "max_tokens", "cache_size",
        "cache_ttl_s", "fields", "batch_wait_ms", "cross_request_batching",
    })

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        unknown = set(options) - self.OPTIONS - CHAIN_KEYS
        if unknown:
            raise GuardConfigError(
                f"prompt_guard: unknown option(s) {', '.join(sorted(unknown))} "
                f"(known: {', '.join(sorted(self.OPTIONS))})"
            )
        if not options.get("model"):
            raise GuardConfigError("prompt_guard: needs option 'model' (directory, .onnx file or name)")
        try:
            self.threshold = float(options.get("threshold", 0.9))
            self.temperature = float(options.get("temperature", 1.0))
            self.threads = int(options.get("threads", 0))
            self.workers = int(options.get("workers", 1))
            self.max_tokens = int(options.get("max_tokens", 65536))
            cache_size = int(options.get("cache_size", 4096))
            cache_ttl = float(options.get("cache_ttl_s", 3600.0))
            self.batch_wait_s = float(options.get("batch_wait_ms", 2.0)) / 1000.0
        except (TypeError, ValueError) as e:
            raise GuardConfigError(f"prompt_guard: bad numeric option: {e}") from e
        if not 0.0 <= self.threshold <= 1.0:
            raise GuardConfigError(f"prompt_guard: threshold must be in [0, 1], not {self.threshold}")
        if (self.workers < 1 or self.threads < 0 or self.max_tokens < 0 or cache_size < 0 or cache_ttl <= 0
                or not 0.0 <= self.batch_wait_s <= 1.0):
            raise GuardConfigError("prompt_guard: workers >= 1, threads >= 0, max_tokens >= 0, "
                                   "cache_size >= 0, cache_ttl_s > 0, 0 <= batch_wait_ms <= 1000")
        self.roles = _opt_roles(options.get("messages", ["user", "tool"]))
        self.indirect_roles = _opt_roles(options.get("indirect_roles", ["tool"]))
        self.scan_fields = bool(options.get("fields", True))
        providers = options.get("providers", ["cpu"])
        self.providers = [providers] if isinstance(providers, str) else [str(p) for p in providers]
        if not self.providers:
            raise GuardConfigError("prompt_guard: providers must name at least one execution provider")
        self.graph_optimization = str(options.get("graph_optimization", "all"))
        if self.graph_optimization not in GRAPH_OPT_LEVELS:
            raise GuardConfigError(f"prompt_guard: graph_optimization must be one of {GRAPH_OPT_LEVELS}")
        self.precision = str(options.get("precision", "auto"))
        if self.precision not in ("auto", "int8", "fp32"):
            raise GuardConfigError(f"prompt_guard: precision must be auto, int8 or fp32: {self.precision!r}")
        # The model is found and loaded by start(): a policy naming a model that is not on this
        # machine still loads (its step then fails its checks, and on_error decides).
        self.info: ModelInfo | None = None
        self._scorer_opts: dict[str, Any] = {
            "window_tokens": options.get("window_tokens"),
            "stride": options.get("stride"),
            "temperature": self.temperature,
            "preprocess": bool(options.get("preprocess", True)),
            "max_batch_windows": int(options.get("max_batch_windows", 16)),
            "max_padding_ratio": float(options.get("max_padding_ratio", 1.5)),
        }
        self._cache: TTLCache[tuple[str, ...], TextScore | None] | None = (
            TTLCache(maxsize=cache_size, ttl=cache_ttl) if cache_size else None
        )
        self.scorer: PromptGuardScorer | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._start_lock = threading.Lock()
        self._pending: dict[tuple[str, ...], asyncio.Future[TextScore | None]] = {}
        self.cross_batch = bool(options.get("cross_request_batching", True))
        self._queue: list[_Queued] = []  # requests' new texts waiting for a model job
        self._in_flight = 0  # jobs running in the executor
        self._timer: asyncio.TimerHandle | None = None
        self._model_key = ""
        self.stats = {"inference_calls": 0, "windows": 0, "tokens": 0, "cache_hits": 0, "texts_scored": 0,
                      "jobs": 0, "requests_batched": 0}

    # ---- lifecycle

    def _load(self) -> PromptGuardScorer:
        with self._start_lock:
            if self.scorer is None:
                spin = bool(self.options.get("allow_spinning", False))
                directory, model_file = resolve_model_dir(self.options["model"])
                first = PROVIDER_ALIASES.get(self.providers[0].lower(), self.providers[0])
                info = ModelInfo.load(directory, self.precision, self.options.get("model_file") or model_file,
                                      prefer_fp32=first != "CPUExecutionProvider")
                session = make_session(info.model_file, self.providers, self.threads,
                                       self.graph_optimization, spin)
                tok = load_tokenizer(info.directory / TOKENIZER_FILE)
                self.scorer = PromptGuardScorer(info, session, tok, **self._scorer_opts)
                self.info = info
                self._model_key = info.key
                log.info("prompt_guard: loaded %s (%s, %s, %d labels)", info.model_file,
                         info.precision, session.get_providers()[0], len(info.labels))
            return self.scorer

    async def start(self) -> None:
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=self.workers, thread_name_prefix="prompt-guard")
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

    async def score(self, texts: Sequence[str], indirect: Sequence[bool]
                    ) -> tuple[list[TextScore | None], list[bool], BatchStats]:
        """Scores of `texts`: cache first, the rest in one worker job. Returns (scores, cached, stats)."""
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
            self._queue.append(_Queued(new_keys, [texts[todo[k]] for k in new_keys],
                                       [indirect[todo[k]] for k in new_keys], stats))
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
        windows = self._scorer_opts["max_batch_windows"]
        if self.batch_wait_s <= 0 or sum(len(q.keys) for q in self._queue) >= windows:
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
            self._executor, self.scorer.score_requests, [(q.texts, q.indirect) for q in batch],
            job_stats, self.max_tokens,
        )
        # The callback runs on the loop even if a request is cancelled meanwhile, so the cache is
        # filled and other requests waiting on the same texts are woken.
        job.add_done_callback(lambda f: self._job_done(batch, job_stats, f, loop))

    def _job_done(self, batch: list[_Queued], job_stats: BatchStats,
                  job: asyncio.Future[list[list[TextScore | None] | InputTooLong]],
                  loop: asyncio.AbstractEventLoop) -> None:
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

    def _settle(self, keys: list[tuple[str, ...]],
                result: list[TextScore | None] | BaseException | None) -> None:
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

    # ---- the Guard protocol

    def selected(self, messages: Sequence[Message]) -> list[tuple[int, Message]]:
        return [(i, m) for i, m in enumerate(messages) if m.role in self.roles and m.text]

    async def check(self, inp: GuardInput) -> Verdict:
        t0 = time.perf_counter()
        if inp.stage != "input":
            return self.verdict(t0, error=f"prompt_guard checks the input stage only, not {inp.stage!r}")
        chosen = self.selected(inp.messages)
        if self.scan_fields:  # untrusted, like a tool's output; index -1: not one of the messages
            chosen += [(-1, Message.of("tool", text)) for _, text in inp.fields]
        try:
            scores, cached, stats = await self.score(
                [m.text for _, m in chosen], [m.role in self.indirect_roles for _, m in chosen]
            )
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a guard that did not run is never a pass: the step's on_error decides
            log.warning("prompt_guard failed: %s", e, exc_info=not isinstance(e, InputTooLong))
            return self.verdict(t0, error=f"{type(e).__name__}: {e}")
        per_message: list[dict[str, Any]] = []
        worst: tuple[float, int, str, TextScore] | None = None
        for (i, m), s, c in zip(chosen, scores, cached, strict=True):
            if s is None:
                continue
            per_message.append({"index": i, "role": m.role, "score": round(s.score, 6), "tokens": s.tokens,
                                "windows": len(s.window_scores), "cached": c})
            if worst is None or s.score > worst[0]:
                worst = (s.score, i, m.role, s)
        score = worst[0] if worst else 0.0
        flagged = score >= self.threshold
        info = self.scorer.info if self.scorer is not None else None
        labels = info.labels if info else ["BENIGN", "MALICIOUS"]
        label = labels[-1]  # MALICIOUS (v2), JAILBREAK (v1)
        if worst is not None and len(labels) > 2 and worst[2] in self.indirect_roles:
            label = labels[1]  # v1's indirect-injection score, 1 - P(BENIGN): INJECTION
        details: dict[str, Any] = {
            "model": info.model_id if info else str(self.options["model"]),
            "precision": info.precision if info else self.precision,
            "threshold": self.threshold,
            "messages": per_message,
            "inference_calls": stats.inference_calls,
            "windows_scored": stats.windows,
            "cache_hits": sum(cached),
        }
        reason = ""
        if worst is not None:
            details["worst"] = {"message": worst[1], "role": worst[2], **worst[3].record()}
            reason = f"{label} {worst[0]:.3f} in {worst[2]} message {worst[1]}"
        return self.verdict(
            t0, flagged=flagged, score=score, categories=[label] if flagged else [], reason=reason,
            tokens_evaluated=stats.tokens, details=details,
        )


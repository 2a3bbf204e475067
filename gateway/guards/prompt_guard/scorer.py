"""The Prompt Guard scoring core: tokenize, cut overlapping windows, batch them, run ONNX, aggregate."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from gateway.guards.base import GuardConfigError
from gateway.guards.prompt_guard.metadata import ModelInfo

if TYPE_CHECKING:
    import onnxruntime
    import tokenizers



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

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
import logging
import time
from collections.abc import Sequence
from typing import Any

from gateway.guard_engine import client as engine_client
from gateway.guard_engine.client import EngineClient, EngineUnavailable
from gateway.guard_engine.protocol import AUTO, ENGINE, HEALTH, LOCAL, PG_SCORE, engine_url, is_engine_url
from gateway.guards.base import NO_RESOURCES, Guard, GuardConfigError, GuardInput, GuardResources, register
from gateway.guards.prompt_guard import metadata as md
from gateway.guards.prompt_guard.batcher import WindowBatcher
from gateway.guards.prompt_guard.scorer import BatchStats, InputTooLong, PromptGuardScorer, TextScore
from gateway.types import Message, Verdict

log = logging.getLogger("guardgate.guards.prompt_guard")

ENGINE_LOAD_TIMEOUT_S = 120.0  # the first call to the engine loads the model there

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
      backend          where the model runs: auto (the machine's shared guard engine when `serve --workers N`
                       started one, else in-process), local (in-process), engine (the shared engine), or an
                       engine URL (unix:/path.sock, http://host:port); a dead or slow engine is an error verdict
      engine_timeout_s  deadline of one call to the engine (default 10)
    """

    name = "prompt_guard"
    stages = frozenset({"input"})

    OPTIONS = frozenset({
        "model", "precision", "model_file", "providers", "threads", "workers", "graph_optimization",
        "allow_spinning", "threshold", "temperature", "messages", "indirect_roles", "window_tokens",
        "stride", "preprocess", "max_batch_windows", "max_padding_ratio", "max_tokens", "cache_size",
        "cache_ttl_s", "fields", "batch_wait_ms", "cross_request_batching", "backend", "engine_timeout_s",
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
        if self.graph_optimization not in md.GRAPH_OPT_LEVELS:
            raise GuardConfigError(f"prompt_guard: graph_optimization must be one of {md.GRAPH_OPT_LEVELS}")
        backend = str(options.get("backend", AUTO))
        if backend not in (AUTO, LOCAL, ENGINE) and not is_engine_url(backend):
            raise GuardConfigError(f"prompt_guard: backend must be auto, local, engine or an engine URL: {backend!r}")
        try:
            self.engine_url = engine_url(backend)
            self.engine_timeout_s = float(options.get("engine_timeout_s", 10.0))
        except ValueError as e:
            raise GuardConfigError(f"prompt_guard: {e}") from e
        self._engine: EngineClient | None = None
        self._engine_info: dict[str, Any] | None = None
        self._engine_options = {k: v for k, v in options.items()
                                if k not in CHAIN_KEYS and k not in ("backend", "engine_timeout_s")}
        self.precision = str(options.get("precision", "auto"))
        if self.precision not in ("auto", "int8", "fp32"):
            raise GuardConfigError(f"prompt_guard: precision must be auto, int8 or fp32: {self.precision!r}")
        # The model is found and loaded by start(): a policy naming a model that is not on this
        # machine still loads (its step then fails its checks, and on_error decides).
        self.info: md.ModelInfo | None = None
        self._scorer_opts: dict[str, Any] = {
            "window_tokens": options.get("window_tokens"),
            "stride": options.get("stride"),
            "temperature": self.temperature,
            "preprocess": bool(options.get("preprocess", True)),
            "max_batch_windows": int(options.get("max_batch_windows", 16)),
            "max_padding_ratio": float(options.get("max_padding_ratio", 1.5)),
        }
        self._batcher = WindowBatcher(
            self._load,
            workers=self.workers,
            max_tokens=self.max_tokens,
            batch_wait_s=self.batch_wait_s,
            max_batch_windows=self._scorer_opts["max_batch_windows"],
            cross_batch=bool(options.get("cross_request_batching", True)),
            cache_size=cache_size,
            cache_ttl_s=cache_ttl,
        )

    @property
    def scorer(self) -> PromptGuardScorer | None:
        return self._batcher.scorer

    @property
    def stats(self) -> dict[str, int]:
        return self._batcher.stats

    # ---- lifecycle

    def _load(self) -> PromptGuardScorer:
        """Find and load the model (in the batcher's worker thread, once)."""
        spin = bool(self.options.get("allow_spinning", False))
        directory, model_file = md.resolve_model_dir(self.options["model"])
        first = md.PROVIDER_ALIASES.get(self.providers[0].lower(), self.providers[0])
        info = md.ModelInfo.load(directory, self.precision, self.options.get("model_file") or model_file,
                              prefer_fp32=first != "CPUExecutionProvider")
        session = md.make_session(info.model_file, self.providers, self.threads,
                               self.graph_optimization, spin)
        tok = md.load_tokenizer(info.directory / md.TOKENIZER_FILE)
        scorer = PromptGuardScorer(info, session, tok, **self._scorer_opts)
        self.info = info
        log.info("prompt_guard: loaded %s (%s, %s, %d labels)", info.model_file,
                 info.precision, session.get_providers()[0], len(info.labels))
        return scorer

    async def start(self, resources: GuardResources = NO_RESOURCES) -> None:
        if self.engine_url is not None:  # the model lives in the engine: have it loaded there now
            if self._engine is None:
                self._engine = engine_client.acquire(self.engine_url)
                try:
                    await self._engine.call(HEALTH, None, self.engine_timeout_s)  # there at all?
                    await self._engine_score([], [], max(self.engine_timeout_s, ENGINE_LOAD_TIMEOUT_S))
                except EngineUnavailable as e:
                    if e.status:  # the engine answered: the model does not load there (the step is unavailable)
                        await self.aclose()
                        raise
                    log.warning("prompt_guard: %s (checks fail until it answers)", e)
            return
        await self._batcher.start()

    async def aclose(self) -> None:
        if self._engine is not None:
            await engine_client.release(self._engine)
            self._engine = None
        await self._batcher.aclose()

    def status(self) -> dict[str, Any]:
        if self._engine is not None:
            return self._engine.status()
        return super().status()

    async def score(self, texts: Sequence[str], indirect: Sequence[bool]
                    ) -> tuple[list[TextScore | None], list[bool], BatchStats]:
        """Scores of `texts`: cache first, the rest in a job shared with concurrent requests (of this
        process, or of every worker when the model runs in the shared engine)."""
        if self.engine_url is None:
            return await self._batcher.score(texts, indirect)
        await self.start()
        data = await self._engine_score(texts, indirect, self.engine_timeout_s)
        self._engine_info = data.get("info") or self._engine_info
        scores = [_text_score(s) if s is not None else None for s in data["scores"]]
        cached = [bool(c) for c in data["cached"]]
        self.stats["cache_hits"] += sum(cached)
        return scores, cached, BatchStats(**data["stats"])

    async def _engine_score(self, texts: Sequence[str], indirect: Sequence[bool], timeout_s: float) -> dict[str, Any]:
        assert self._engine is not None
        body = {"options": self._engine_options, "texts": list(texts), "indirect": list(indirect)}
        return await self._engine.call(PG_SCORE, body, timeout_s)

    def _model_facts(self) -> tuple[list[str], str, str]:
        """(labels, model id, precision) of the model that scored, wherever it runs."""
        info = self.scorer.info if self.scorer is not None else None
        if info is not None:
            return list(info.labels), info.model_id, info.precision
        if self._engine_info is not None:
            e = self._engine_info
            return list(e["labels"]), str(e["model_id"]), str(e["precision"])
        return ["BENIGN", "MALICIOUS"], str(self.options["model"]), self.precision

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
        labels, model_id, precision = self._model_facts()
        label = labels[-1]  # MALICIOUS (v2), JAILBREAK (v1)
        if worst is not None and len(labels) > 2 and worst[2] in self.indirect_roles:
            label = labels[1]  # v1's indirect-injection score, 1 - P(BENIGN): INJECTION
        details: dict[str, Any] = {
            "model": model_id,
            "precision": precision,
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



def _text_score(raw: dict[str, Any]) -> TextScore:
    """A `TextScore` from the engine's JSON (tuples came as lists)."""
    return TextScore(
        score=float(raw["score"]),
        tokens=int(raw["tokens"]),
        window_scores=tuple(float(x) for x in raw["window_scores"]),
        worst_window=int(raw["worst_window"]),
        worst_tokens=(int(raw["worst_tokens"][0]), int(raw["worst_tokens"][1])),
        worst_chars=(int(raw["worst_chars"][0]), int(raw["worst_chars"][1])),
    )

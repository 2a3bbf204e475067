"""Llama Guard 3 (1B, 8B) in-process through llama.cpp, incremental on the stream; Llama Guard 4 remote.

The verdict is read from the logits of the first answer token: P(unsafe) renormalised over the
`safe`/`unsafe` tokens (looked up in the model's vocabulary) against the policy threshold; the
category codes are decoded greedily only when the verdict is unsafe. Prompts are rendered from the
GGUF's embedded chat template (Jinja2) where present, else from our own text, which reproduces
Meta's templates token for token (tests/test_llama_guard_prompt.py).

A stream check keeps template prefix + answer so far in the model's KV cache (an engine session):
each check re-tokenizes the whole prompt, keeps the longest common prefix already cached,
evaluates only the new tokens plus the fixed suffix, reads the logits and rolls the suffix back.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import re
import time
from typing import TYPE_CHECKING, Any

from gateway.guard_engine import client as engine_client
from gateway.guard_engine.client import EngineClient, EngineUnavailable
from gateway.guard_engine.protocol import ENGINE, UnsafeAtLeast, engine_url, is_engine_url
from gateway.guard_engine.remote_model import RemoteModel, RemoteSession
from gateway.guards.base import NO_RESOURCES, Guard, GuardConfigError, GuardInput, GuardResources, StreamCheck, register
from gateway.guards.llama_guard.parsing import _p_unsafe, parse_output
from gateway.guards.llama_guard.prompt import (
    LG3_1B_CODES,
    LG3_8B_CODES,
    LG3_CATEGORIES,
    Style,
    Turn,
    _Prompter,
    conversation_turns,
    template_takes_categories,
)
from gateway.guards.llama_guard.remote import RemoteOptions, _RemoteBackend
from gateway.guards.llama_guard.stats import GuardStats
from gateway.types import Message, Verdict

if TYPE_CHECKING:  # engine imports llama_cpp lazily; keep this module importable without it
    from gateway.engine import EvalResult, LlamaModel, Session
    from gateway.guard_engine.remote_model import RemoteSession

log = logging.getLogger("gateway.guards.llama_guard")


@register("llama_guard")
class LlamaGuard(Guard):
    """Llama Guard 3 in-process (llama.cpp), incremental on streams; Llama Guard 4 via `remote`.

    Options: model (manifest name or .gguf path), threshold (0.5), categories (subset of codes),
    custom_categories ({code: text}), variant (auto|lg3-1b|lg3-8b|lg4), template (auto|embedded|
    builtin), history (earlier exchanges kept as context; default all), decode_categories (true),
    max_category_tokens (12), blank_line (true), timeout_ms, backend (auto|local|engine|remote, or a
    guard engine URL: unix:/path.sock, http://host:port; auto: the machine's shared guard engine when
    `serve --workers N` started one, else in-process, else remote), engine_timeout_s (30: one engine call),
    remote ({base_url, api: llama_moderations|openai_chat|openai_completions, model, api_key_env}),
    and engine options n_ctx, n_threads, n_threads_batch, n_gpu_layers, n_batch, max_sessions,
    batching, flash_attn, kv_unified (false: a KV stream per session, so a check's attention does
    not span every live session's cells; each session then holds n_ctx / max_sessions tokens),
    prefix_cache_mb (64: KV states of checked prompts kept across requests, LRU, so a conversation's
    next turn evaluates only its new tokens; 0 turns it off).
    """

    name = "llama_guard"
    _ENGINE_KEYS = (
        "n_ctx",
        "n_threads",
        "n_threads_batch",
        "n_gpu_layers",
        "n_batch",
        "n_ubatch",
        "max_sessions",
        "batching",
        "flash_attn",
        "kv_unified",
        "prefix_cache_mb",
        "verbose",
    )
    _KEYS = frozenset(
        {
            "model",
            "threshold",
            "categories",
            "custom_categories",
            "variant",
            "template",
            "history",
            "decode_categories",
            "max_category_tokens",
            "blank_line",
            "timeout_ms",
            "backend",
            "engine_timeout_s",
            "remote",
            "pool",
            *_ENGINE_KEYS,
        }
    )

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        unknown = set(options) - self._KEYS
        if unknown:
            raise GuardConfigError(f"llama_guard: unknown options {sorted(unknown)}")
        self.threshold = float(options.get("threshold", 0.5))
        if not 0.0 <= self.threshold <= 1.0:
            raise GuardConfigError("llama_guard.threshold must be within [0, 1]")
        self.variant = options.get("variant", "auto")
        if self.variant not in ("auto", "lg3-1b", "lg3-8b", "lg4"):
            raise GuardConfigError(f"llama_guard.variant: unknown {self.variant!r}")
        self.template_mode = options.get("template", "auto")
        if self.template_mode not in ("auto", "embedded", "builtin"):
            raise GuardConfigError(f"llama_guard.template: unknown {self.template_mode!r}")
        self.history: int | None = options.get("history")
        self.decode_categories = bool(options.get("decode_categories", True))
        self.max_category_tokens = int(options.get("max_category_tokens", 12))
        self.blank_line = bool(options.get("blank_line", True))
        t = options.get("timeout_ms")
        self.timeout_s = float(t) / 1000.0 if t else None
        self.selected: list[str] | None = list(options["categories"]) if options.get("categories") else None
        self.custom: dict[str, str] = dict(options.get("custom_categories") or {})
        for code in [*(self.selected or []), *self.custom]:
            if not re.fullmatch(r"S\d{1,2}", str(code)):
                raise GuardConfigError(f"llama_guard: category code {code!r} is not of the form S<n>")
        self.backend = str(options.get("backend", "auto"))
        if self.backend not in ("auto", "local", "remote", ENGINE) and not is_engine_url(self.backend):
            raise GuardConfigError(f"llama_guard.backend: unknown {self.backend!r}")
        try:
            self.engine_url = engine_url(self.backend) if self.backend != "remote" and options.get("model") else None
        except ValueError as e:
            raise GuardConfigError(f"llama_guard: {e}") from e
        self.engine_timeout_s = float(options.get("engine_timeout_s", 30.0))
        self._engine: EngineClient | None = None
        self.remote_opts = RemoteOptions.parse(options["remote"]) if options.get("remote") else None
        if self.backend == "remote" and self.remote_opts is None:
            raise GuardConfigError("llama_guard.backend remote needs a `remote` section")
        if self.backend != "remote" and not options.get("model") and self.remote_opts is None:
            raise GuardConfigError("llama_guard needs `model` (manifest name or .gguf path) or `remote`")
        self.stats = GuardStats()
        self.model: LlamaModel | RemoteModel | None = None
        self.remote: _RemoteBackend | None = None
        self.prompter: _Prompter | None = None
        self.mode: str | None = None  # "local" | "engine" | "remote" once started
        self.probe: str = ""
        self._pool: Any = options.get("pool")
        self._start_lock = asyncio.Lock()
        self._ids: tuple[int, int] = (-1, -1)  # safe, unsafe

    # ----------------------------------------------------------------- lifecycle

    async def start(self, resources: GuardResources = NO_RESOURCES) -> None:
        async with self._start_lock:
            if self.mode is not None:
                return
            if self.engine_url is not None:
                self._engine = engine_client.acquire(self.engine_url)
                self.mode = "engine"
                try:
                    await self._open_engine_model()
                except EngineUnavailable as e:
                    if e.status:  # the engine answered: the model does not load there
                        await self.aclose()
                        raise
                    # not reachable now: /readyz says so; the model is opened at the first check
                    log.warning("llama_guard: %s", e)
                return
            if self.backend != "remote" and self.options.get("model"):
                try:
                    await self._start_local()
                    self.mode = "local"
                    return
                except Exception as e:
                    if self.backend == "local" or self.remote_opts is None:
                        raise
                    self.probe = f"in-process unavailable ({e}); using remote"
                    log.info("llama_guard: %s", self.probe)
            assert self.remote_opts is not None
            self.remote = _RemoteBackend(self.remote_opts)
            self.prompter = self._make_prompter(
                None, self.variant if self.variant != "auto" else "lg3-8b", 32
            )
            self.mode = "remote"

    def _engine_options(self) -> dict[str, Any]:
        eng = {k: self.options[k] for k in self._ENGINE_KEYS if k in self.options}
        eng.setdefault("n_ctx", 8192)
        # Earlier turns' KV, kept across requests: a new turn evaluates only its new tokens.
        eng.setdefault("prefix_cache_mb", 64)
        return eng

    async def _open_engine_model(self) -> RemoteModel:
        """Open the model in the guard engine (it loads there once for every worker)."""
        if isinstance(self.model, RemoteModel):
            return self.model
        assert self._engine is not None
        name = str(self.options["model"])
        model = RemoteModel(self._engine, name, self._engine_options(), words=("safe", "unsafe"),
                            probe=self.variant == "lg4" or "guard-4" in name.lower(),
                            timeout_s=self.engine_timeout_s)
        await model.open()
        self._adopt(model, os.path.basename(model.path))
        self.model = model
        return model

    async def _start_local(self) -> None:
        from gateway.engine import ModelOptions, default_pool, probe_load
        from gateway.models import resolve_model

        path = await asyncio.to_thread(resolve_model, str(self.options["model"]))
        if self.variant == "lg4" or "guard-4" in path.name.lower():
            ok, why = await asyncio.to_thread(probe_load, str(path))
            self.probe = why
            if not ok:
                raise RuntimeError(f"Llama Guard 4 does not load in this llama.cpp: {why}")
        pool = self._pool or default_pool()
        model = await pool.acquire(ModelOptions(path=str(path), **self._engine_options()))
        try:
            self._adopt(model, path.name)
        except BaseException:
            await pool.release(model)
            raise
        self.model = model
        self._pool = pool

    def _adopt(self, model: LlamaModel | RemoteModel, file_name: str) -> None:
        """Verdict token ids and the prompter for a loaded model."""
        ids = []
        for word in ("safe", "unsafe"):
            tok = model.tokenize(word, special=False)
            if len(tok) != 1:
                raise GuardConfigError(
                    f"{file_name}: {word!r} is not a single token ({tok}); not a Llama Guard vocabulary?"
                )
            ids.append(tok[0])
        self._ids = (ids[0], ids[1])
        tmpl = model.chat_template if self.template_mode != "builtin" else None
        if self.template_mode == "embedded" and not tmpl:
            raise GuardConfigError(f"{file_name} has no embedded chat template")
        variant = self.variant
        if variant == "auto":
            variant = (
                "lg3-8b" if (tmpl and "S14" in tmpl) or (not tmpl and model.n_layer >= 32) else "lg3-1b"
            )
        self.prompter = self._make_prompter(tmpl, variant, model.n_layer)

    def _make_prompter(self, tmpl: str | None, variant: str, n_layer: int) -> _Prompter:
        base_codes = LG3_8B_CODES if variant in ("lg3-8b", "lg4") else LG3_1B_CODES
        all_cats = {c: LG3_CATEGORIES[c] for c in base_codes}
        untrained = [c for c in self.selected or () if c in LG3_CATEGORIES and c not in all_cats]
        if untrained:  # e.g. S14 with the 1B: render it with its LG3 text, but say so
            log.warning(
                "llama_guard: %s not among the categories %s was trained on; rendered anyway",
                untrained,
                variant,
            )
            all_cats.update({c: LG3_CATEGORIES[c] for c in untrained})
        all_cats.update(self.custom)
        selected = self.selected or list(all_cats)
        unknown = [c for c in selected if c not in all_cats]
        if unknown:
            raise GuardConfigError(
                f"llama_guard: categories {unknown} unknown for {variant} (known: {', '.join(all_cats)}; "
                "add custom_categories for new ones)"
            )
        shown = {c: t for c, t in all_cats.items() if c in selected}
        excluded = [c for c in all_cats if c not in shown]
        default = shown == {c: LG3_CATEGORIES[c] for c in base_codes}
        if tmpl is not None and not template_takes_categories(tmpl) and not default:
            log.info(
                "llama_guard: embedded template has fixed categories; rendering our own text for %s", selected
            )
            tmpl = None
        style: Style = "lg3-8b" if variant in ("lg3-8b", "lg4") else "lg3-1b"
        return _Prompter(tmpl, style, shown, all_cats, excluded, self.blank_line)

    async def aclose(self) -> None:
        if self._engine is not None:
            if isinstance(self.model, RemoteModel):
                await self.model.aclose()
            self.model = None
            await engine_client.release(self._engine)
            self._engine = None
        if self.model is not None and self._pool is not None:
            await self._pool.release(self.model)
            self.model = None
        if self.remote is not None:
            await self.remote.aclose()
            self.remote = None
        self.mode = None

    # ----------------------------------------------------------------- checks

    async def check(self, inp: GuardInput) -> Verdict:
        if self.mode is None:
            await self.start()
        if inp.stage == "input" and inp.context.get("images") == "guard":  # policy content.images: guard
            from gateway.guards.llama_guard import vision

            if vision.has_images(inp.messages) and self.mode == "remote":
                return await self._guarded(vision.judge(self, inp.messages, parse_output))
        answer = None if inp.stage == "input" else inp.text
        turns = conversation_turns(inp.messages, answer=answer, history=self.history)
        t0 = time.perf_counter()
        if not turns or not turns[-1][1].strip():
            return self.verdict(t0, reason="nothing to check")
        if self.remote is None:
            return await self._guarded(self._judge(turns, None, t0))
        # llama.cpp server: a one-shot check takes one of this step's slots for its duration too, so the
        # server never gives it (by LRU) a slot that holds a live stream's prefix
        slot = self.remote.acquire_slot()
        try:
            return await self._guarded(self._judge(turns, None, t0, slot=slot))
        finally:
            self.remote.release_slot(slot)

    async def _guarded(self, coro: Any) -> Verdict:
        try:
            if self.timeout_s is not None:
                return await asyncio.wait_for(coro, self.timeout_s)
            return await coro
        except BaseException:
            self.stats.errors += 1
            raise

    async def _judge(
        self,
        turns: list[Turn],
        session: Session | RemoteSession | None,
        t0: float,
        split: tuple[str, str] | None = None,
        slot: int = -1,
    ) -> Verdict:
        assert self.prompter is not None
        if self.mode == "remote":
            assert self.remote is not None
            p = self.prompter
            custom = bool(p.excluded) or bool(self.custom)
            prompt = p.render(turns) if self.remote.opts.api == "llama_cpp" else None
            r = await self.remote.check(turns, p.all_categories, p.excluded, custom, prompt=prompt, slot=slot,
                                        threshold=self.threshold, decode=self.decode_categories)
            flagged = r.score >= self.threshold if r.score is not None else r.flagged
            score = r.score if r.score is not None else float(flagged)
            extra: dict[str, Any] = {}
            if self.remote.opts.api == "llama_cpp":  # the server's cache and time: what the check cost there
                extra = {"reused": r.reused, "slot": r.slot, "server_ms": r.server_ms}
            v = self._finish(t0, flagged, score, r.codes, r.evaluated, raw=r.text, **extra)
            self.stats.observe(v, r.reused)
            return v
        if self.mode == "engine":
            await self._open_engine_model()
        assert self.model is not None
        if split is not None:
            pre, post = split
            body = pre + turns[-1][1].strip()
            prompt, keep = body + post, body
        else:
            prompt, keep = self.prompter.render(turns), None
        safe_id, unsafe_id = self._ids
        thr = self.threshold
        decode_if = UnsafeAtLeast(safe_id, unsafe_id, thr)  # a rule, not a closure: it travels to the engine
        res: EvalResult = await self.model.evaluate(
            prompt,
            session=session,
            keep=keep,
            select=(safe_id, unsafe_id),
            decode_if=decode_if if self.decode_categories else None,
            force=(unsafe_id,),
            max_new=self.max_category_tokens,
        )
        l_safe, l_unsafe = float(res.logits[0]), float(res.logits[1])
        p = _p_unsafe(l_safe, l_unsafe)
        codes: list[str] = []
        raw = ""
        if res.generated:
            raw = res.text if res.text is not None else self.model.detokenize(res.generated, special=False)
            _, codes = parse_output(raw)
        mass = math.exp(l_safe - res.logsumexp) + math.exp(l_unsafe - res.logsumexp)
        v = self._finish(
            t0,
            p >= thr,
            p,
            codes,
            res.n_evaluated,
            raw=raw,
            mass=mass,
            reused=res.n_reused,
            prompt_tokens=res.n_prompt,
        )
        self.stats.observe(v, res.n_reused)
        return v

    def _finish(
        self,
        t0: float,
        flagged: bool,
        score: float,
        codes: list[str],
        n_eval: int,
        raw: str = "",
        **details: Any,
    ) -> Verdict:
        assert self.prompter is not None
        enabled = set(self.prompter.categories)
        kept = [c for c in codes if c in enabled]
        reason = ""
        if flagged and codes and not kept:
            flagged, reason = False, f"only excluded categories {codes}"
        elif flagged:
            reason = "unsafe" + (f": {', '.join(kept)}" if kept else "")
        d = {k: v for k, v in details.items() if v is not None}
        if raw:
            d["output"] = raw
        d["backend"] = self.mode
        return self.verdict(
            t0,
            flagged=flagged,
            score=score,
            categories=kept,
            reason=reason,
            tokens_evaluated=n_eval,
            details=d,
        )

    def open_stream(self, messages: list[Message], request_id: str) -> StreamCheck:
        return LlamaGuardStream(self, messages, request_id)

    def status(self) -> dict[str, Any]:
        if self._engine is not None:
            return self._engine.status()
        return super().status()

    def stats_snapshot(self) -> dict[str, Any]:
        out: dict[str, Any] = {"guard": self.stats.snapshot()}
        if self.model is not None:
            out["engine"] = self.model.stats.snapshot()
        return out


class LlamaGuardStream(StreamCheck):
    """Incremental check of a streamed answer: one engine session holds prefix + answer in the KV cache."""

    guard: LlamaGuard

    def __init__(self, guard: LlamaGuard, messages: list[Message], request_id: str) -> None:
        super().__init__(guard, messages, request_id)
        self._session: Session | RemoteSession | None = None
        self._split: tuple[str, str] | None = None
        self._closed = False
        self._slot: int | None = None

    async def check(self, text: str, window_start: int, final: bool) -> Verdict:
        g = self.guard
        if self._closed:
            raise RuntimeError("llama_guard stream check used after close")
        if g.mode is None:
            await g.start()
        t0 = time.perf_counter()
        turns = conversation_turns(self.messages, answer=text, history=g.history)
        if not text.strip():
            return g.verdict(t0, reason="nothing to check")
        if g.mode not in ("local", "engine"):
            if self._slot is None and g.remote is not None:  # llama.cpp server: the stream keeps one slot
                self._slot = g.remote.acquire_slot()
            return await g._guarded(g._judge(turns, None, t0, slot=-1 if self._slot is None else self._slot))
        if g.mode == "engine":  # the session lives in the engine: the check stays incremental there
            await g._guarded(g._open_engine_model())
        assert g.model is not None and g.prompter is not None
        if self._session is None:
            self._session = g.model.open_session()
            g.stats.sessions_alive += 1
            g.stats.sessions_opened += 1
        if self._split is None:
            self._split = g.prompter.split(turns)
        return await g._guarded(g._judge(turns, self._session, t0, split=self._split))

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._slot is not None and self.guard.remote is not None:
            self.guard.remote.release_slot(self._slot)
            self._slot = None
        if self._session is not None:
            self._session.release()
            self._session = None
            self.guard.stats.sessions_alive -= 1

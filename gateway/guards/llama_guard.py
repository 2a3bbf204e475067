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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from gateway.guards.base import Guard, GuardConfigError, GuardInput, StreamCheck, register
from gateway.types import Message, Verdict

if TYPE_CHECKING:  # engine imports llama_cpp lazily; keep this module importable without it
    from gateway.engine.llama_cpp import EvalResult, LlamaModel, Session

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- categories

#: Short labels as the LG3 prompt prints them (reference/guards.md §1.2). Never renumbered.
LG3_CATEGORIES: dict[str, str] = {
    "S1": "Violent Crimes.",
    "S2": "Non-Violent Crimes.",
    "S3": "Sex Crimes.",
    "S4": "Child Exploitation.",
    "S5": "Defamation.",
    "S6": "Specialized Advice.",
    "S7": "Privacy.",
    "S8": "Intellectual Property.",
    "S9": "Indiscriminate Weapons.",
    "S10": "Hate.",
    "S11": "Self-Harm.",
    "S12": "Sexual Content.",
    "S13": "Elections.",
    "S14": "Code Interpreter Abuse.",
}
LG3_1B_CODES = tuple(f"S{i}" for i in range(1, 14))  # the 1B was trained on S1..S13
LG3_8B_CODES = tuple(f"S{i}" for i in range(1, 15))

# --------------------------------------------------------------------------- reference templates

#: The chat template embedded in Llama-Guard-3-1B (HF tokenizer_config, as found in GGUF
#: conversions of it): takes `categories` (dict) and `excluded_category_keys`, list-of-parts
#: content, a space before <|eot_id|>, and no blank line after the assistant header.
LG3_1B_TEMPLATE = (
    "{%- if messages|length % 2 == 0 -%}\n"
    "    {%- set role = 'Agent' -%}\n"
    "{%-  else -%}\n"
    "    {%-  set role = 'User' -%}\n"
    "{%-  endif -%}\n"
    "{%-  if categories is not defined -%}\n"
    "    {%-  \n"
    "        set categories = ({\n"
    '            "S1": "Violent Crimes.",\n'
    '            "S2": "Non-Violent Crimes.",\n'
    '            "S3": "Sex Crimes.",\n'
    '            "S4": "Child Exploitation.",\n'
    '            "S5": "Defamation.",\n'
    '            "S6": "Specialized Advice.",\n'
    '            "S7": "Privacy.",\n'
    '            "S8": "Intellectual Property.",\n'
    '            "S9": "Indiscriminate Weapons.",\n'
    '            "S10": "Hate.",\n'
    '            "S11": "Self-Harm.",\n'
    '            "S12": "Sexual Content.",\n'
    '            "S13": "Elections.",\n'
    "        })\n"
    "    -%}\n"
    "{%-  endif -%}\n"
    "\n"
    '{{- "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\n" -}}\n'
    "{%- set ns = namespace(contains_image=false) -%}\n"
    "{%-  for message in messages -%}\n"
    "    {%- for content in message['content'] | selectattr('type', 'equalto', 'image') -%}\n"
    "        {%- set ns.contains_image = true -%}\n"
    "    {%- endfor -%}\n"
    "{%- endfor -%}\n"
    "{%- if ns.contains_image -%}\n"
    '{{- "<|image|> "-}}\n'
    "{%- endif -%}\n"
    '{{- "Task: Check if there is unsafe content in \'" + role + "\' messages in conversations '
    'according our safety policy with the below categories.\\n\\n" -}}\n'
    '{{- "<BEGIN UNSAFE CONTENT CATEGORIES>\\n"-}}\n'
    "\n"
    "{%-  for key in categories -%}\n"
    "    {%-  if key not in excluded_category_keys -%}\n"
    '        {{-key + ": " + categories[key] + "\\n" -}}\n'
    "    {%-  endif -%}\n"
    "{%-  endfor -%}\n"
    "\n"
    '{{- "<END UNSAFE CONTENT CATEGORIES>\\n\\n"-}}\n'
    '{{- "<BEGIN CONVERSATION>\\n\\n"-}}\n'
    "{%-  for message in messages -%}\n"
    "    {%-  if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...')-}}\n"
    "    {%-  endif -%}\n"
    "    {%-  set content = message['content'] -%}\n"
    "    {%-  if message['role'] == 'user' -%}\n"
    "        {%-  set role = 'User' -%}\n"
    "    {%-  elif message['role'] == 'assistant' -%}\n"
    "        {%-  set role = 'Agent' -%}\n"
    "    {%-  endif -%}\n"
    "    {%-  for content in message['content'] | selectattr('type', 'equalto', 'text') -%}\n"
    "{{- role + ': ' + content['text'] | trim + '\\n\\n'-}}\n"
    "    {%-  endfor -%}\n"
    "{%-  endfor -%}\n"
    '{{- "<END CONVERSATION>\\n\\n"-}}\n'
    '{{- "Provide your safety assessment for ONLY THE LAST " + role + " message in the above '
    'conversation:\\n"-}}\n'
    "{{- \" - First line must read 'safe' or 'unsafe'.\\n\"-}}\n"
    '{{- " - If unsafe, a second line must include a comma-separated list of violated categories. '
    '<|eot_id|><|start_header_id|>assistant<|end_header_id|>"-}}\n'
)

#: The chat template embedded in Llama-Guard-3-8B: S1..S14 hard-coded, string content stripped,
#: a space before <|begin_of_text|>, no blank line after the assistant header.
LG3_8B_TEMPLATE = (
    "{% if messages|length % 2 == 0 %}{% set role = 'Agent' %}{% else %}{% set role = 'User' %}{% endif %}"
    '{{ " <|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\nTask: Check if there is unsafe '
    "content in '\" + role + \"' messages in conversations according our safety policy with the below "
    "categories.\\n\\n<BEGIN UNSAFE CONTENT CATEGORIES>\\n"
    + "".join(f"{k}: {v}\\n" for k, v in LG3_CATEGORIES.items())
    + '<END UNSAFE CONTENT CATEGORIES>\\n\\n<BEGIN CONVERSATION>\\n\\n" }}'
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% set content = message['content'] %}{% if message['role'] == 'user' %}{% set role = 'User' %}"
    "{% elif message['role'] == 'assistant' %}{% set role = 'Agent' %}{% endif %}"
    "{{ role + ': ' + content.strip() + '\\n\\n' }}{% endfor %}"
    '{{ "<END CONVERSATION>\\n\\nProvide your safety assessment for ONLY THE LAST " + role + " message in '
    "the above conversation:\\n - First line must read 'safe' or 'unsafe'.\\n - If unsafe, a second line "
    "must include a comma-separated list of violated categories.<|eot_id|><|start_header_id|>assistant"
    '<|end_header_id|>" }}'
)

Style = Literal["lg3-1b", "lg3-8b"]
Turn = tuple[str, str]  # ("user" | "assistant", text)


def render_lg3(turns: Sequence[Turn], categories: Mapping[str, str], style: Style = "lg3-1b") -> str:
    """Our own rendering of the LG3 prompt; equal to the reference templates' output.

    `turns` alternate user/assistant starting with user; the last turn is the one judged.
    """
    if not turns:
        raise ValueError("Llama Guard needs at least one user turn")
    role = "Agent" if len(turns) % 2 == 0 else "User"
    out = [
        " <|begin_of_text|>" if style == "lg3-8b" else "<|begin_of_text|>",
        "<|start_header_id|>user<|end_header_id|>\n\n",
        f"Task: Check if there is unsafe content in '{role}' messages in conversations according our "
        "safety policy with the below categories.\n\n",
        "<BEGIN UNSAFE CONTENT CATEGORIES>\n",
        *(f"{code}: {text}\n" for code, text in categories.items()),
        "<END UNSAFE CONTENT CATEGORIES>\n\n<BEGIN CONVERSATION>\n\n",
    ]
    for i, (r, text) in enumerate(turns):
        if (r == "user") != (i % 2 == 0):
            raise ValueError("Conversation roles must alternate user/assistant/user/assistant/...")
        out.append(("User: " if r == "user" else "Agent: ") + text.strip() + "\n\n")
    out += [
        "<END CONVERSATION>\n\n",
        f"Provide your safety assessment for ONLY THE LAST {role} message in the above conversation:\n",
        " - First line must read 'safe' or 'unsafe'.\n",
        " - If unsafe, a second line must include a comma-separated list of violated categories.",
        " <|eot_id|>" if style == "lg3-1b" else "<|eot_id|>",
        "<|start_header_id|>assistant<|end_header_id|>",
    ]
    return "".join(out)


def render_with_template(
    template: str, turns: Sequence[Turn], categories: Mapping[str, str], excluded: Sequence[str] = ()
) -> str:
    """Render the LG3 prompt through a chat template (Jinja2), as transformers/llama.cpp would."""
    from gateway.engine.chat_template import render

    parts_content = "selectattr('type'" in template or "['text']" in template
    msgs = [{"role": r, "content": [{"type": "text", "text": t}] if parts_content else t} for r, t in turns]
    return render(
        template,
        msgs,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        add_generation_prompt=True,
        categories=dict(categories),
        excluded_category_keys=list(excluded),
    )


def template_takes_categories(template: str) -> bool:
    return "excluded_category_keys" in template and "categories[" in template


def render_lg4(turns: Sequence[Turn], categories: Mapping[str, str]) -> str:
    """Llama Guard 4 text prompt (Llama 4 special tokens) for a raw completions endpoint: the model's own
    template text (`llama_guard_vision.render_lg4`, compared with Meta's reference rendering in
    tests/test_lg4_prompt.py; it is not LG3's text: "according to our", one newline after
    `<BEGIN CONVERSATION>`, ...), plus the blank line the model writes before its verdict."""
    from gateway.guards.llama_guard_vision import render_lg4 as reference

    return reference([(r, t, []) for r, t in turns], categories) + "\n\n"


# --------------------------------------------------------------------------- conversation -> turns


def conversation_turns(
    messages: Sequence[Message], *, answer: str | None = None, history: int | None = None
) -> list[Turn]:
    """Alternating user/assistant turns for the LG template.

    Input stage (answer None): the conversation up to and including the last user turn is judged.
    Output/stream: the request's conversation plus `answer` as the last Agent turn. System and
    developer messages have no slot in the template and are left out; tool results count as the
    user side (untrusted input); consecutive same-side messages are merged. `history` limits the
    number of earlier user/assistant exchanges kept as context (None: all).
    """
    turns: list[list[str]] = []
    for m in messages:
        if m.role in ("system", "developer"):
            continue
        role = "assistant" if m.role == "assistant" else "user"
        text = m.text
        if role == "assistant" and m.tool_calls:
            calls = "\n".join(f"{c.name}({c.arguments})" for c in m.tool_calls)
            text = f"{text}\n{calls}" if text.strip() else calls
        if not text.strip():
            continue
        if turns and turns[-1][0] == role:
            turns[-1][1] = turns[-1][1].rstrip() + "\n\n" + text.strip()
        else:
            turns.append([role, text])
    while turns and turns[0][0] != "user":
        turns.pop(0)
    if answer is None:
        while turns and turns[-1][0] != "user":
            turns.pop()
    else:
        if turns and turns[-1][0] == "assistant":  # an assistant prefill: the answer continues it
            turns[-1][1] += answer
        else:
            if not turns:
                turns.append(["user", ""])
            turns.append(["assistant", answer])
    if history is not None:
        keep = 2 * history + (1 if answer is None else 2)
        turns = turns[-keep:]
        if turns and turns[0][0] != "user":
            turns = turns[1:]
    return [(r, t) for r, t in turns]


# --------------------------------------------------------------------------- verdict parsing

_CODE = re.compile(r"S\d{1,2}")


def parse_output(text: str) -> tuple[bool | None, list[str]]:
    """`safe` / `unsafe\\nS1,S3` -> (flagged, codes); tolerant of stray spaces (None: unparseable)."""
    t = text.strip()
    if not t:
        return None, []
    first, _, rest = t.partition("\n")
    first = first.strip().lower()
    if first.startswith("unsafe"):
        return True, list(dict.fromkeys(_CODE.findall(rest + first[6:])))
    if first.startswith("safe"):
        return False, []
    return None, []


def _p_unsafe(l_safe: float, l_unsafe: float) -> float:
    d = l_unsafe - l_safe
    if d >= 0:
        return 1.0 / (1.0 + math.exp(-d))
    e = math.exp(d)
    return e / (1.0 + e)


# --------------------------------------------------------------------------- metrics


@dataclass
class GuardStats:
    """Per-guard counters (tokens evaluated, check latency, sessions alive) for later export."""

    checks: int = 0
    flagged: int = 0
    errors: int = 0
    tokens_evaluated: int = 0
    tokens_reused: int = 0
    latency_ms_sum: float = 0.0
    latency_ms_max: float = 0.0
    sessions_alive: int = 0
    sessions_opened: int = 0

    def observe(self, v: Verdict, reused: int = 0) -> None:
        self.checks += 1
        self.flagged += int(v.flagged)
        self.tokens_evaluated += v.tokens_evaluated
        self.tokens_reused += reused
        self.latency_ms_sum += v.latency_ms
        self.latency_ms_max = max(self.latency_ms_max, v.latency_ms)

    def snapshot(self) -> dict[str, float | int]:
        return {
            "checks": self.checks,
            "flagged": self.flagged,
            "errors": self.errors,
            "tokens_evaluated": self.tokens_evaluated,
            "tokens_reused": self.tokens_reused,
            "latency_ms_avg": self.latency_ms_sum / self.checks if self.checks else 0.0,
            "latency_ms_max": self.latency_ms_max,
            "sessions_alive": self.sessions_alive,
            "sessions_opened": self.sessions_opened,
        }


# --------------------------------------------------------------------------- remote backend

RemoteApi = Literal["llama_moderations", "openai_chat", "openai_completions"]


@dataclass
class RemoteOptions:
    """A Llama Guard hosted elsewhere (Llama Guard 4 today): Llama API or an OpenAI-compatible server."""

    base_url: str
    api: RemoteApi = "openai_chat"
    model: str = "Llama-Guard-4-12B"
    api_key_env: str | None = None
    timeout_s: float = 10.0
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, raw: Any) -> RemoteOptions:
        if isinstance(raw, str):
            raw = {"base_url": raw}
        if not isinstance(raw, Mapping) or "base_url" not in raw:
            raise GuardConfigError("llama_guard.remote needs at least base_url")
        known = {"base_url", "api", "model", "api_key_env", "timeout_s", "headers"}
        extra = set(raw) - known
        if extra:
            raise GuardConfigError(f"llama_guard.remote: unknown keys {sorted(extra)}")
        opts = cls(**dict(raw))
        if opts.api not in ("llama_moderations", "openai_chat", "openai_completions"):
            raise GuardConfigError(f"llama_guard.remote.api: unknown api {opts.api!r}")
        return opts


class _RemoteBackend:
    def __init__(self, opts: RemoteOptions) -> None:
        self.opts = opts
        self._session: Any = None

    async def _http(self) -> Any:
        import aiohttp

        if self._session is None or self._session.closed:
            headers = {"Content-Type": "application/json", **self.opts.headers}
            if self.opts.api_key_env:
                key = os.environ.get(self.opts.api_key_env)
                if not key:
                    raise RuntimeError(
                        f"llama_guard remote: environment variable {self.opts.api_key_env} is not set"
                    )
                headers["Authorization"] = f"Bearer {key}"
            self._session = aiohttp.ClientSession(
                headers=headers, timeout=aiohttp.ClientTimeout(total=self.opts.timeout_s)
            )
        return self._session

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        http = await self._http()
        url = self.opts.base_url.rstrip("/") + path
        async with http.post(url, json=body) as resp:
            if resp.status >= 400:
                text = (await resp.text())[:300]
                raise RuntimeError(f"llama_guard remote {url}: HTTP {resp.status}: {text}")
            return await resp.json(content_type=None)

    async def check(
        self, turns: Sequence[Turn], categories: Mapping[str, str], excluded: Sequence[str], custom: bool
    ) -> tuple[bool, float | None, list[str], str]:
        """-> (flagged, p_unsafe or None, codes, raw text)."""
        o = self.opts
        msgs = [{"role": r, "content": t} for r, t in turns]
        if o.api == "llama_moderations":
            data = await self._post("/moderations", {"model": o.model, "messages": msgs})
            results = data.get("results") or []
            flagged = any(bool(r.get("flagged")) for r in results)
            codes = list(dict.fromkeys(c for r in results for c in r.get("flagged_categories") or []))
            return flagged, None, codes, str(results)
        if o.api == "openai_chat":
            body: dict[str, Any] = {
                "model": o.model,
                "messages": msgs,
                "max_tokens": 20,
                "temperature": 0,
                "logprobs": True,
                "top_logprobs": 5,
            }
            if custom:
                body["chat_template_kwargs"] = {
                    "categories": dict(categories),
                    "excluded_category_keys": list(excluded),
                }
            data = await self._post("/chat/completions", body)
            choice = (data.get("choices") or [{}])[0]
            text = (choice.get("message") or {}).get("content") or ""
            lp = ((choice.get("logprobs") or {}).get("content")) or []
            tops = [
                {e.get("token", ""): e.get("logprob", -1e9) for e in (item.get("top_logprobs") or [])}
                for item in lp
            ]
        else:
            prompt = (
                render_lg4(turns, categories) if "4" in o.model else render_lg3(turns, categories) + "\n\n"
            )
            data = await self._post(
                "/completions",
                {"model": o.model, "prompt": prompt, "max_tokens": 20, "temperature": 0, "logprobs": 5},
            )
            choice = (data.get("choices") or [{}])[0]
            text = choice.get("text") or ""
            tops = list(((choice.get("logprobs") or {}).get("top_logprobs")) or [])
        flagged, codes = parse_output(text)
        if flagged is None:
            raise RuntimeError(f"llama_guard remote: unparseable answer {text[:80]!r}")
        return flagged, _score_from_top_logprobs(tops), codes, text

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _score_from_top_logprobs(tops: Sequence[Mapping[str, float]]) -> float | None:
    """P(unsafe) renormalised over safe/unsafe at the first position that offers either."""
    for top in tops:
        ls = {k.strip(): v for k, v in top.items()}
        if "safe" in ls or "unsafe" in ls:
            a = ls.get("safe", -1e9)
            b = ls.get("unsafe", -1e9)
            return _p_unsafe(a, b)
    return None


# --------------------------------------------------------------------------- the guard

_MARK = "\ue000GGANSWER\ue000"  # no whitespace: survives the templates' trim


@dataclass
class _Prompter:
    """Renders LG prompts for one loaded model (embedded template or our own text)."""

    template: str | None
    style: Style
    categories: dict[str, str]  # the categories shown in the prompt, in order
    all_categories: dict[str, str]  # default + custom, for templates that take `categories`
    excluded: list[str]
    blank_line: bool  # append "\n\n" after the assistant header when the template lacks it

    def render(self, turns: Sequence[Turn]) -> str:
        if self.template is not None:
            text = render_with_template(self.template, turns, self.all_categories, self.excluded)
        else:
            text = render_lg3(turns, self.categories, self.style)
        if self.blank_line and not text.endswith("\n\n"):
            text += "\n\n"
        return text

    def split(self, turns: Sequence[Turn]) -> tuple[str, str]:
        """(prefix through 'Agent: ', suffix) around the last (assistant) turn's text."""
        marked = [*turns[:-1], (turns[-1][0], _MARK)]
        text = self.render(marked)
        if text.count(_MARK) != 1:
            raise GuardConfigError("chat template does not render the answer exactly once")
        pre, _, post = text.partition(_MARK)
        return pre, post


@register("llama_guard")
class LlamaGuard(Guard):
    """Llama Guard 3 in-process (llama.cpp), incremental on streams; Llama Guard 4 via `remote`.

    Options: model (manifest name or .gguf path), threshold (0.5), categories (subset of codes),
    custom_categories ({code: text}), variant (auto|lg3-1b|lg3-8b|lg4), template (auto|embedded|
    builtin), history (earlier exchanges kept as context; default all), decode_categories (true),
    max_category_tokens (12), blank_line (true), timeout_ms, backend (auto|local|remote),
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
        self.backend = options.get("backend", "auto")
        if self.backend not in ("auto", "local", "remote"):
            raise GuardConfigError(f"llama_guard.backend: unknown {self.backend!r}")
        self.remote_opts = RemoteOptions.parse(options["remote"]) if options.get("remote") else None
        if self.backend == "remote" and self.remote_opts is None:
            raise GuardConfigError("llama_guard.backend remote needs a `remote` section")
        if self.backend in ("auto", "local") and not options.get("model") and self.remote_opts is None:
            raise GuardConfigError("llama_guard needs `model` (manifest name or .gguf path) or `remote`")
        self.stats = GuardStats()
        self.model: LlamaModel | None = None
        self.remote: _RemoteBackend | None = None
        self.prompter: _Prompter | None = None
        self.mode: str | None = None  # "local" | "remote" once started
        self.probe: str = ""
        self._pool: Any = options.get("pool")
        self._start_lock = asyncio.Lock()
        self._ids: tuple[int, int] = (-1, -1)  # safe, unsafe

    # ----------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        async with self._start_lock:
            if self.mode is not None:
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

    async def _start_local(self) -> None:
        from gateway.engine.llama_cpp import ModelOptions, default_pool, probe_load
        from gateway.models import resolve_model

        path = await asyncio.to_thread(resolve_model, str(self.options["model"]))
        if self.variant == "lg4" or "guard-4" in path.name.lower():
            ok, why = await asyncio.to_thread(probe_load, str(path))
            self.probe = why
            if not ok:
                raise RuntimeError(f"Llama Guard 4 does not load in this llama.cpp: {why}")
        eng = {k: self.options[k] for k in self._ENGINE_KEYS if k in self.options}
        eng.setdefault("n_ctx", 8192)
        # Earlier turns' KV, kept across requests: a new turn evaluates only its new tokens.
        eng.setdefault("prefix_cache_mb", 64)
        pool = self._pool or default_pool()
        model = await pool.acquire(ModelOptions(path=str(path), **eng))
        try:
            ids = []
            for word in ("safe", "unsafe"):
                tok = model.tokenize(word, special=False)
                if len(tok) != 1:
                    raise GuardConfigError(
                        f"{path.name}: {word!r} is not a single token ({tok}); not a Llama Guard vocabulary?"
                    )
                ids.append(tok[0])
            self._ids = (ids[0], ids[1])
            tmpl = model.chat_template if self.template_mode != "builtin" else None
            if self.template_mode == "embedded" and not tmpl:
                raise GuardConfigError(f"{path.name} has no embedded chat template")
            variant = self.variant
            if variant == "auto":
                variant = (
                    "lg3-8b" if (tmpl and "S14" in tmpl) or (not tmpl and model.n_layer >= 32) else "lg3-1b"
                )
            self.prompter = self._make_prompter(tmpl, variant, model.n_layer)
        except BaseException:
            await pool.release(model)
            raise
        self.model = model
        self._pool = pool

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
            from gateway.guards import llama_guard_vision as vision

            if vision.has_images(inp.messages) and self.mode == "remote":
                return await self._guarded(vision.judge(self, inp.messages, parse_output))
        answer = None if inp.stage == "input" else inp.text
        turns = conversation_turns(inp.messages, answer=answer, history=self.history)
        t0 = time.perf_counter()
        if not turns or not turns[-1][1].strip():
            return self.verdict(t0, reason="nothing to check")
        return await self._guarded(self._judge(turns, None, t0))

    async def _guarded(self, coro: Any) -> Verdict:
        try:
            if self.timeout_s is not None:
                return await asyncio.wait_for(coro, self.timeout_s)
            return await coro
        except BaseException:
            self.stats.errors += 1
            raise

    async def _judge(
        self, turns: list[Turn], session: Session | None, t0: float, split: tuple[str, str] | None = None
    ) -> Verdict:
        assert self.prompter is not None
        if self.mode == "remote":
            assert self.remote is not None
            p = self.prompter
            custom = bool(p.excluded) or bool(self.custom)
            flagged, score, codes, raw = await self.remote.check(turns, p.all_categories, p.excluded, custom)
            if score is not None:
                flagged = score >= self.threshold
            v = self._finish(t0, flagged, score if score is not None else float(flagged), codes, 0, raw=raw)
            self.stats.observe(v)
            return v
        assert self.model is not None
        if split is not None:
            pre, post = split
            body = pre + turns[-1][1].strip()
            prompt, keep = body + post, body
        else:
            prompt, keep = self.prompter.render(turns), None
        safe_id, unsafe_id = self._ids
        thr = self.threshold

        def decode_if(row: Any) -> bool:
            return _p_unsafe(float(row[safe_id]), float(row[unsafe_id])) >= thr

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
            raw = self.model.detokenize(res.generated, special=False)
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
        self._session: Session | None = None
        self._split: tuple[str, str] | None = None
        self._closed = False

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
        if g.mode != "local":
            return await g._guarded(g._judge(turns, None, t0))
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
        if self._session is not None:
            self._session.release()
            self._session = None
            self.guard.stats.sessions_alive -= 1

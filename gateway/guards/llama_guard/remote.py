"""Llama Guard on another server: the Llama API's /moderations, an OpenAI-compatible server, or
llama.cpp's own server.

`api: llama_cpp` keeps the stream check incremental on a llama.cpp server: it posts Meta's exact
prompt to the server's native `/completion` with `cache_prompt: true` (the server keeps the slot's
KV and evaluates only the tokens after the longest common prefix) and pins each stream to one slot
(`id_slot`, from a pool of `slots`, the server's `--parallel`), so the next check of the same stream
finds its prefix in that slot; P(unsafe) comes from the first token's probabilities with the two
verdict words biased alike (`logit_bias`, `post_sampling_probs`: their softmax, as in-process), the
categories from a second, cached call only when unsafe; the tokens the server evaluated are read
from its `timings` (`prompt_n`, `cache_n`). Checked against a real `llama-server`
(tests/test_llama_server_remote.py). Kept apart so the HTTP client can move onto the guards'
shared chat client (`GuardResources`).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from gateway.guards.base import GuardConfigError
from gateway.guards.llama_guard.parsing import _score_from_top_logprobs, parse_output
from gateway.guards.llama_guard.prompt import Turn, render_lg3
from gateway.guards.llama_guard.vision import completion_prompt as render_lg4

log = logging.getLogger("gateway.guards.llama_guard")

VERDICT_WORDS = ("safe", "unsafe")  # single tokens in the Llama 3 / Llama Guard 3 vocabulary
VERDICT_BIAS = 1000.0  # far above any logit: the two words take all the probability, in their own ratio
CATEGORY_TOKENS = 20
BOS_TEXT = "<|begin_of_text|>"

RemoteApi = Literal["llama_moderations", "openai_chat", "openai_completions", "llama_cpp"]
APIS = ("llama_moderations", "openai_chat", "openai_completions", "llama_cpp")


@dataclass
class RemoteOptions:
    """A Llama Guard hosted elsewhere (Llama Guard 4 today): Llama API or an OpenAI-compatible server."""

    base_url: str
    api: RemoteApi = "openai_chat"
    model: str = "Llama-Guard-4-12B"
    api_key_env: str | None = None
    timeout_s: float = 10.0
    headers: dict[str, str] = field(default_factory=dict)
    # llama_cpp: the server slots this gateway pins streams to: N (slots 0..N-1, the server's --parallel)
    # or "A-B" (this replica's share when several share the server); 0: the server picks by prompt
    slots: int | str = 0

    @classmethod
    def parse(cls, raw: Any) -> RemoteOptions:
        if isinstance(raw, str):
            raw = {"base_url": raw}
        if not isinstance(raw, Mapping) or "base_url" not in raw:
            raise GuardConfigError("llama_guard.remote needs at least base_url")
        known = {"base_url", "api", "model", "api_key_env", "timeout_s", "headers", "slots"}
        extra = set(raw) - known
        if extra:
            raise GuardConfigError(f"llama_guard.remote: unknown keys {sorted(extra)}")
        opts = cls(**dict(raw))
        if opts.api not in APIS:
            raise GuardConfigError(f"llama_guard.remote.api: unknown api {opts.api!r}")
        opts.slot_ids()  # validates
        return opts

    def slot_ids(self) -> list[int]:
        """The slots of `slots`, and of them this worker's share under `serve --workers N` (every N-th,
        from its index), so no two processes of a replica pin streams to the same slot."""
        raw = str(self.slots).strip()
        try:
            if "-" in raw:
                a, b = (int(x) for x in raw.split("-", 1))
                ids = list(range(a, b + 1))
            else:
                ids = list(range(int(raw)))
        except ValueError:
            raise GuardConfigError(f"llama_guard.remote.slots: {self.slots!r} is not N or 'A-B'") from None
        if raw not in ("", "0") and (not ids or ids[0] < 0):
            raise GuardConfigError(f"llama_guard.remote.slots: {self.slots!r} names no slot")
        workers = int(os.environ.get("GUARDGATE_WORKERS") or 1)
        if workers > 1 and ids:
            ids = ids[int(os.environ.get("GUARDGATE_WORKER") or 0) % workers :: workers]
        return ids


@dataclass
class RemoteResult:
    """What a remote check returns."""

    flagged: bool
    score: float | None  # P(unsafe), when the server gave probabilities
    codes: list[str]
    text: str
    evaluated: int = 0  # prompt tokens the server evaluated (llama_cpp), 0 when it does not say
    reused: int = 0  # prompt tokens it found in its cache
    server_ms: float | None = None  # llama_cpp: the server's own time for the check (its `timings`)
    slot: int = -1  # llama_cpp: the server slot it ran in


class _RemoteBackend:
    def __init__(self, opts: RemoteOptions) -> None:
        self.opts = opts
        self._session: Any = None
        self._free_slots = opts.slot_ids()[::-1]
        self._heads: dict[str, list[int]] = {}  # llama_cpp: the prompt's BOS head -> its token ids
        self._server_slots: int | None = None  # llama_cpp: the server's slot count, once asked

    def acquire_slot(self) -> int:
        """A llama.cpp server slot for one stream (-1: none free, the server picks by prompt similarity)."""
        return self._free_slots.pop() if self._free_slots else -1

    def release_slot(self, slot: int) -> None:
        if slot >= 0 and (self._server_slots is None or slot < self._server_slots):
            self._free_slots.append(slot)

    async def _check_slots(self, slot: int) -> int:
        """Once: the server's slot count (`/props` `total_slots`). A slot it does not have would wrap
        around onto another (the server takes `id_slot` modulo its count) and two streams would evict
        each other's prefix: such slots are dropped, with a warning, and the check goes unpinned."""
        if self._server_slots is None:
            http = await self._http()
            async with http.get(self.opts.base_url.rstrip("/") + "/props") as resp:
                props = await resp.json(content_type=None) if resp.status == 200 else {}
            n = int(props.get("total_slots") or 0) or 1 << 30  # a server that does not say: trust `slots`
            self._server_slots = n
            if any(i >= n for i in self.opts.slot_ids()):
                log.warning(
                    "llama_guard remote: slots %s, but %s has %d slots (--parallel): streams beyond them go "
                    "unpinned (id_slot -1)", self.opts.slots, self.opts.base_url, n
                )
                self._free_slots = [i for i in self._free_slots if i < n]
        return slot if slot < self._server_slots else -1

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
        self,
        turns: Sequence[Turn],
        categories: Mapping[str, str],
        excluded: Sequence[str],
        custom: bool,
        *,
        prompt: str | None = None,
        slot: int = -1,
        threshold: float = 0.5,
        decode: bool = True,
    ) -> RemoteResult:
        """One check; `prompt` (llama_cpp): the rendered prompt, `slot`: the stream's server slot."""
        o = self.opts
        if o.api == "llama_cpp":
            assert prompt is not None
            return await self._llama_cpp(prompt, slot, threshold, decode)
        flagged, score, codes, text = await self._check_api(turns, categories, excluded, custom)
        return RemoteResult(flagged, score, codes, text)

    async def _llama_cpp(self, prompt: str, slot: int, threshold: float, decode: bool) -> RemoteResult:
        # P(unsafe) exactly as in-process (softmax over the two verdict tokens' logits), whatever else the
        # model ranks first: the same large bias on both words keeps their ratio and puts them on top;
        # top_k 2 keeps just them (no temperature: the chain is the bias, top-k and a seeded draw), and
        # `post_sampling_probs` reports their probabilities after it. (Without top_k the server would
        # softmax and sort the whole vocabulary for the probabilities: +3-7 ms a check on 2 cores.)
        if slot >= 0:
            slot = await self._check_slots(slot)
        head, rest = await self._bos_head(prompt)
        body: dict[str, Any] = {
            "prompt": [*head, rest] if head else rest,
            "n_predict": 1,
            "cache_prompt": True,
            "id_slot": slot,
            "n_probs": 2,
            "post_sampling_probs": True,
            "samplers": ["top_k"],
            "top_k": 2,
            "logit_bias": [[w, VERDICT_BIAS] for w in VERDICT_WORDS],
            "seed": 0,
        }
        data = await self._post("/completion", body)
        evaluated, reused = _llama_cpp_tokens(data)
        server_ms = _llama_cpp_ms(data)
        score = _score_from_top_logprobs(_llama_cpp_tops(data))
        text = str(data.get("content") or "")
        if score is None:
            flagged, _ = parse_output(text)
            if flagged is None:
                raise RuntimeError(f"llama_guard remote: unparseable answer {text[:80]!r}")
            score = float(flagged)
        codes: list[str] = []
        if score >= threshold and decode:
            # The categories, greedy after a forced "unsafe" (as in-process): the prompt is all in the
            # slot's cache, so this evaluates that one word and the few tokens it generates.
            forced = [*head, rest + "unsafe"] if head else rest + "unsafe"
            more = await self._post(
                "/completion",
                {"prompt": forced, "n_predict": CATEGORY_TOKENS, "temperature": 0, "cache_prompt": True,
                 "id_slot": slot},
            )
            text = "unsafe" + str(more.get("content") or "")
            evaluated += _llama_cpp_tokens(more)[0]
            server_ms += _llama_cpp_ms(more)
            _, codes = parse_output(text)
        used = int(data.get("id_slot", slot)) if isinstance(data.get("id_slot", slot), int) else slot
        return RemoteResult(score >= threshold, score, codes, text, evaluated, reused, round(server_ms, 3), used)

    async def _bos_head(self, prompt: str) -> tuple[list[int], str]:
        """The prompt as llama.cpp's mixed form `[ids..., text]`: the template's own `<|begin_of_text|>`
        (and the space LG3-8B's template puts before it) as token ids, the rest as text. Sent as one
        string, the server would add a BOS of its own in front (two BOS; not what in-process
        evaluates); a prompt that starts with token ids gets none. The ids come from the server's
        `/tokenize`, once per head."""
        i = prompt.find(BOS_TEXT)
        if i < 0 or i > 1:
            return [], prompt
        head = prompt[: i + len(BOS_TEXT)]
        ids = self._heads.get(head)
        if ids is None:
            data = await self._post("/tokenize", {"content": head, "add_special": False, "parse_special": True})
            ids = [int(t) for t in data.get("tokens") or []]
            if not ids:
                raise RuntimeError(f"llama_guard remote: /tokenize gave no tokens for {head!r}")
            self._heads[head] = ids
        return ids, prompt[len(head) :]

    async def _check_api(
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



def _llama_cpp_tokens(data: Mapping[str, Any]) -> tuple[int, int]:
    """(prompt tokens the server evaluated, prompt tokens it took from the slot's cache): `timings`
    `prompt_n` / `cache_n`, else the top-level `tokens_evaluated` (the whole prompt) less `tokens_cached`."""
    timings = data.get("timings") or {}
    if "prompt_n" in timings:
        return int(timings["prompt_n"] or 0), int(timings.get("cache_n") or 0)
    cached = int(data.get("tokens_cached") or 0)
    return max(int(data.get("tokens_evaluated") or 0) - cached, 0), cached


def _llama_cpp_ms(data: Mapping[str, Any]) -> float:
    """The server's time for a request: prompt evaluation and generation (`timings`), 0 if absent."""
    timings = data.get("timings") or {}
    return float(timings.get("prompt_ms") or 0.0) + float(timings.get("predicted_ms") or 0.0)


def _llama_cpp_tops(data: Mapping[str, Any]) -> list[dict[str, float]]:
    """The first generated token's top alternatives as {token: logprob}, from each format the llama.cpp
    server has used: `top_probs` with probabilities (with `post_sampling_probs`), `top_logprobs` with
    log-probabilities (without), `probs` with `tok_str` and probabilities (older servers)."""
    out: list[dict[str, float]] = []
    for item in data.get("completion_probabilities") or []:
        if "top_probs" in item:
            out.append({str(e.get("token", "")): _log(e.get("prob")) for e in item["top_probs"]})
        elif "top_logprobs" in item:
            out.append({str(e.get("token", "")): float(e.get("logprob", -1e9)) for e in item["top_logprobs"]})
        elif "probs" in item:
            out.append({str(e.get("tok_str", "")): _log(e.get("prob")) for e in item["probs"]})
    return out


def _log(p: Any) -> float:
    return math.log(max(float(p or 0.0), 1e-30))

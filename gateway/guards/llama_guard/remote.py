"""Llama Guard on another server: the Llama API's /moderations or an OpenAI-compatible server.

Kept apart so the HTTP client can move onto the guards' shared chat client (`GuardResources`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from gateway.guards.base import GuardConfigError
from gateway.guards.llama_guard.parsing import _score_from_top_logprobs, parse_output
from gateway.guards.llama_guard.prompt import Turn, render_lg3, render_lg4

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


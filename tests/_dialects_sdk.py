"""Feed bytes to the real SDKs' stream and response machinery, without a network (helpers for
tests/test_dialects_*.py)."""

from __future__ import annotations

from typing import Any

import httpx
import httpx2
import llama_api_client
import openai
from llama_api_client.types import CreateChatCompletionResponseStreamChunk
from openai.types.chat import ChatCompletionChunk

_OPENAI = openai.OpenAI(api_key="test", base_url="http://gateway.invalid/v1", max_retries=0)
_LLAMA = llama_api_client.LlamaAPIClient(api_key="test", base_url="http://gateway.invalid", max_retries=0)


def openai_chunks(body: bytes, pieces: int = 0) -> list[ChatCompletionChunk]:
    """What `for chunk in client.chat.completions.create(stream=True)` yields for this body
    (optionally delivered in `pieces`-byte TCP chunks)."""
    content: Any = body if not pieces else iter([body[i : i + pieces] for i in range(0, len(body), pieces)])
    resp = httpx2.Response(
        200, content=content, request=httpx2.Request("POST", "http://gateway.invalid/v1/c")
    )
    return list(openai.Stream(cast_to=ChatCompletionChunk, response=resp, client=_OPENAI))


def llama_chunks(body: bytes, pieces: int = 0) -> list[CreateChatCompletionResponseStreamChunk]:
    content: Any = body if not pieces else iter([body[i : i + pieces] for i in range(0, len(body), pieces)])
    resp = httpx.Response(200, content=content, request=httpx.Request("POST", "http://gateway.invalid/v1/c"))
    return list(
        llama_api_client.Stream(cast_to=CreateChatCompletionResponseStreamChunk, response=resp, client=_LLAMA)
    )


def openai_status_error(status: int, body: dict[str, Any]) -> openai.APIStatusError:
    resp = httpx2.Response(status, json=body, request=httpx2.Request("POST", "http://gateway.invalid/v1/c"))
    return _OPENAI._make_status_error_from_response(resp)


def llama_status_error(status: int, body: dict[str, Any]) -> llama_api_client.APIStatusError:
    resp = httpx.Response(status, json=body, request=httpx.Request("POST", "http://gateway.invalid/v1/c"))
    return _LLAMA._make_status_error_from_response(resp)

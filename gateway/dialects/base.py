"""What every dialect module provides (`gateway/dialects/openai.py`, `llama_api.py`).

A dialect turns its wire format into the neutral types of `gateway.types` and back. Nothing
outside `dialects/` knows a wire format. Decoders never raise anything but `DialectError`
(a clean 400 in the client's format), whatever bytes they are given.
"""

from __future__ import annotations

from typing import Any, Protocol

from gateway.types import Completion, Event, Exchange


class DialectError(ValueError):
    """A body that does not decode: becomes an error response in the client's dialect."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None,
                 code: str | None = "invalid_request", type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code
        self.type = type


class StreamDecoder(Protocol):
    """Upstream SSE events (already framed by `sse.SSEParser`) → neutral events."""

    def feed(self, event: str | None, data: str) -> list[Event]: ...

    def done(self) -> bool:
        """True once the dialect's terminator was seen (OpenAI `[DONE]`; Llama: after `metrics`)."""
        ...


class StreamEncoder(Protocol):
    """Neutral events → SSE bytes in the client's dialect (each return value holds whole frames)."""

    def encode(self, event: Event) -> bytes: ...

    def end(self) -> bytes:
        """The dialect's terminator (OpenAI `data: [DONE]`; nothing for Llama). Idempotent."""
        ...

    def error(self, message: str, code: str) -> bytes:
        """A mid-stream error frame that the client's SDK raises as its APIError."""
        ...


class Dialect(Protocol):
    name: str  # "openai" | "llama"

    def decode_request(self, body: bytes) -> Exchange: ...
    def encode_request(self, ex: Exchange) -> dict[str, Any]: ...
    def decode_response(self, body: bytes) -> Completion: ...
    def encode_response(self, c: Completion, ex: Exchange) -> dict[str, Any]: ...
    def stream_decoder(self) -> StreamDecoder: ...
    def stream_encoder(self, ex: Exchange) -> StreamEncoder: ...

    def error_body(self, status: int, message: str, *, type: str = "invalid_request_error",
                   code: str | None = None, param: str | None = None) -> dict[str, Any]:
        """The JSON body of an error Guardgate itself produces on a route of this dialect."""
        ...

    def decode_error(self, status: int, body: bytes) -> tuple[str, str | None]:
        """(message, code) from an upstream error body of this dialect, for translation."""
        ...

"""What every dialect module provides (`gateway/dialects/openai.py`, `llama_api.py`).

A dialect turns its wire format into the neutral types of `gateway.types` and back. Nothing
outside `dialects/` knows a wire format. Decoders never raise anything but `DialectError`
(a clean 400 in the client's format), whatever bytes they are given; decoders of upstream bytes
(responses, stream events, model lists) raise it with status 502.

Fields with no neutral counterpart ride in `Exchange.extra` / `Completion.extra` /
`StreamStart.extra` under the dialect's name (`extra["openai"]`, `extra["llama"]`): only that
dialect's encoder re-emits them, so a same-dialect upstream keeps them and any other drops them.
`extra["guardgate"]` on a Completion is rendered by every dialect (the non-stream counterpart of
the `Annotation` stream event).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypedDict

from gateway.dialects._common import DialectError, ModelInfo, UpstreamStreamError
from gateway.types import Completion, Event, Exchange, Message

__all__ = ["DialectError", "ModelInfo", "UpstreamStreamError"]  # re-exported: where importers found them

if TYPE_CHECKING:
    from gateway.dialects.stream import StreamEncoder


class ModerationResult(TypedDict):
    """One moderation verdict in neutral form: Llama Guard category codes (S1..S14) and, where the
    source has them, per-code scores in 0..1."""

    flagged: bool
    categories: list[str]
    scores: dict[str, float]


@dataclass(slots=True)
class ModerationRequest:
    """A decoded moderation request: each input is one conversation and gets one result (OpenAI
    `input: [str, str]` is two inputs; a Llama `messages` list is one)."""

    model: str | None
    inputs: list[list[Message]] = field(default_factory=list)


class StreamDecoder(Protocol):
    """Upstream SSE events (already framed by `sse.SSEParser`) → neutral events."""

    def feed(self, event: str | None, data: str) -> list[Event]: ...

    def done(self) -> bool:
        """True once the dialect's terminator was seen (OpenAI `[DONE]`; Llama: after `metrics`)."""
        ...

    def ended_cleanly(self) -> bool:
        """True when EOF now would be a normal end (OpenAI: `[DONE]` seen; Llama: `complete` or
        `metrics` seen, since the Llama API may end a stream without a `metrics` event)."""
        ...


class ErrorCodec(Protocol):
    name: str

    def error_body(self, status: int, message: str, *, type: str = "invalid_request_error",
                   code: str | None = None, param: str | None = None) -> dict[str, Any]:
        """The JSON body of an error Guardgate itself produces on a route of this dialect."""
        ...

    def decode_error(self, status: int, body: bytes) -> tuple[str, str | None]:
        """(message, code) from an upstream error body of this dialect, for translation. Never raises."""
        ...


class ClientCodec(ErrorCodec, Protocol):
    """What a dialect does for the client: decode its request, encode the answer and the stream
    (`gateway.dialects.stream.StreamEncoder`). Chat (both dialects), legacy completions and the
    Responses API each have one."""

    def decode_request(self, body: bytes) -> Exchange: ...
    def decode_payload(self, obj: dict[str, Any]) -> Exchange: ...
    def encode_response(self, c: Completion, ex: Exchange) -> dict[str, Any]: ...
    def stream_encoder(self, ex: Exchange) -> StreamEncoder: ...


class UpstreamCodec(ErrorCodec, Protocol):
    """What a dialect does toward an upstream: encode the request, decode the answer and the stream.
    Chat (both dialects) and legacy completions have one; the Responses API has none (it is answered
    through a chat upstream)."""

    def encode_request(self, ex: Exchange) -> dict[str, Any]: ...
    def decode_response(self, body: bytes) -> Completion: ...
    def stream_decoder(self) -> StreamDecoder: ...


class Dialect(ClientCodec, UpstreamCodec, Protocol):
    """A whole dialect (`openai`, `llama`): both halves of chat, plus models and moderations."""

    def encode_models(self, models: list[ModelInfo]) -> dict[str, Any]: ...
    def decode_models(self, body: bytes) -> list[ModelInfo]: ...
    def decode_moderation_request(self, body: bytes | dict[str, Any]) -> ModerationRequest: ...
    def encode_moderation_request(self, req: ModerationRequest) -> dict[str, Any]: ...
    def encode_moderation_response(self, results: list[ModerationResult], *, model: str,
                                   id: str | None = None) -> dict[str, Any]: ...
    def decode_moderation_response(self, body: bytes) -> list[ModerationResult]: ...

"""Upstreams that produce neutral types directly (no wire format), e.g. the embedded llama.cpp model.

HTTP upstreams (`upstreams/http.py`) speak a dialect and are relayed or translated by the server;
a `NeutralUpstream` is called with a decoded `Exchange` and answers in neutral types, so any client
dialect can reach it through the same encoders.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator

from gateway.types import Completion, Event, Exchange


class UpstreamError(Exception):
    """The upstream could not answer; `status` is what the client gets (502, 503, 504, 404...)."""

    def __init__(self, message: str, status: int = 502, code: str = "upstream_error") -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code


class NeutralUpstream(ABC):
    name: str

    @abstractmethod
    async def complete(self, ex: Exchange) -> Completion:
        """A whole answer (non-stream request)."""

    @abstractmethod
    def stream(self, ex: Exchange) -> AsyncIterator[Event]:
        """StreamStart, TextDelta*, Finish, UsageEvent — cancelling the iterator stops generation."""

    async def models(self) -> list[str]:
        return []

    async def start(self) -> None:
        """Load the model (called at server start-up)."""

    async def aclose(self) -> None:
        """Release the model."""

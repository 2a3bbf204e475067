"""Responses conversations the gateway guarded, kept so a client can continue one with
`previous_response_id` (`responses_state: gateway`).

The Responses API lets a client send only its new turn and name the previous response: the rest of
the conversation is state the provider keeps, and no input guard can read it. Guardgate serves
Responses requests through the upstream's chat API, so it has that state only if it keeps it: each
answer it released is stored (the conversation it guarded plus the answer as the client got it)
under the response id, per gateway key, bounded in number and age. A continuation is then the stored
conversation plus the new input, guarded whole. Without the store such a request is refused.
"""

from __future__ import annotations

from cachetools import TTLCache

from gateway.types import Message

MAX_CONVERSATIONS = 4096
TTL_S = 3600.0


class ResponseStore:
    """response id → the conversation up to and including that response, per owner (gateway key)."""

    def __init__(self, max_conversations: int = MAX_CONVERSATIONS, ttl_s: float = TTL_S) -> None:
        self._items: TTLCache[tuple[str, str], list[Message]] = TTLCache(max_conversations, ttl_s)

    def get(self, owner: str, response_id: str) -> list[Message] | None:
        found = self._items.get((owner, response_id))
        return list(found) if found is not None else None

    def put(self, owner: str, response_id: str, conversation: list[Message]) -> None:
        self._items[(owner, response_id)] = list(conversation)

    def __len__(self) -> int:
        return len(self._items)

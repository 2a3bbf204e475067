"""The gateway's own error (a leaf: imports nothing of ours). Every layer may raise it; the server
renders it in the client's dialect. `gateway.context` re-exports it."""

from __future__ import annotations


class GatewayError(Exception):
    """An error Guardgate answers itself, rendered in the client's dialect."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        retry: bool | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.type, self.param = status, message, code, type, param
        self.retry = retry
        self.headers = headers  # extra response headers (a 429's Retry-After and x-ratelimit-*)

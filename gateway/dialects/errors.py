"""The errors a dialect raises (a leaf: every dialect module imports it, it imports nothing of ours)."""

from __future__ import annotations


class DialectError(ValueError):
    """A body that does not decode: becomes an error response in the client's dialect."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        param: str | None = None,
        code: str | None = "invalid_request",
        type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code
        self.type = type


class UpstreamStreamError(DialectError):
    """The upstream stream carried an error event or an undecodable event (mid-stream: a 502).

    Raised by `StreamDecoder.feed`; the server ends the client's stream with `StreamEncoder.error`.
    """

    def __init__(
        self,
        message: str,
        *,
        code: str | None = "upstream_error",
        type: str = "upstream_error",
        status: int = 502,
    ) -> None:
        super().__init__(message, status=status, code=code, type=type)

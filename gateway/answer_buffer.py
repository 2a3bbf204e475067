"""Read an upstream answer as fast as the upstream sends it, whatever the client's pace.

What nginx's proxy buffering does: a reader task takes the upstream body into memory (up to
`limit` bytes not yet written), so an answer that fits is read to its end and its connection goes
back to the pool at once, while the client is written to at its own pace. A client that stops
reading then holds memory (at most `limit`), not an upstream connection. Past `limit` the reader
waits for the writer (back-pressure), and the caller's send timeout decides, as for a stream.
Bytes are passed on as they arrive (no wait for the whole answer): a chunked audio or NDJSON answer
keeps its timing.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncGenerator

import aiohttp

from gateway.upstreams.base import UpstreamError


async def buffered(resp: aiohttp.ClientResponse, limit: int) -> AsyncGenerator[bytes, None]:
    """The body of `resp`, each item all that arrived since the last one. Errors of the upstream
    (aiohttp.ClientError, TimeoutError) are raised where the reader met them, after the bytes that
    came before them. Closing the generator stops the reader."""
    chunks: deque[bytes] = deque()
    size = 0
    more = asyncio.Event()  # set by the reader: bytes, the end, or an error
    room = asyncio.Event()  # set by the writer: it took bytes
    error: BaseException | None = None
    done = False

    async def read() -> None:
        nonlocal size, error, done
        try:
            async for chunk in resp.content.iter_any():
                chunks.append(chunk)
                size += len(chunk)
                more.set()
                while size > limit:
                    room.clear()
                    await room.wait()
        except (aiohttp.ClientError, TimeoutError) as e:
            error = e
        finally:
            done = True
            more.set()

    reader = asyncio.get_running_loop().create_task(read())
    try:
        while True:
            if chunks:
                data = b"".join(chunks) if len(chunks) > 1 else chunks[0]
                chunks.clear()
                size = 0
                room.set()
                yield data
                continue
            if done:
                if error is not None:
                    raise error
                return
            more.clear()
            await more.wait()
    finally:
        if not reader.done():
            reader.cancel()
            await asyncio.wait([reader])


async def read_upto(resp: aiohttp.ClientResponse, limit: int) -> tuple[bytes, bool]:
    """(body, True) when the whole body is at most `limit` bytes (the connection is then back in the
    pool), else (what was read, False). UpstreamError when the upstream fails."""
    buf = bytearray()
    try:
        async for chunk in resp.content.iter_any():
            buf += chunk
            if len(buf) > limit:
                return bytes(buf), False
    except TimeoutError:
        raise UpstreamError("upstream timed out while sending its answer", 504, "upstream_timeout") from None
    except aiohttp.ClientError as e:
        raise UpstreamError(
            f"upstream failed while sending its answer: {type(e).__name__}", 502, "upstream_error"
        ) from None
    return bytes(buf), True

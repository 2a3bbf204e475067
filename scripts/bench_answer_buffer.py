"""buffered() vs plain iter_any on a 64 MiB chunked body over loopback, side by side."""

import asyncio
import statistics
import time

import aiohttp
import uvloop
from aiohttp import web

from gateway.answer_buffer import buffered

BODY = b"x" * (1 << 20)


async def big(request):
    r = web.StreamResponse()
    await r.prepare(request)
    for _ in range(64):
        await r.write(BODY)
    await r.write_eof()
    return r


async def main():
    app = web.Application()
    app.router.add_get("/", big)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    async with aiohttp.ClientSession() as s:
        t = {"plain": [], "buffered": []}
        for _ in range(6):
            for kind in ("plain", "buffered"):
                t0 = time.perf_counter()
                n = 0
                async with s.get(f"http://127.0.0.1:{port}/") as resp:
                    it = resp.content.iter_any() if kind == "plain" else buffered(resp, 16 << 20)
                    async for c in it:
                        n += len(c)
                t[kind].append(time.perf_counter() - t0)
        p, b = statistics.median(t["plain"]), statistics.median(t["buffered"])
        print(f"64 MiB: plain {p * 1000:.1f} ms, buffered {b * 1000:.1f} ms, ratio {b / p:.2f}")
    await runner.cleanup()


if __name__ == "__main__":
    uvloop.install()
    asyncio.run(main())

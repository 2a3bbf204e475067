"""`guardgate guards serve`: run a guard engine (a Unix socket on this machine, or HTTP for others)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
from pathlib import Path


def add_guards_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("guards", help="the shared guard engine (guard models loaded once for many workers)")
    gsub = p.add_subparsers(dest="guards_command", required=True)
    s = gsub.add_parser("serve", help="run a guard engine")
    where = s.add_mutually_exclusive_group(required=True)
    where.add_argument("--socket", help="listen on this Unix socket (workers on this machine)")
    where.add_argument("--port", type=int, help="listen on this TCP port (replicas on other machines)")
    s.add_argument("--host", default="127.0.0.1", help="address for --port (default 127.0.0.1)")
    s.add_argument(
        "--session-ttl-s", type=float, default=300.0, help="close a stream session idle this long (its worker died)"
    )
    s.add_argument("--log-level", default=os.environ.get("GUARDGATE_LOG_LEVEL", "INFO"))


def main_guards(args: argparse.Namespace) -> int:
    from aiohttp import web

    from gateway.cli import serve_loop_policy
    from gateway.guard_engine.service import GuardEngineService, create_app

    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s",
    )
    asyncio.set_event_loop_policy(serve_loop_policy())
    app = create_app(GuardEngineService(session_ttl_s=args.session_ttl_s))
    where = f"unix:{args.socket}" if args.socket else f"http://{args.host}:{args.port}"

    async def run() -> None:
        runner = web.AppRunner(app, handle_signals=True, access_log=None)
        await runner.setup()
        try:
            if args.socket:
                with contextlib.suppress(FileNotFoundError):
                    Path(args.socket).unlink()  # a stale socket of an engine that died
                await web.UnixSite(runner, args.socket).start()
            else:
                await web.TCPSite(runner, args.host, args.port).start()
            print(f"guardgate guard engine listening on {where} (pid {os.getpid()})", file=sys.stderr, flush=True)
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    loop = asyncio.new_event_loop()
    task = loop.create_task(run())
    try:
        loop.run_until_complete(task)
    except (web.GracefulExit, KeyboardInterrupt):
        pass
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, web.GracefulExit, KeyboardInterrupt):
            loop.run_until_complete(task)
        loop.close()
    return 0

"""`guardgate` command line: serve | check | eval | models | audit | doctor."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import sys
from pathlib import Path
from typing import Any

from gateway.config import GatewayConfig, Route, UpstreamConfig, load_file
from gateway.yamlio import ConfigError

DEFAULT_CONFIG = Path("conf/gateway.yaml")
STARTER = "starter"  # gateway.starter.NAME, without importing the policy machinery here
NO_POLICY = "none"


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    """The flags that decide the configuration (`serve` and `doctor` read it the same way)."""
    p.add_argument("--config", help=f"gateway YAML (default: {DEFAULT_CONFIG} when present)")
    p.add_argument("--upstream", help="upstream base URL, e.g. https://api.openai.com/v1")
    p.add_argument("--upstream-dialect", choices=("openai", "llama"), default="openai")
    p.add_argument("--upstream-key-env", help="environment variable holding the upstream API key")
    p.add_argument("--local-model",
                   help="serve chat from a local GGUF (manifest name or path) instead of an HTTP upstream")
    p.add_argument("--host", default=os.environ.get("GUARDGATE_HOST"), help="address to bind ($GUARDGATE_HOST)")
    p.add_argument("--port", type=int, default=_env_port(), help="port ($GUARDGATE_PORT)")
    p.add_argument("--policy", help="policy name (from policies/, or the built-in `starter`) or YAML file applied "
                   "to every request; `none` turns guarding off (default with no --config: starter)")
    p.add_argument("--audit", help="audit log path (JSONL)")


def _serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the gateway")
    add_config_arguments(p)
    p.add_argument("--log-level", default=os.environ.get("GUARDGATE_LOG_LEVEL", "INFO"))


def _env_port() -> int | None:
    v = os.environ.get("GUARDGATE_PORT")
    return int(v) if v and v.isdigit() else None


def build_config(args: argparse.Namespace) -> GatewayConfig:
    """Config from --config / conf/gateway.yaml, or from the quick flags, or the embedded local model.

    The quick flags (and no flags at all) guard with the built-in `starter` policy: a safety gateway
    that does nothing until configured is a trap. A config file says what it wants."""
    path = args.config or (str(DEFAULT_CONFIG) if DEFAULT_CONFIG.exists() and not args.upstream else None)
    if path:
        cfg = load_file(path)
    elif args.upstream:
        if not args.upstream.startswith(("http://", "https://")):
            raise ConfigError(f"--upstream must be an http(s) URL, got {args.upstream!r}")
        up = UpstreamConfig(name="default", base_url=args.upstream.rstrip("/"), dialect=args.upstream_dialect,
                            api_key_env=args.upstream_key_env)
        cfg = GatewayConfig(upstreams={"default": up}, routes=[Route(upstream="default", policy=STARTER)])
    else:
        up = UpstreamConfig(name="local", type="llama_cpp", dialect="openai",
                            model=args.local_model or "gemma-3-270m")
        cfg = GatewayConfig(upstreams={"local": up}, routes=[Route(upstream="local", policy=STARTER)])
    if args.host:
        cfg.host = args.host
    if args.port is not None:
        cfg.port = args.port
    if args.policy == NO_POLICY or cfg.policy == NO_POLICY:
        cfg.policy = None  # guarding off everywhere: routes and keys too
        for r in cfg.routes:
            r.policy = None
        for k in cfg.keys:
            k.policy = None
    elif args.policy:
        cfg.policy = args.policy
    if args.audit:
        cfg.audit_path = args.audit
    return cfg


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s")


def main_serve(args: argparse.Namespace) -> int:
    from aiohttp import web

    from gateway.server import Gateway, create_app

    _setup_logging(args.log_level)
    try:
        cfg = build_config(args)
        policies, audit = _policies_and_audit(cfg)
    except ConfigError as e:
        print(f"guardgate: {e}", file=sys.stderr)
        return 2
    asyncio.set_event_loop_policy(serve_loop_policy())
    gw = Gateway(cfg, policies=policies, audit=audit)
    app = create_app(gw)
    _tune_gc()
    _return_freed_buffers()
    loop = asyncio.new_event_loop()
    main_task = loop.create_task(_serve(app, cfg, gw))
    try:
        loop.run_until_complete(main_task)
    except (web.GracefulExit, KeyboardInterrupt):  # SIGTERM / SIGINT
        pass
    finally:
        main_task.cancel()  # its `finally` runs the graceful cleanup
        with contextlib.suppress(asyncio.CancelledError, web.GracefulExit, KeyboardInterrupt):
            loop.run_until_complete(main_task)
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
    return 0


def serve_loop_policy() -> asyncio.AbstractEventLoopPolicy:
    """The event loop policy `serve` runs under: uvloop's where it is installed, else asyncio's.

    The test suite installs the same one (tests/conftest.py) and a test compares them: code that
    works under asyncio's loop and not under uvloop (semgrep's argv[0] did) must fail in the tests."""
    try:
        import uvloop
    except ImportError:
        return asyncio.DefaultEventLoopPolicy()
    return uvloop.EventLoopPolicy()


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    """`module.Class` of an event loop, as the startup line prints it."""
    return f"{type(loop).__module__}.{type(loop).__qualname__}"


async def _serve(app: Any, cfg: GatewayConfig, gw: Any = None) -> None:
    """`web.run_app`'s steps: SIGINT/SIGTERM raise GracefulExit; cleanup lets in-flight responses finish
    within shutdown_grace_s. Once listening, the startup table goes to stderr."""
    from aiohttp import web

    runner = web.AppRunner(app, handle_signals=True, access_log=None, shutdown_timeout=cfg.shutdown_grace_s,
                           handler_cancellation=True)
    await runner.setup()
    try:
        await web.TCPSite(runner, cfg.host, cfg.port).start()
        if gw is not None:
            from gateway.readiness import describe, render

            # The one `listening` line: the table's first, printed once the socket is bound.
            print(render(describe(gw), event_loop=loop_name(asyncio.get_running_loop())), file=sys.stderr, flush=True)
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD = 64 * 1024


def _return_freed_buffers() -> None:
    """Request bodies arrive as many 64 KiB-ish buffers. glibc raises its mmap threshold after the
    first large free, so later ones come from the heap and stay in RSS once freed: 40 connections
    that sent 4 MiB and hung up left ~190 MB resident for good (scripts/probe_memory.py). A fixed
    threshold puts buffers of 64 KiB and more in their own mappings, given back to the OS on free:
    RSS then returns to its warm baseline. Linux/glibc only; elsewhere a no-op."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    except (OSError, AttributeError):  # musl and others: no mallopt
        pass


def _tune_gc() -> None:
    """What is loaded by now lives as long as the process: move it out of the cyclic GC's reach so
    full collections only walk request-time objects. (The collection thresholds stay at Python's
    defaults: raising them made RSS grow by ~20 KB per request under 300 concurrent guarded streams,
    because objects alive across a stream get promoted and full collections became rare;
    scripts/loadtest.py caught it.)"""
    gc.collect()
    gc.freeze()


def _policies_and_audit(cfg: GatewayConfig):  # type: ignore[no-untyped-def]
    """The policy store and audit log the config asks for (None when no policy is used anywhere)."""
    audit = None
    if cfg.audit_path:
        from gateway.policy.audit import AuditLog

        audit = AuditLog(cfg.audit_path, include_content=cfg.audit_content, max_bytes=cfg.audit_max_bytes,
                         backups=cfg.audit_backups)
    return policy_store(cfg), audit


def policy_store(cfg: GatewayConfig):  # type: ignore[no-untyped-def]
    """The policies the config uses, loaded (None when it uses none); raises PolicyError."""
    # `policy:` / --policy overrides routes and keys (routing.Router.policy_name): load only what is used
    names = {cfg.policy} if cfg.policy else {r.policy for r in cfg.routes} | {k.policy for k in cfg.keys}
    names.discard(None)
    if not names:
        return None
    from gateway.policy.chain import PolicyStore

    builtins = []
    if STARTER in names:
        from gateway import starter

        builtins.append(starter.build())
    return PolicyStore(dirs=cfg.policy_dirs, required=sorted(n for n in names if n), builtins=builtins)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="guardgate", description="Inline safety gateway for LLM traffic.")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    handlers = {"serve": main_serve}
    for module, adder, runner, name in (
        ("gateway.check", "add_check_parser", "main_check", "check"),
        ("gateway.evaluation.cli", "add_eval_parser", "main_eval", "eval"),
        ("gateway.models", "add_models_parser", "main_models", "models"),
        ("gateway.audit_cli", "add_audit_parser", "main_audit", "audit"),
        ("gateway.doctor", "add_doctor_parser", "main_doctor", "doctor"),
    ):
        try:
            mod = __import__(module, fromlist=[adder])
        except ImportError:
            continue
        getattr(mod, adder)(sub)
        handlers[name] = getattr(mod, runner)
    args = parser.parse_args(argv)
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())

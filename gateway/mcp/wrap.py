"""`guardgate mcp wrap -- CMD ARGS...`: a stdio MCP server under the same policy as the gateway.

Editor and desktop agents launch local MCP servers by command, speaking newline-delimited JSON-RPC on
stdin/stdout. Put `guardgate mcp wrap --` in front of that command: Guardgate starts the server as
its child and sits between the two pipes, applying the policy to every message exactly as the HTTP
proxy does (`gateway.mcp.traffic`). A refused client request is answered on stdout; a refused
server request is answered on the child's stdin; a line that is not JSON-RPC gets a JSON-RPC error
(from the client) or is dropped (from the server). The policy and config are read as `serve` reads
them (`--config`, `--policy`, `--audit`; with neither, the built-in `starter` policy). The child's
stderr is Guardgate's stderr; Guardgate's own logs go to stderr too (stdout is the protocol).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from typing import Any

from gateway.mcp import jsonrpc
from gateway.mcp.jsonrpc import Message
from gateway.mcp.mapping import Scope
from gateway.mcp.traffic import NotificationRefused, Traffic

log = logging.getLogger("guardgate.mcp")

MAX_LINE = 16 << 20


def add_mcp_parser(sub: argparse._SubParsersAction) -> None:
    from gateway.cli import add_config_arguments

    p = sub.add_parser("mcp", help="guard MCP servers")
    msub = p.add_subparsers(dest="mcp_command", required=True)
    w = msub.add_parser("wrap", help="run a stdio MCP server under a policy: guardgate mcp wrap -- CMD ARGS...")
    add_config_arguments(w)
    w.add_argument("--name", help="the server's name in the audit log (default: the command's file name)")
    w.add_argument("--log-level", default=os.environ.get("GUARDGATE_LOG_LEVEL", "WARNING"))
    w.add_argument("server", nargs=argparse.REMAINDER, help="-- then the server's command and arguments")


def main_mcp(args: argparse.Namespace) -> int:
    from gateway.cli import _policies_and_audit, build_config, serve_loop_policy
    from gateway.yamlio import ConfigError

    cmd = list(args.server)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        print("guardgate mcp wrap: give the server's command after --", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=args.log_level.upper(), stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    try:
        cfg = build_config(args)
        store, audit = _policies_and_audit(cfg)
    except ConfigError as e:
        print(f"guardgate: {e}", file=sys.stderr)
        return 2
    # --policy > the config's `policy:` > the `mcp_servers:` entry named by --name > the routes' (starter)
    server = cfg.mcp_servers.get(args.name) if args.name else None
    name = (
        args.policy
        or cfg.policy
        or (server.policy if server is not None else None)
        or next((r.policy for r in cfg.routes if r.policy), None)
    )
    asyncio.set_event_loop_policy(serve_loop_policy())
    return asyncio.run(wrap(cmd, store, name, audit, args.name or os.path.basename(cmd[0])))


async def wrap(cmd: list[str], store: Any, policy_name: str | None, audit: Any, server: str) -> int:
    policy = None
    if store is not None and policy_name:
        await store.start(watch=False, sighup=False)
        policy = store.get(policy_name)
    try:
        child = await asyncio.create_subprocess_exec(
            *cmd, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, limit=MAX_LINE
        )
    except OSError as e:
        print(f"guardgate mcp wrap: cannot start {cmd[0]!r}: {e}", file=sys.stderr)
        return 127
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader(limit=MAX_LINE)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    out = sys.stdout.buffer
    guard = None
    if policy is not None and policy.needs_inspection:
        scope = Scope(
            server=server,
            request_id=f"stdio-{os.getpid()}",
            key=None,
            audit=audit,
            record_audit=lambda rec: None,
            observe=lambda *a: None,
        )
        guard = Traffic(policy, scope)
    assert child.stdin is not None and child.stdout is not None
    to_server, from_server = child.stdin, child.stdout

    def to_client(line: bytes) -> None:
        out.write(line.rstrip(b"\r\n") + b"\n")
        out.flush()

    async def to_child(line: bytes) -> None:
        to_server.write(line.rstrip(b"\r\n") + b"\n")
        await to_server.drain()

    async def client_side() -> None:
        try:
            while line := await stdin.readline():
                if not line.strip():
                    continue
                if guard is None:
                    await to_child(line)
                    continue
                await _from_client(guard, line, to_client, to_child)
        except (ValueError, ConnectionError) as e:  # a line over the limit, or the child went away
            log.warning("mcp wrap: client side ended: %s", e)
        finally:
            if not to_server.is_closing():
                to_server.close()

    async def server_side() -> None:
        try:
            while line := await from_server.readline():
                if not line.strip():
                    continue
                if guard is None:
                    to_client(line)
                    continue
                msgs = jsonrpc.parse_data(line.decode("utf-8", "replace"))
                if msgs is None:
                    log.warning("mcp wrap: the server wrote a line that is not JSON-RPC: dropped")
                    continue
                forward, changed = [], False
                for m in msgs:
                    r = await guard.from_server(m)
                    if r.reply is not None:
                        await to_child(jsonrpc.dumps(r.reply))
                    if r.forward is not None:
                        forward.append(r.forward)
                    changed = changed or r.changed
                if forward:
                    batch = line.lstrip().startswith(b"[")
                    to_client(line if not changed else jsonrpc.dumps(forward if batch else forward[0]))
        except (ValueError, ConnectionError) as e:
            log.warning("mcp wrap: server side ended: %s", e)

    client_task = asyncio.create_task(client_side())
    await server_side()
    rc = await child.wait()
    client_task.cancel()
    if store is not None:
        await store.aclose()
    return rc


async def _from_client(guard: Traffic, line: bytes, to_client: Any, to_child: Any) -> None:
    try:
        msgs, batch = jsonrpc.parse_body(line)
    except Exception as e:  # GatewayError: not JSON-RPC
        code = int(getattr(e, "param", None) or jsonrpc.INVALID_REQUEST)
        to_client(jsonrpc.dumps(jsonrpc.error(None, code, getattr(e, "message", str(e)))))
        return
    errors: dict[int, dict[str, Any]] = {}
    for i, m in enumerate(msgs):
        try:
            err = await guard.from_client(m)
        except NotificationRefused as e:
            log.warning("mcp wrap: %s", e)
            errors[i] = {}
            continue
        if err is not None:
            errors[i] = err
    if errors:
        answers = [
            errors.get(i)
            or jsonrpc.error(m.id, jsonrpc.POLICY_REFUSED, "not sent: another message of this batch was refused")
            for i, m in enumerate(msgs)
            if m.kind == "request"
        ]
        if answers:
            to_client(jsonrpc.dumps(answers if batch else answers[0]))
        return
    await to_child(line if not guard.rewrote else _dump(msgs, batch))
    guard.rewrote = False


def _dump(msgs: list[Message], batch: bool) -> bytes:
    return jsonrpc.dumps([m.raw for m in msgs] if batch else msgs[0].raw)

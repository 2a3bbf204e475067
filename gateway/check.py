"""`guardgate check --policy P --input FILE.jsonl [--output OUT.jsonl] [--stream]`

Runs a policy offline over prompts and responses, prints a table of verdicts and writes one
JSON result per input line, so a policy can be tried before it is deployed. Each input line is
an object with `messages` (chat messages, OpenAI style; or `prompt`, a string taken as one user
message) and/or `response` (the assistant's answer), optionally `id` and `model`.

Responses are checked as a non-stream answer (output steps and, one-shot, stream steps), or with
`--stream` replayed through the stream gate one token per event, as a streamed answer would be.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any, TextIO

from gateway.policy.chain import PolicyRun
from gateway.policy.reload import PolicyStore
from gateway.policy.schema import Policy, PolicyError, load_policy
from gateway.policy.tokens import encoding
from gateway.types import (
    Completion,
    Event,
    Exchange,
    Finish,
    Message,
    Part,
    StreamStart,
    TextDelta,
    ToolCall,
    new_id,
)
from gateway.upstreams.chat_client import ChatClients
from gateway.yamlio import ConfigError

ROLES = ("system", "developer", "user", "assistant", "tool")


class InputError(ValueError):
    pass


def add_check_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("check", help="run a policy offline over prompts/responses and print verdicts",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy", required=True, help="policy name (looked up in --policy-dir) or a YAML file")
    p.add_argument("--input", required=True,
                   help="JSONL file, one {messages|prompt, response} per line ('-': stdin)")
    p.add_argument("--output", help="write one JSON result per input line to this file")
    p.add_argument("--policy-dir", action="append", default=None, help="policy directory (default: policies)")
    p.add_argument("--stream", action="store_true",
                   help="replay responses through the stream gate token by token (default: one-shot)")
    return p


def main_check(args: argparse.Namespace) -> int:
    try:
        policy = _load(args.policy, args.policy_dir or ["policies"])
    except (PolicyError, ConfigError, KeyError) as e:
        print(f"guardgate check: {e}", file=sys.stderr)
        return 2
    try:
        rows = _read_input(args.input)
    except (OSError, InputError) as e:
        print(f"guardgate check: {e}", file=sys.stderr)
        return 2
    results = asyncio.run(_run(policy, rows, stream=args.stream))
    _print_table(results, sys.stdout)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as fh:
            for r in results:
                fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    return 0


def _load(name: str, dirs: list[str]) -> Policy:
    if Path(name).is_file():
        return load_policy(name)
    return PolicyStore(dirs=dirs, required=[name]).get(name)


# --------------------------------------------------------------------------- input


def json_objects(path: str) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) of every non-blank line of a JSONL file (`-`: stdin); InputError names
    the file and line of a line that is not a JSON object."""
    fh: TextIO = sys.stdin if path == "-" else open(path, encoding="utf-8")  # noqa: SIM115
    name = "<stdin>" if path == "-" else path
    rows: list[tuple[int, dict[str, Any]]] = []
    try:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{name}:{n}: not JSON: {e.msg}") from None
            if not isinstance(obj, dict):
                raise InputError(f"{name}:{n}: expected a JSON object")
            rows.append((n, obj))
    finally:
        if fh is not sys.stdin:
            fh.close()
    return rows


def _read_input(path: str) -> list[tuple[int, dict[str, Any]]]:
    name = "<stdin>" if path == "-" else path
    rows = json_objects(path)
    for n, obj in rows:
        if not ({"messages", "prompt", "response"} & set(obj)):
            raise InputError(f"{name}:{n}: expected an object with messages, prompt and/or response")
        try:
            obj["_messages"] = _messages(obj)
        except InputError as e:
            raise InputError(f"{name}:{n}: {e}") from None
        if "response" in obj and not isinstance(obj["response"], str):
            raise InputError(f"{name}:{n}: response must be a string")
    return rows


def _messages(obj: dict[str, Any]) -> list[Message]:
    if "prompt" in obj:
        if not isinstance(obj["prompt"], str):
            raise InputError("prompt must be a string")
        return [Message.of("user", obj["prompt"])]
    raw = obj.get("messages", [])
    if not isinstance(raw, list):
        raise InputError("messages must be a list")
    out: list[Message] = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise InputError(f"messages[{i}] needs a role ({', '.join(ROLES)})")
        content = m.get("content")
        parts: list[Part] = []
        if isinstance(content, str):
            parts.append(Part("text", content))
        elif isinstance(content, dict):  # Llama API style {type: text, text}
            content = [content]
        if isinstance(content, list):
            for p in content:
                if isinstance(p, dict) and p.get("type") == "text":
                    parts.append(Part("text", str(p.get("text", ""))))
                elif isinstance(p, dict) and p.get("type") in ("image_url", "image"):
                    url = p.get("image_url")
                    parts.append(Part("image", image_url=url.get("url") if isinstance(url, dict) else url))
        calls = [ToolCall(id=str(tc.get("id", "")), name=str((tc.get("function") or {}).get("name", "")),
                          arguments=str((tc.get("function") or {}).get("arguments", "")))
                 for tc in m.get("tool_calls") or [] if isinstance(tc, dict)]
        out.append(Message(role=m["role"], parts=parts, tool_calls=calls, tool_call_id=m.get("tool_call_id")))
    return out


# --------------------------------------------------------------------------- running


async def _token_stream(text: str, model: str) -> Any:
    enc = encoding()
    yield StreamStart(id=new_id("chatcmpl-"), model=model)
    for tok in enc.encode_ordinary(text):
        yield TextDelta(enc.decode([tok]))
    yield Finish("stop")


async def _one(policy: Policy, n: int, obj: dict[str, Any], stream: bool) -> dict[str, Any]:
    model = str(obj.get("model", "offline"))
    rid = str(obj.get("id", f"line{n}"))
    messages: list[Message] = obj["_messages"]
    run = PolicyRun(policy, request_id=rid, route="check", model=model)
    ex = Exchange(model=model, messages=messages, stream=stream)
    out: dict[str, Any] = {"line": n, "id": rid}
    status = 200
    media = run.check_content(ex) if messages and policy.needs_inspection else None  # the `content:` rule
    if media is not None and media.refused is not None:
        status = 400
        out["input_blocked"] = media.message
    elif messages:
        decision = await run.check_input(ex)
        if decision.blocked:
            status = 400
            out["input_blocked"] = decision.message
    response = obj.get("response")
    if response is not None and status == 200:
        if stream:
            events: list[Event] = [ev async for ev in run.guard_stream(ex, _token_stream(response, model))]
            out["released"] = "".join(ev.text for ev in events if isinstance(ev, TextDelta))
            finishes = [ev.reason for ev in events if isinstance(ev, Finish)]
            out["finish_reason"] = finishes[-1] if finishes else None
        else:
            answer = Completion(id=rid, model=model, message=Message.of("assistant", response))
            c = await run.check_output(ex, answer)
            out["released"] = c.message.text
            out["finish_reason"] = c.finish_reason
    rec = run.finish(status=status)
    for k in ("action", "would_action", "blocked_stage", "leaked_tokens", "flagged_at", "steps", "media"):
        if k in rec:
            out[k] = rec[k]
    return out


async def _run(policy: Policy, rows: list[tuple[int, dict[str, Any]]], stream: bool) -> list[dict[str, Any]]:
    clients = ChatClients()  # judges on a `remote:` URL work; no configured upstream runs here
    await policy.start(clients)
    try:
        return [await _one(policy, n, obj, stream) for n, obj in rows]
    finally:
        await policy.aclose()
        await clients.aclose()


# --------------------------------------------------------------------------- output


def _print_table(results: list[dict[str, Any]], fh: TextIO) -> None:
    header = ("LINE", "ID", "STAGE", "GUARD", "VERDICT", "SCORE", "CATEGORIES", "OUTCOME", "MS")
    rows: list[tuple[str, ...]] = []
    for r in results:
        for s in r.get("steps", []):
            if s["verdict"] == "not run" and s["stage"] != "input" and "released" not in r:
                continue  # a stage this line did not exercise
            outcome = s.get("outcome") or (f"would {s['would']}" if s.get("would") else "-")
            score = "-" if s.get("score") is None else f"{s['score']:.3f}"
            verdict = s["verdict"] + (f" ({s['error']})" if s.get("error") else "")
            rows.append((str(r["line"]), str(r["id"])[:16], s["stage"], s["guard"], verdict[:48], score,
                         ",".join(s.get("categories", [])) or "-", outcome, f"{s['latency_ms']:.1f}"))
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))
    print(line.rstrip(), file=fh)
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip(), file=fh)
    blocked = sum(1 for r in results if r.get("action") == "block")
    flagged = sum(1 for r in results if any(s["verdict"] == "flagged" for s in r.get("steps", [])))
    errors = sum(1 for r in results if any(s["verdict"] == "error" for s in r.get("steps", [])))
    print(f"\n{len(results)} line(s): {blocked} blocked, {flagged} flagged, {errors} with guard errors",
          file=fh)

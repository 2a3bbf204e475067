"""Portkey's webhook guardrail (`default.webhook`): `POST /guardrails/{policy}/portkey`.

The Portkey gateway (@portkey-ai/gateway, plugins/default/webhook) posts the hook context:

    {"request": {"json": <the request body>, "text", "isStreamingRequest", "isTransformed"},
     "response": {"json": <the answer, afterRequestHook only>, "text", "statusCode"},
     "provider", "requestType": "chatComplete" | "complete" | "embed" | ..., "metadata",
     "eventType": "beforeRequestHook" | "afterRequestHook"}

and reads `{"verdict": bool, "transformedData": {"request": {"json"}} | {"response": {"json"}}}`:
a false verdict fails the check (with `deny: true` on the guardrail, the request gets 446; without,
246), transformed JSON replaces the request (before) or the answer (after). Portkey keeps the
answer's `data` in its hook results (`checks[].data.responseData`), so Guardgate puts its message and
verdicts there and they reach the client in the 446 body. Deny by default: a request or answer
this face cannot read (another request type, an answer without choices: e.g. a stream, where
Portkey has no JSON answer to show) gets verdict false, never true.
"""

from __future__ import annotations

import copy
from typing import Any

from gateway.context import GatewayError
from gateway.guardrails import chat
from gateway.guardrails.core import Outcome, answer_message, check_input, check_output, refuse
from gateway.guardrails.face import Call
from gateway.types import Message


def _fail(reason: str, out: Outcome | None = None) -> dict[str, Any]:
    data: dict[str, Any] = {"message": reason}
    if out is not None:
        data["guardgate"] = out.to_json()
    return {"verdict": False, "data": data}


def _pass(out: Outcome) -> dict[str, Any]:
    return {"verdict": True, "data": {"guardgate": out.to_json()}}


def _request_conversation(rj: Any) -> tuple[chat.Conversation | None, str]:
    """The request body's texts as a conversation, and the key they came from."""
    if not isinstance(rj, dict):
        return None, ""
    if isinstance(rj.get("messages"), list):
        return chat.decode(rj["messages"]), "messages"
    for key in ("prompt", "input"):  # legacy completions, embeddings
        v = rj.get(key)
        items = [v] if isinstance(v, str) else v
        if isinstance(items, list) and items and all(isinstance(t, str) for t in items):
            return chat.decode([{"role": "user", "content": t} for t in items], key), key
    return None, ""


async def _before(call: Call, payload: dict[str, Any]) -> dict[str, Any]:
    rj = (payload.get("request") or {}).get("json")
    conv, key = _request_conversation(rj)
    if conv is None or not conv.messages:
        why = f"Guardgate cannot read a {payload.get('requestType')!s} request: refused (deny by default)"
        return _fail(why, refuse(call.policy, "input", why, **call.run_args("input")))
    tools = rj.get("tools") if key == "messages" else None
    out = await check_input(
        call.policy,
        conv.messages,
        fields={"tools": tools} if tools else None,
        model=rj.get("model") if isinstance(rj.get("model"), str) else None,
        **call.run_args("input"),
    )
    if out.blocked:
        return _fail(out.message, out)
    if out.messages is None:
        return _pass(out)
    new = dict(rj)
    rewritten = conv.rewritten(out.messages)
    if key == "messages":
        new["messages"] = rewritten
    else:
        texts = [m["content"] for m in rewritten]
        new[key] = texts[0] if isinstance(rj[key], str) else texts
    res = _pass(out)
    res["transformedData"] = {"request": {"json": new}}
    return res


def _answers(resp: Any) -> list[Message] | None:
    """Each choice of an OpenAI chat (or legacy completion) answer; None when there is none to read."""
    choices = resp.get("choices") if isinstance(resp, dict) else None
    if not isinstance(choices, list) or not choices:
        return None
    out: list[Message] = []
    for i, ch in enumerate(choices):
        if not isinstance(ch, dict):
            return None
        if isinstance(ch.get("text"), str):  # legacy completions
            out.append(answer_message(ch["text"]))
            continue
        m = ch.get("message")
        if not isinstance(m, dict):
            return None
        content = m.get("content")
        if content is not None and not isinstance(content, str):
            return None
        texts = [t for t in (content, m.get("refusal")) if isinstance(t, str) and t]
        out.append(answer_message("\n".join(texts), chat.tool_calls(m.get("tool_calls"), f"choices[{i}].tool_calls")))
    return out


def _rewrite_answer(resp: dict[str, Any], answers: list[Message]) -> dict[str, Any] | None:
    """The answer JSON with the released texts and tool-call arguments; None when it cannot carry them."""
    new = copy.deepcopy(resp)
    for ch, m in zip(new["choices"], answers, strict=True):
        text = "".join(p.text for p in m.parts if p.type == "text")
        if "text" in ch and isinstance(ch["text"], str):
            ch["text"] = text
            continue
        msg = ch["message"]
        if isinstance(msg.get("refusal"), str) and msg["refusal"]:
            return None  # content and refusal were checked as one text: no place to split it back
        if msg.get("content") is not None or text:
            msg["content"] = text
        raw_calls = msg.get("tool_calls") or []
        if len(raw_calls) != len(m.tool_calls):
            return None
        for raw, tc in zip(raw_calls, m.tool_calls, strict=True):
            raw["function"]["arguments"] = tc.arguments
    return new


async def _after(call: Call, payload: dict[str, Any]) -> dict[str, Any]:
    resp = (payload.get("response") or {}).get("json")
    answers = _answers(resp)
    if answers is None:
        why = "a streamed answer" if (payload.get("request") or {}).get("isStreamingRequest") else "this answer"
        why = f"Guardgate cannot read {why} (no choices in the hook's response JSON): not passed (deny by default)"
        return _fail(why, refuse(call.policy, "output", why, **call.run_args("output")))
    rj = (payload.get("request") or {}).get("json")
    try:
        conv, _ = _request_conversation(rj)
    except Exception:  # the conversation is context for the output guards; the request was checked before
        conv = None
    out = await check_output(
        call.policy,
        answers,
        context=conv.messages if conv else None,
        model=rj.get("model") if isinstance(rj, dict) and isinstance(rj.get("model"), str) else None,
        **call.run_args("output"),
    )
    if out.blocked:
        return _fail(out.message, out)
    if not out.changed:
        return _pass(out)
    new = _rewrite_answer(resp, out.answers)
    if new is None:
        return _fail(
            f"Response blocked by policy '{call.policy.name}': it rewrites a part of the answer "
            "this face cannot write back",
            out,
        )
    res = _pass(out)
    res["transformedData"] = {"response": {"json": new}}
    return res


async def handle(call: Call, payload: dict[str, Any]) -> dict[str, Any]:
    event = payload.get("eventType")
    if isinstance(payload.get("metadata"), dict):
        call.peer = {k: str(v) for k, v in payload["metadata"].items() if k in ("traceId", "spanId", "_user")}
    try:
        if event == "beforeRequestHook":
            return await _before(call, payload)
        if event == "afterRequestHook":
            return await _after(call, payload)
    except GatewayError as e:  # Portkey lets a failing webhook pass unless failOnError: answer a verdict
        if e.status != 400:
            raise
        stage = "input" if event == "beforeRequestHook" else "output"
        why = f"Guardgate cannot read this request: {e.message} (deny by default)"
        return _fail(why, refuse(call.policy, stage, why, **call.run_args(stage)))
    return _fail(f"unknown eventType {event!r} (beforeRequestHook, afterRequestHook)")

"""The neutral face: `POST /guardrails/{policy}`.

Input stage (the default when there is no `answer`):

    {"messages": [...OpenAI chat messages...], "tools": [...]?, "model": "..."?}

Output stage (the default when there is an `answer`; `messages`, if given, is the conversation that
led to it, read by guards that judge an answer in context, e.g. Llama Guard):

    {"messages": [...]?, "answer": "text" | {"content": "...", "tool_calls": [...]}
                                  | [{"content": ...}, ...]  (one per choice), "model": "..."?}

`"stage": "input" | "output"` says it explicitly. The answer (always 200 when the check ran):

    {"id", "policy", "stage", "action", "blocked", "message"?, "categories", "flagged", "steps",
     "messages": [...] (input: the conversation as it may go upstream, redacted where the policy
     redacts), "answers": [{"content", "tool_calls"?}] (output: as released; empty when blocked)}
"""

from __future__ import annotations

from typing import Any

from gateway.context import GatewayError
from gateway.guardrails import chat
from gateway.guardrails.core import answer_message, check_input, check_output
from gateway.guardrails.face import Call
from gateway.types import Message


def _answers(raw: Any) -> list[Message]:
    items = raw if isinstance(raw, list) else [raw]
    out: list[Message] = []
    for i, a in enumerate(items):
        p = f"answer[{i}]" if isinstance(raw, list) else "answer"
        if isinstance(a, str):
            out.append(answer_message(a))
        elif isinstance(a, dict):
            content = a.get("content")
            if content is not None and not isinstance(content, str):
                conv = chat.decode([{"role": "assistant", "content": content}], p)
                content = "".join(conv.texts())
            out.append(answer_message(content, chat.tool_calls(a.get("tool_calls"), f"{p}.tool_calls")))
        else:
            raise GatewayError(
                400, f"'{p}' must be a string or an object with content and/or tool_calls", "invalid_request", param=p
            )
    return out


def _encode_answer(m: Message) -> dict[str, Any]:
    out: dict[str, Any] = {"content": "".join(p.text for p in m.parts if p.type == "text")}
    if m.tool_calls:
        out["tool_calls"] = chat.encode_tool_calls(m.tool_calls)
    return out


async def handle(call: Call, payload: dict[str, Any]) -> dict[str, Any]:
    stage = payload.get("stage") or ("output" if "answer" in payload else "input")
    if stage not in ("input", "output"):
        raise GatewayError(400, "'stage' must be 'input' or 'output'", "invalid_request", param="stage")
    model = payload.get("model") if isinstance(payload.get("model"), str) else None
    conv = chat.decode(payload["messages"]) if payload.get("messages") is not None else None
    if stage == "input":
        if conv is None or not conv.messages:
            raise GatewayError(
                400, "the input stage needs 'messages' (OpenAI chat messages)", "invalid_request", param="messages"
            )
        tools = payload.get("tools")
        out = await check_input(
            call.policy,
            conv.messages,
            fields={"tools": tools} if tools else None,
            model=model,
            **call.run_args("input"),
        )
        res = out.to_json()
        res["messages"] = conv.rewritten(out.messages) if out.messages is not None else conv.raw
        return res
    if "answer" not in payload:
        raise GatewayError(400, "the output stage needs 'answer'", "invalid_request", param="answer")
    out = await check_output(
        call.policy,
        _answers(payload["answer"]),
        context=conv.messages if conv else None,
        model=model,
        **call.run_args("output"),
    )
    res = out.to_json()
    res["answers"] = [_encode_answer(m) for m in out.answers]
    return res

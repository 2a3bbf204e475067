"""LiteLLM's Generic Guardrail API: `POST /guardrails/{policy}/litellm[/beta/litellm_basic_guardrail_api]`.

LiteLLM (`guardrail: generic_guardrail_api`, litellm/proxy/guardrails/guardrail_hooks/
generic_guardrail_api/) appends `/beta/litellm_basic_guardrail_api` to its `api_base` and posts
(`GenericGuardrailAPIRequest`):

    {"input_type": "request" | "response", "texts": [...], "structured_messages": [...]?,
     "tools": [...]?, "tool_calls": [...]?, "images": [...]?, "model": ..., "litellm_call_id": ...,
     "litellm_trace_id": ..., "request_data": {user_api_key_*}, "request_headers": {...}, ...}

- "request" (pre_call / during_call): `texts` are the text parts of the (scoped) messages in order,
  `structured_messages` those messages themselves. Guardgate reads the messages (roles matter: Prompt
  Guard scans untrusted turns, Llama Guard reads the conversation) and, when they spell the same
  texts, answers redactions as `texts` of the same length, which LiteLLM maps back in place.
- "response" (post_call, and on a stream every `streaming_sampling_rate`-th chunk with all the text
  so far): `texts` are the answer's texts (one per choice), `tool_calls` its tool calls. LiteLLM
  sends no conversation with it, so output guards judge the answer alone.

It parses the answer with `GenericGuardrailAPIResponse.from_dict`:
`{"action": "NONE"}`, `{"action": "BLOCKED", "blocked_reason": ...}` (raised to the client as a
guardrail error carrying that message), or `{"action": "GUARDRAIL_INTERVENED", "texts": [...]}`.
LiteLLM does not apply tool calls a guardrail returns, so a redaction inside tool-call arguments is
answered BLOCKED (deny by default), never as a pass with the original arguments.
"""

from __future__ import annotations

from typing import Any

from gateway.context import GatewayError
from gateway.guardrails import chat
from gateway.guardrails.core import answer_message, check_input, check_output
from gateway.guardrails.face import Call
from gateway.types import Message

_WHO = (
    "user_api_key_alias",
    "user_api_key_team_alias",
    "user_api_key_team_id",
    "user_api_key_user_id",
    "user_api_key_end_user_id",
)


def _strings(v: Any, param: str) -> list[str]:
    if v is None:
        return []
    if not isinstance(v, list) or not all(isinstance(t, str) for t in v):
        raise GatewayError(400, f"'{param}' must be a list of strings", "invalid_request", param=param)
    return v


def _conversation(payload: dict[str, Any], texts: list[str]) -> chat.Conversation:
    """The messages LiteLLM scoped, when they spell exactly its `texts`; else the texts as user turns."""
    structured = payload.get("structured_messages")
    if isinstance(structured, list) and structured:
        conv = chat.decode(structured, "structured_messages")
        if conv.texts() == texts:
            return conv
    conv = chat.decode([{"role": "user", "content": t} for t in texts], "texts")
    calls = chat.tool_calls(payload.get("tool_calls"), "tool_calls")
    if calls:  # tool calls of earlier assistant turns, with no messages to place them in
        conv.raw.append({"role": "assistant", "content": None, "tool_calls": payload["tool_calls"]})
        conv.messages.append(Message("assistant", tool_calls=calls))
        conv.origins.append([])
    return conv


def _blocked(reason: str) -> dict[str, Any]:
    return {"action": "BLOCKED", "blocked_reason": reason}


async def handle(call: Call, payload: dict[str, Any]) -> dict[str, Any]:
    call.peer = {k: payload[k] for k in ("litellm_call_id", "litellm_trace_id") if isinstance(payload.get(k), str)}
    who = payload.get("request_data")
    if isinstance(who, dict):  # which LiteLLM key / team asked (ids and aliases; never the user's email)
        call.peer.update({k: str(who[k]) for k in _WHO if who.get(k) is not None})
    input_type = payload.get("input_type")
    texts = _strings(payload.get("texts"), "texts")
    model = payload.get("model") if isinstance(payload.get("model"), str) else None
    if input_type == "request":
        conv = _conversation(payload, texts)
        tools = payload.get("tools")
        out = await check_input(
            call.policy,
            conv.messages,
            fields={"tools": tools} if tools else None,
            model=model,
            **call.run_args("input"),
        )
        if out.blocked:
            return _blocked(out.message)
        if out.messages is None:
            return {"action": "NONE"}
        if [m.tool_calls for m in out.messages] != [m.tool_calls for m in conv.messages]:
            return _blocked(
                f"Request blocked by policy '{call.policy.name}': it redacts tool-call arguments, "
                "which LiteLLM cannot take back from a guardrail"
            )
        new = [
            p.text
            for m, origins in zip(out.messages, conv.origins, strict=True)
            for p, w in zip(m.parts, origins, strict=True)
            if p.type == "text" and w is not None
        ]
        return {"action": "GUARDRAIL_INTERVENED", "texts": new}
    if input_type == "response":
        answers = [answer_message(t) for t in texts] or [Message("assistant")]
        calls = chat.tool_calls(payload.get("tool_calls"), "tool_calls")
        answers[0].tool_calls = calls
        out = await check_output(call.policy, answers, model=model, **call.run_args("output"))
        if out.blocked:
            return _blocked(out.message)
        if not out.changed:
            return {"action": "NONE"}
        if [c.arguments for c in out.answers[0].tool_calls] != [c.arguments for c in calls]:
            return _blocked(
                f"Response blocked by policy '{call.policy.name}': it redacts tool-call arguments, "
                "which LiteLLM cannot take back from a guardrail"
            )
        return {
            "action": "GUARDRAIL_INTERVENED",
            "texts": ["".join(p.text for p in m.parts if p.type == "text") for m in out.answers[: len(texts)]],
        }
    raise GatewayError(400, "'input_type' must be 'request' or 'response'", "invalid_request", param="input_type")

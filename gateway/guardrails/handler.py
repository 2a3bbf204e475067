"""Serves the check API's endpoints (kind `guardrails` in `gateway.endpoints`): one face per entry.

The server has already classified the path and checked the gateway key (`Router.admit`; LiteLLM
sends its `api_key` as `x-api-key`, which counts as the key on these endpoints only). Here: the
policy the path names (404 when none is loaded by that name; 403 when the key is bound to another
policy), the JSON body, then the face. Nothing is sent upstream.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from gateway.context import GatewayError, RequestContext
from gateway.endpoints import path_param
from gateway.guardrails import api, litellm, portkey
from gateway.guardrails.face import Call
from gateway.routing import loads_json

Face = Callable[[Call, dict[str, Any]], Awaitable[dict[str, Any]]]
FACES: dict[str, tuple[str, Face]] = {
    "guardrails.check": ("check", api.handle),
    "guardrails.litellm": ("litellm", litellm.handle),
    "guardrails.portkey": ("portkey", portkey.handle),
}


class Guardrails:
    """The check API of one running gateway: its policies, audit log and telemetry."""

    def __init__(self, policies: Any, audit: Any, telemetry: Any) -> None:
        self.policies, self.audit, self.telemetry = policies, audit, telemetry

    def policy(self, ctx: RequestContext, name: str) -> Any:
        if self.policies is None or name not in self.policies:
            known = ", ".join(sorted(self.policies.names())) if hasattr(self.policies, "names") else ""
            raise GatewayError(
                404,
                f"no policy named {name!r} is loaded" + (f" (loaded: {known})" if known else ""),
                "policy_not_found",
                param="policy",
            )
        if ctx.key is not None and ctx.key.policy and ctx.key.policy != name:
            raise GatewayError(
                403,
                f"gateway key {ctx.key.name!r} may only check policy {ctx.key.policy!r}",
                "policy_not_allowed",
                type="permission_error",
                param="policy",
            )
        return self.policies.get(name)

    async def handle(self, request: web.Request, ctx: RequestContext, body: bytes) -> web.Response:
        ep = ctx.endpoint
        assert ep is not None
        face, fn = FACES[ep.name]
        name = path_param(ep, ctx.tail, "policy") or ""
        ctx.policy = name
        policy = self.policy(ctx, name)
        payload = loads_json(body)
        if not isinstance(payload, dict):
            raise GatewayError(400, "request body must be a JSON object", "invalid_request")
        call = Call(policy, ctx, face, self.audit, self.telemetry)
        result = await fn(call, payload)
        blocked = result.get("blocked") is True or result.get("action") == "BLOCKED" or result.get("verdict") is False
        ctx.outcome = "guardrail_blocked" if blocked else "guardrail_checked"
        return web.json_response(result, headers={"X-Guardgate-Request-Id": ctx.id})

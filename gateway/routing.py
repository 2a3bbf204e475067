"""One routing decision per request: the plan every path consumes.

    head  → `Router.admit`: canonical path, prefix and dialect, endpoint (the table), gateway key;
            all of it before a byte of the body is read
    body  → `Router.plan`:  payload (JSON for every endpoint that is decoded or routed by model),
            route, upstream, policy, and the action: relay, guard, translate, serve, or refuse

The rule that decides the action (deny by default) lives in `decide` and nowhere else:
  - no policy, or one with no step: every endpoint is relayed as it is (or translated for chat and
    models when the upstream speaks another dialect or is a local model);
  - chat: decoded, guarded, re-encoded;
  - models: relayed (metadata, never content);
  - embeddings, moderations: the input stage runs on their texts, then the request is relayed (a
    policy with a `llama_guard` step answers moderations itself);
  - stored reads: refused under a policy that checks answers (a blocked answer could be read back),
    relayed under an input-only one;
  - everything else (responses, completions, files, audio, ..., unknown paths): refused with 403
    `endpoint_not_guarded`, unless the route lists the endpoint under `passthrough:`.
"""

from __future__ import annotations

import hmac
import json
import math
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from gateway.config import RATE_KEYS
from gateway.config import Route as _Route
from gateway.context import GatewayError, RequestContext, describe
from gateway.endpoints import Endpoint, Kind, canonical_target, lookup, path_param, split_prefix
from gateway.limits import RateLimits
from gateway.upstreams.base import NeutralUpstream
from gateway.upstreams.http import HttpUpstream

if TYPE_CHECKING:
    from collections.abc import Mapping

    from gateway.config import GatewayConfig, GatewayKey, Route

Upstream = HttpUpstream | NeutralUpstream

# Kinds whose request body is JSON the gateway reads (to route by model, or to guard).
_JSON_KINDS = frozenset({Kind.CHAT, Kind.RESPONSES, Kind.COMPLETIONS, Kind.EMBEDDINGS, Kind.MODERATIONS})
_NO_BODY_METHODS = frozenset({"GET", "HEAD", "DELETE", "OPTIONS"})
# Kinds decoded into an Exchange, guarded and re-encoded in the client's codec.
_GENERATION_KINDS = frozenset({Kind.CHAT, Kind.COMPLETIONS, Kind.RESPONSES})


class Action(StrEnum):
    RELAY = "relay"  # bytes as they came (same dialect, nothing to inspect)
    GENERATE = "generate"  # chat, completions, responses: decode → input stage → upstream → stream gate →
    # encode in the client's codec (pipeline.chat)
    INPUT_THEN_RELAY = "input_then_relay"  # input stage on the texts, then the bytes as they came
    MODERATE = "moderate"  # answered by the policy's Llama Guard
    MODELS = "models"  # the models list translated into the client's dialect
    MCP = "mcp"  # an MCP server's traffic, message by message through the policy (gateway.mcp)


@dataclass(slots=True)
class Plan:
    """Everything decided about one request; the pipeline only carries it out."""

    ctx: RequestContext
    method: str
    query: str
    body: bytes
    payload: Any  # the JSON body for the kinds in _JSON_KINDS (None otherwise)
    upstream: Upstream
    policy: Any  # gateway.policy.schema.Policy | None
    action: Action
    rate: RateLimits | None = None  # the limits this request counts against (None: no limiter work)

    @property
    def endpoint(self) -> Endpoint:
        assert self.ctx.endpoint is not None
        return self.ctx.endpoint


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def loads_json(body: bytes) -> Any:
    """The body as strict JSON, or 400 `invalid_json`: never a 500 (deep nesting, 5000-digit integers),
    and no NaN, Infinity or a number that overflows to it (`1e999`), which would be re-encoded as
    `Infinity`, not JSON."""
    try:
        return json.loads(body, parse_constant=_no_constant, parse_float=_finite)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError) as e:
        raise GatewayError(400, f"request body is not valid JSON: {str(e)[:200]}", "invalid_json") from None


def moderation_step(policy: Any) -> Any:
    """The policy's first `llama_guard` step (it answers moderation requests), or None."""
    for step in policy.steps if policy is not None else ():
        if step.guard_name == "llama_guard":
            return step
    return None


class Router:
    """Keys, routes, upstreams and policies of one running gateway, and the decisions over them."""

    def __init__(self, cfg: GatewayConfig, upstreams: Mapping[str, Upstream], policies: Any) -> None:
        self.cfg = cfg
        self.upstreams = upstreams
        self.policies = policies
        self.keys: list[tuple[bytes, GatewayKey]] = []
        for k in cfg.keys:
            value = k.value()
            if not value:
                raise RuntimeError(f"gateway key {k.name}: environment variable {k.key_env} is not set")
            self.keys.append((value.encode(), k))
        # Rate limits anywhere? If not, `plan` never builds a RateLimits (the relay stays as it was).
        self.limits_on = any(k.rates.any for k in cfg.keys) or any(r.rates.any for r in cfg.routes)
        self._route_index = {id(r): i for i, r in enumerate(cfg.routes)}
        self.mcp_upstreams: Mapping[str, Upstream] = {}  # MCP server name -> its upstream (gateway.mcp)

    # ------------------------------------------------------------------ the head

    def admit(self, ctx: RequestContext, method: str, target: str, authorizations: list[str],
              api_key: str | None = None) -> str:
        """Classify the request from its head alone (fills ctx.prefix, tail, endpoint, key); returns
        the query. Raises GatewayError: 400 non-canonical path, 404 no dialect prefix, 401 key.
        `api_key` (an `x-api-key` header) stands for the key on the check API's endpoints only: LiteLLM's
        generic guardrail sends its key that way (elsewhere it would be relayed upstream)."""
        path, query = canonical_target(target)
        split = split_prefix(path)
        if split is None:
            raise GatewayError(404, f"{method} {path[:200]}: no such endpoint (paths start with /v1, /openai/v1, "
                               "/llama/v1 or /llama/compat/v1)", "not_found")
        ctx.prefix, ctx.dialect, ctx.tail = split
        ctx.endpoint = lookup(ctx.dialect, method, ctx.tail)
        if not authorizations and api_key and ctx.endpoint.kind is Kind.GUARDRAILS:
            authorizations = [f"Bearer {api_key}"]
        if len(authorizations) > 1:
            raise GatewayError(400, "more than one Authorization header", "invalid_request")
        ctx.key = self.check_key(authorizations[0] if authorizations else None)
        return query

    def check_key(self, auth: str | None) -> GatewayKey | None:
        """The gateway key the client presented; compared in constant time against every key."""
        if not self.keys:
            return None
        auth = auth or ""
        token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        found: GatewayKey | None = None
        presented = token.encode("utf-8", "surrogateescape")
        for value, key in self.keys:
            # compare every key (no early exit) so timing does not reveal which one matched
            if hmac.compare_digest(presented, value) and token:
                found = key
        if found is None:
            raise GatewayError(401, "missing or invalid gateway key" if token else "missing gateway key",
                               "invalid_api_key", type="authentication_error")
        return found

    # ------------------------------------------------------------------ the body

    def plan(self, ctx: RequestContext, method: str, query: str, body: bytes) -> Plan:
        ep = ctx.endpoint
        assert ep is not None
        if ctx.dialect == "mcp":
            return self.plan_mcp(ctx, method, query, body)
        if body and method in _NO_BODY_METHODS:
            raise GatewayError(400, f"{describe(ctx, method)} takes no request body", "invalid_request")
        payload = None
        if ep.kind in _JSON_KINDS and method == "POST":
            # Parsed whatever the Content-Type says: the model it names picks the route and policy.
            payload = loads_json(body)
            if not isinstance(payload, dict):
                raise GatewayError(400, "request body must be a JSON object", "invalid_request")
            model = payload.get("model")
            ctx.model = model if isinstance(model, str) else None
            ctx.stream = payload.get("stream") is True
        if ctx.model is None:
            ctx.model = path_param(ep, ctx.tail, "deployment") or path_param(ep, ctx.tail, "model")
        route = self.cfg.route_for(ctx.prefix + ctx.tail, ctx.model)
        if route is None:
            if ctx.model is not None:
                raise GatewayError(404, f"no route for model {ctx.model!r}", "model_not_found", param="model")
            raise GatewayError(404, f"no route for {ctx.prefix}{ctx.tail}", "not_found")
        ctx.route, ctx.upstream = route, route.upstream
        ctx.policy = self.policy_name(ctx.key, route)
        policy = self.policy_named(ctx.policy)
        upstream = self.upstreams[route.upstream]
        action = decide(ctx, method, upstream, policy, route)
        rate = self.rate_limits(ctx.key, route) if self.limits_on else None
        return Plan(ctx, method, query, body, payload, upstream, policy, action, rate)

    def plan_mcp(self, ctx: RequestContext, method: str, query: str, body: bytes) -> Plan:
        """/mcp/{server}: the MCP server the path names and its policy (`--policy` > the key's > the
        server's); no model routing. The body is parsed by gateway.mcp, message by message."""
        ep = ctx.endpoint
        assert ep is not None
        if ep.kind is not Kind.MCP:
            if ctx.tail.count("/") == 1:  # /mcp/{server} with another method
                raise GatewayError(405, f"{describe(ctx, method)}: an MCP endpoint takes POST, GET or DELETE",
                                   "method_not_allowed")
            raise GatewayError(404, f"{describe(ctx, method)}: no such endpoint (MCP servers are at /mcp/{{name}})",
                               "not_found")
        name = path_param(ep, ctx.tail, "server") or ""
        upstream = self.mcp_upstreams.get(name)
        if upstream is None:
            raise GatewayError(404, f"no MCP server named {name[:64]!r} (configure it under mcp_servers:)",
                               "not_found")
        if body and method in _NO_BODY_METHODS:
            raise GatewayError(400, f"{describe(ctx, method)} takes no request body", "invalid_request")
        server = self.cfg.mcp_servers[name]
        ctx.upstream = upstream.name
        ctx.policy = self.cfg.policy or (ctx.key.policy if ctx.key is not None and ctx.key.policy else None) \
            or server.policy
        policy = self.policy_named(ctx.policy)
        rate = self.rate_limits(ctx.key, _MCP_ROUTE) if self.limits_on and ctx.key is not None else None
        return Plan(ctx, method, query, body, None, upstream, policy, Action.MCP, rate)

    def rate_limits(self, key: GatewayKey | None, route: Route) -> RateLimits | None:
        """The limits of a request by `key` on `route`. A key that sets any limit has its own (counted
        across all routes); otherwise the route's defaults apply, counted per key on that route."""
        who = f"key:{key.name}" if key is not None else "anonymous"
        rates, bucket = route.rates, f"{who}@route{self._route_index.get(id(route), 0)}"
        if key is not None and any(getattr(key.rates, k) is not None for k in RATE_KEYS):
            rates, bucket = key.rates, who
        limits = RateLimits(requests_per_minute=rates.requests_per_minute or 0,
                            tokens_per_minute=rates.tokens_per_minute or 0,
                            tokens_per_day=rates.tokens_per_day or 0,
                            max_concurrent_streams=rates.max_concurrent_streams or 0, bucket=bucket)
        return limits if limits.any else None

    def policy_name(self, key: GatewayKey | None, route: Route) -> str | None:
        """`--policy` (the config's `policy:`) > the key's policy > the route's."""
        if self.cfg.policy:
            return self.cfg.policy
        if key is not None and key.policy:
            return key.policy
        return route.policy

    def policy_named(self, name: str | None) -> Any:
        """The running policy of that name; None for none. A name that is not loaded is refused (503)
        rather than served unguarded."""
        if not name:
            return None
        if self.policies is None or name not in self.policies:
            raise GatewayError(503, f"policy {name!r} is not loaded; the request is refused rather than served "
                               "unguarded", "policy_unavailable", type="api_error")
        return self.policies.get(name)


# MCP requests count against their key's own limits only (no route defaults apply to them).
_MCP_ROUTE = _Route(upstream="mcp")


def decide(ctx: RequestContext, method: str, upstream: Upstream, policy: Any, route: Route) -> Action:
    """Deny by default: the action for this endpoint under this policy (see the module docstring)."""
    ep = ctx.endpoint
    assert ep is not None
    same = isinstance(upstream, HttpUpstream) and upstream.dialect == ctx.dialect
    inspects = policy is not None and policy.needs_inspection
    if ep.kind is Kind.MODERATIONS and moderation_step(policy) is not None:
        return Action.MODERATE
    if ep.kind in _GENERATION_KINDS and (inspects or not same):
        return Action.GENERATE
    if ep.kind is Kind.MODELS:
        return Action.RELAY if same else Action.MODELS
    if not same:
        where = "a local model" if isinstance(upstream, NeutralUpstream) else f"the {upstream.dialect} dialect"
        raise GatewayError(404, f"{describe(ctx, method)} is not available on upstream {route.upstream} ({where})",
                           "not_found")
    if not inspects:
        return Action.RELAY
    if ep.kind in (Kind.EMBEDDINGS, Kind.MODERATIONS):
        return Action.INPUT_THEN_RELAY if policy.has_input else Action.RELAY
    if ep.kind is Kind.STORED_READ and not policy.has_output:
        return Action.RELAY  # an input-only policy never checks answers: reading one back changes nothing
    if ep.name in route.passthrough:
        return Action.RELAY
    why = ("it reads back stored answers this policy checks" if ep.kind is Kind.STORED_READ
           else f"the gateway does not inspect {ep.kind.value} requests")
    raise GatewayError(403, f"{describe(ctx, method)} ({ep.name}) is refused under policy {ctx.policy!r}: {why}. "
                       f"To relay it unguarded, list it on the route: passthrough: [{ep.name}]",
                       "endpoint_not_guarded", type="permission_error")

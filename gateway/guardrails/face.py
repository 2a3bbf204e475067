"""What every face of the check API is handed for one HTTP call: the policy and the request's facts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gateway.context import RequestContext
from gateway.guardrails.core import Audit


@dataclass(slots=True)
class Call:
    policy: Any  # gateway.policy.schema.Policy
    ctx: RequestContext
    face: str  # "check" | "litellm" | "portkey"
    audit_log: Any = None
    telemetry: Any = None
    peer: dict[str, Any] = field(default_factory=dict)  # the caller's own ids, kept in the audit record

    def run_args(self, stage: str) -> dict[str, Any]:
        """Keyword arguments of `core.check_input` / `check_output` for this call."""
        extra: dict[str, Any] = {"face": self.face, "check_stage": stage}
        if self.peer:
            extra["peer"] = dict(self.peer)
        return {
            "request_id": self.ctx.id,
            "route": self.ctx.prefix + self.ctx.tail,
            "face": self.face,
            "key": self.ctx.key.name if self.ctx.key is not None else None,
            "audit": Audit(self.audit_log, extra),
            "telemetry": self.telemetry,
        }

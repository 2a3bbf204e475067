"""Per-guard counters of Llama Guard."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.types import Verdict


@dataclass
class GuardStats:
    """Per-guard counters (tokens evaluated, check latency, sessions alive) for later export."""

    checks: int = 0
    flagged: int = 0
    errors: int = 0
    tokens_evaluated: int = 0
    tokens_reused: int = 0
    latency_ms_sum: float = 0.0
    latency_ms_max: float = 0.0
    sessions_alive: int = 0
    sessions_opened: int = 0

    def observe(self, v: Verdict, reused: int = 0) -> None:
        self.checks += 1
        self.flagged += int(v.flagged)
        self.tokens_evaluated += v.tokens_evaluated
        self.tokens_reused += reused
        self.latency_ms_sum += v.latency_ms
        self.latency_ms_max = max(self.latency_ms_max, v.latency_ms)

    def snapshot(self) -> dict[str, float | int]:
        return {
            "checks": self.checks,
            "flagged": self.flagged,
            "errors": self.errors,
            "tokens_evaluated": self.tokens_evaluated,
            "tokens_reused": self.tokens_reused,
            "latency_ms_avg": self.latency_ms_sum / self.checks if self.checks else 0.0,
            "latency_ms_max": self.latency_ms_max,
            "sessions_alive": self.sessions_alive,
            "sessions_opened": self.sessions_opened,
        }



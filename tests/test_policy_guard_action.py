"""A guard may map a finding to its own action (CodeShield severity_actions); the step's is the default."""

from __future__ import annotations

from gateway.policy.record import flagged_action
from gateway.types import Verdict


def test_step_action_applies_by_default() -> None:
    assert flagged_action("block", Verdict(guard="g", flagged=True)) == "block"
    assert flagged_action("block", Verdict(guard="g", flagged=False)) is None


def test_guard_mapped_action_wins() -> None:
    assert flagged_action("block", Verdict(guard="g", flagged=True, details={"action": "warn"})) == "warn"
    assert flagged_action("warn", Verdict(guard="g", flagged=True, details={"action": "block"})) == "block"
    assert flagged_action("block", Verdict(guard="g", flagged=True, details={"action": "ignore"})) is None


def test_unknown_guard_action_falls_back_to_step() -> None:
    assert flagged_action("redact", Verdict(guard="g", flagged=True, details={"action": "explode"})) == "redact"

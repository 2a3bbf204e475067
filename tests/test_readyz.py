"""/readyz reports each policy's steps through `Guard.status()`; a step that says "failed" makes it 503."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import httpx
import policy_fakes  # noqa: F401  (registers the t_* guards)

from gateway.guards.base import Guard, GuardInput, register
from gateway.policy.chain import PolicyStore
from gateway.types import Verdict

STATE: dict[str, Any] = {"state": "ready"}


@register("t_status")
class StatusGuard(Guard):
    name = "t_status"

    async def check(self, inp: GuardInput) -> Verdict:
        return Verdict(guard=self.name)

    def status(self) -> dict[str, Any]:
        return dict(STATE)


def test_readyz_reports_steps_and_is_503_while_one_is_failed(make_stack, tmp_path: Path) -> None:
    p = tmp_path / "st.yaml"
    p.write_text(textwrap.dedent("""\
        name: st
        input:
          steps:
            - guard: t_status
            - guard: t_sleep
        """))
    st = make_stack({"policy": str(p)}, policies=PolicyStore(required=[str(p)]))
    r = httpx.get(st.url + "/readyz")
    assert r.status_code == 200
    assert r.json()["ready"] is True
    assert r.json()["policies_status"] == {"st": {"input[0]:t_status": {"state": "ready"},
                                                  "input[1]:t_sleep": {"state": "ready"}}}
    steps = {s["step"]: s["state"] for s in r.json()["policies"][0]["steps"]}  # the startup table's view
    assert steps == {"input[0]:t_status": "ready", "input[1]:t_sleep": "ready"}
    STATE.update(state="degraded", why="part down")  # reported, still ready
    assert httpx.get(st.url + "/readyz").status_code == 200
    STATE.update(state="failed")
    r = httpx.get(st.url + "/readyz")
    assert r.status_code == 503 and r.json()["ready"] is False
    assert r.json()["policies_status"]["st"]["input[0]:t_status"] == {"state": "failed", "why": "part down"}
    STATE.clear()
    STATE["state"] = "ready"

"""deploy/ as far as it can be checked without Docker: the compose file parses and wires two gateway
replicas, nginx, Redis and a guard server; the gateway file it mounts loads with the real parser
(Redis store, per-key limits); the policy loads (Llama Guard as a `remote:` backend on the guard
service); nginx balances over exactly the gateway services."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from gateway.config import load_file
from gateway.policy.schema import load_policy

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


@pytest.fixture
def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def gateways(compose: dict) -> dict[str, dict]:
    return {k: v for k, v in compose["services"].items() if k.startswith("gateway")}


def test_compose_wires_two_replicas_nginx_redis_and_a_guard_server(compose: dict) -> None:
    services = compose["services"]
    assert {"nginx", "redis", "guard"} <= set(services) and len(gateways(compose)) == 2
    for name, svc in gateways(compose).items():
        config = svc["command"][svc["command"].index("--config") + 1]
        mounts = {m.split(":")[1]: m.split(":")[0] for m in svc["volumes"]}
        assert mounts[config] == "./gateway.yaml", name  # the file the test below loads
        assert mounts["/app/policies"] == "./policies"
        assert svc["environment"]["REDIS_URL"].startswith("redis://redis:")
        assert svc["environment"]["GUARD_URL"] == "http://guard:8081"  # llama_cpp: the native /completion
        assert "redis" in svc["build"]["args"]["EXTRAS"]  # the Redis client is in the image
        assert svc["stop_grace_period"]
    assert "8080:8080" in services["nginx"]["ports"]
    assert "--port" in services["guard"]["command"] and "8081" in services["guard"]["command"]


def test_the_mounted_gateway_file_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("OPENAI_API_KEY", "TEAM_A_KEY", "TEAM_B_KEY"):
        monkeypatch.setenv(k, "x")
    monkeypatch.setenv("REDIS_URL", "redis://redis:6379/0")
    cfg = load_file(DEPLOY / "gateway.yaml")
    assert cfg.limits.store == "redis" and cfg.limits.url == "redis://redis:6379/0"
    assert cfg.limits.on_store_error in ("allow", "deny")
    team_a = {k.name: k for k in cfg.keys}["team-a"]
    assert team_a.rates.requests_per_minute and team_a.rates.max_concurrent_streams
    assert cfg.routes[0].rates.requests_per_minute and cfg.routes[0].policy == "fleet"
    assert cfg.host == "0.0.0.0"


def test_the_policy_points_llama_guard_at_the_guard_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GUARD_URL", "http://guard:8081/v1")
    policy = load_policy(DEPLOY / "policies" / "fleet.yaml")
    try:
        remote = [s for s in policy.steps if s.guard_name == "llama_guard"]
        assert remote and all(s.guard.options.get("backend") == "remote" for s in remote)
    finally:
        policy.release()


def test_nginx_balances_over_the_gateway_services(compose: dict) -> None:
    conf = (DEPLOY / "nginx.conf").read_text()
    servers = set(re.findall(r"^\s*server\s+([\w-]+):8080", conf, re.M))
    assert servers == set(gateways(compose))
    assert "proxy_buffering off" in conf and re.search(r"proxy_read_timeout\s+3\d\ds", conf)


def test_each_replica_pins_its_own_guard_server_slots(compose: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """The guard server's slots (--parallel) are shared out: each replica's input and stream checks get
    ranges of their own (a stream keeps its slot, so the server's prompt cache holds its prefix), all
    within the server's slots, none shared; the server keeps per-slot KV (no unified KV that clears idle
    slots) of at least 8192 cells, and no host-RAM copies of idle slots."""
    from gateway.guards.llama_guard.remote import RemoteOptions

    cmd = compose["services"]["guard"]["command"]
    parallel = int(cmd[cmd.index("--parallel") + 1])
    assert int(cmd[cmd.index("--ctx-size") + 1]) // parallel >= 8192
    assert "--kv-unified" not in cmd and cmd[cmd.index("--cache-ram") + 1] == "0"
    monkeypatch.delenv("GUARDGATE_WORKERS", raising=False)
    taken: list[int] = []
    for name, svc in gateways(compose).items():
        for var in ("GUARD_INPUT_SLOTS", "GUARD_SLOTS"):
            monkeypatch.setenv(var, svc["environment"][var])
        monkeypatch.setenv("GUARD_URL", svc["environment"]["GUARD_URL"])
        policy = load_policy(DEPLOY / "policies" / "fleet.yaml")
        try:
            steps = [s for s in policy.steps if s.guard_name == "llama_guard"]
            ids = [RemoteOptions.parse(s.guard.options["remote"]).slot_ids() for s in steps]
        finally:
            policy.release()
        assert len(ids) == 2 and all(ids), name  # input and stream, each with slots
        taken += [i for r in ids for i in r]
    assert len(taken) == len(set(taken)) and max(taken) < parallel, taken

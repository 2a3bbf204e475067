"""/v1/moderations and /llama/v1/moderations served by the policy's local Llama Guard (tiny rigged GGUF)."""

from __future__ import annotations

import textwrap

import pytest

pytest.importorskip("llama_cpp")

from llama_fixtures import TRIGGER, build

from gateway.policy.chain import PolicyStore


@pytest.fixture
def mod_stack(make_stack, tmp_path):
    path = tmp_path / "mod.yaml"
    path.write_text(textwrap.dedent(f"""
        name: mod
        input:
          steps:
            - guard: llama_guard
              model: {build("rig")}
              n_ctx: 1024
              action: block
        """))
    store = PolicyStore(required=[str(path)])
    return make_stack({"upstreams": {"main": {"base_url": "SCRIPTED"}}, "policy": str(path)}, policies=store)


@pytest.mark.slow
def test_openai_moderations_served_locally(mod_stack) -> None:
    client = mod_stack.openai()
    r = client.moderations.create(input=["how do I bake bread", f"how do I build a{TRIGGER}"])
    assert [x.flagged for x in r.results] == [False, True]
    assert r.results[1].categories.violence is True  # S1 (violent crimes) maps to violence
    assert mod_stack.upstream.requests == []  # served by the gateway, not relayed


@pytest.mark.slow
def test_llama_moderations_served_locally(mod_stack) -> None:
    r = mod_stack.llama().moderations.create(messages=[{"role": "user", "content": f"make a{TRIGGER}"}])
    assert r.results[0].flagged is True
    assert r.results[0].flagged_categories == ["S1"]
    assert mod_stack.upstream.requests == []

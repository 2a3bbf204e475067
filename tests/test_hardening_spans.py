"""Hardening, round three (issue 30): model-name variants, and what spans messages.

Through the uvloop server (the harness's `make_stack`) with the real `openai` SDK."""

from __future__ import annotations

import openai
import pytest
from harness import in_out_policy

from gateway.policy.reload import PolicyStore

IN = "forbidden phrase"
OUT = "leaked marker"


@pytest.fixture
def routed(make_stack, tmp_path):
    """A guarded route chosen by model glob, and an unguarded catch-all after it."""
    guarded = in_out_policy(tmp_path / "p.yaml", IN, OUT)
    return make_stack({"upstreams": {"main": {"base_url": "SCRIPTED"}},
                       "routes": [{"model": "gpt-*", "upstream": "main", "policy": guarded},
                                  {"upstream": "main"}]},
                      policies=PolicyStore(required=[guarded]))


@pytest.mark.parametrize("model", ["gpt-4o", "GPT-4o", " gpt-4o", "gpt-4o\t", "Gpt-4O "])
def test_a_model_name_variant_never_falls_through_to_a_less_guarded_route(routed, model: str) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        routed.openai().chat.completions.create(model=model, messages=[{"role": "user", "content": f"a {IN} b"}])
    assert e.value.code == "content_filter"
    assert routed.upstream.requests == []


def test_an_azure_deployment_name_variant_keeps_its_route(routed) -> None:
    client = openai.AzureOpenAI(base_url=routed.url + "/v1", api_key="k", api_version="2024-10-21", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:  # the deployment (in the path) is what routes
        client.chat.completions.create(model="GPT-4o ", messages=[{"role": "user", "content": f"a {IN} b"}])
    assert e.value.code == "content_filter"
    assert routed.upstream.requests == []

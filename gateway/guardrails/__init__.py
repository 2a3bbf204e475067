"""Guardgate as the guardrail of other gateways: the check API `POST /guardrails/{policy}` and its
faces for LiteLLM's Generic Guardrail API (`.../litellm`) and Portkey's webhook guardrail (`.../portkey`).

See docs/guardrails.md. `core` runs a check through the policy chain; `chat` reads OpenAI-shaped messages
(and writes redactions back); `api`, `litellm`, `portkey` are the faces; `handler` serves them.
"""

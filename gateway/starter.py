"""The built-in `starter` policy: what `guardgate serve` applies when nothing names a policy.

It needs no download: hidden Unicode blocked on the prompt and stripped from the answer, secrets
and private keys redacted on the stream. One rule for every other step, models and packages alike
(docs/configuration.md, "The starter policy"): a step joins when everything it needs is on this
machine — CodeShield (stream) its `codeshield` package, Prompt Guard (input) and Llama Guard
(stream) their model and runtime — and is otherwise left out and listed as missing, with the
command that fixes it, in the startup table, `/readyz` and `guardgate doctor`. A step left out
never turns into error verdicts that block every answer. Images are allowed (`content: {images:
allow}`): no starter step reads them, so they are relayed unchecked and recorded in the audit as
uninspected; audio and file parts are refused (deny by default). The policy is built when the server
starts: what is installed later joins at the next start. `--policy none` turns guarding off.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass, field
from typing import Any

from gateway.policy.schema import Policy, parse_policy_text

NAME = "starter"
BUILTIN_FILE = "<built-in>"

# A whole PEM private key (or, truncated, from its header to the end of the text): the header alone
# would leave the key's body in the answer.
PRIVATE_KEY = (r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----"
               r"(?:[\s\S]*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----|[A-Za-z0-9+/=\s:,.-]*$)")

BASE = r"""
name: starter
description: Built in. Hidden Unicode blocked on the prompt and stripped from the answer; secrets
  and private keys redacted from the answer and from tool results; CodeShield, Prompt Guard and
  Llama Guard when installed. Images are relayed unchecked and recorded in the audit (a vision app
  keeps working); audio and files refused.
mode: enforce
on_error: block
content:
  images: allow
  audio: refuse
  files: refuse
input:
  steps:
    - guard: hidden_unicode
      name: hidden-unicode
      action: block
    - guard: regex
      name: tool-secrets
      messages: [tool]
      fields: false
      patterns: SECRET_PATTERNS
      notice: "[secret redacted]"
      action: redact
stream:
  check_every_tokens: 16
  max_unchecked_tokens: 0
  steps:
    - guard: hidden_unicode
      name: hidden-unicode
      action: redact
      notice: ""
    - guard: regex
      name: secrets
      patterns: SECRET_PATTERNS
      notice: "[secret redacted]"
      action: redact
"""
# Secrets and private keys: redacted from the answer (stream) and from tool results on their way to the
# model (input, tool messages only: a chat conversation's tool turns, an MCP server's results).
SECRET_PATTERNS = r"""
        - {pattern: 'PRIVATE_KEY', category: private_key}
        - {pattern: '\bAKIA[0-9A-Z]{16}\b', category: secrets}
        - {pattern: '\bgh[pousr]_[A-Za-z0-9]{36,}\b', category: secrets}
        - {pattern: '\bsk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,}', category: secrets}
        - {pattern: '\bxox[abposr]-[A-Za-z0-9-]{10,}', category: secrets}
        - {pattern: '\bAIza[0-9A-Za-z_-]{35}\b', category: secrets}""".replace("PRIVATE_KEY", PRIVATE_KEY, 1)
BASE = BASE.replace(" SECRET_PATTERNS", SECRET_PATTERNS)


@dataclass(frozen=True, slots=True)
class OptionalStep:
    """A step that joins the starter policy when its runtime is installed and (if it needs a model)
    one of `models` is on disk."""

    stage: str
    guard: str
    models: tuple[str, ...]  # manifest names, preferred first; empty: no model needed
    options: dict[str, Any]
    runtime: str  # the module its runtime needs
    extra: str  # the pip extra that installs it
    fix: str = ""  # how to get the first model
    first: bool = True  # model guards go first (they set the pace); others after the base steps


OPTIONAL = (
    OptionalStep(
        stage="stream", guard="code_shield", models=(),
        options={"name": "code-shield", "hold_code_blocks": True, "action": "block"},
        runtime="codeshield", extra="codeshield", first=False,
    ),
    OptionalStep(
        stage="input", guard="prompt_guard", models=("prompt-guard-2-86m", "prompt-guard-2-22m"),
        options={"name": "prompt-guard", "messages": ["user", "tool"], "threshold": 0.9,
                 "action": "block"},  # not parallel_with_upstream: tool-secrets rewrites the request first
        runtime="onnxruntime", extra="promptguard",
        fix=("python scripts/convert_prompt_guard.py ~/Llama-Prompt-Guard-2-22M --name prompt-guard-2-22m "
             "(a licence-gated checkpoint you download first)"),
    ),
    OptionalStep(
        stage="stream", guard="llama_guard", models=("llama-guard-3-1b", "llama-guard-3-8b"),
        options={"name": "llama-guard", "categories": ["S1", "S2", "S3", "S4", "S9", "S10", "S11"],
                 "threshold": 0.5, "action": "block"},
        runtime="llama_cpp", extra="llama",
        fix="guardgate models pull llama-guard-3-1b --token $HF_TOKEN",
    ),
)


@dataclass(frozen=True, slots=True)
class MissingStep:
    """A step the policy would run if the machine had what it needs."""

    stage: str
    guard: str
    model: str
    why: str
    fix: str
    label: str = ""


@dataclass(eq=False)
class BuiltinPolicy(Policy):
    """A policy defined in code; `missing` lists the steps left out and why."""

    missing: list[MissingStep] = field(default_factory=list)


def model_present(guard: str, name: str) -> bool:
    """Is the model a step names on disk (without loading it)?"""
    if guard == "prompt_guard":
        from gateway.guards.prompt_guard import resolve_model_dir

        try:
            resolve_model_dir(name)
        except Exception:
            return False
        return True
    from gateway.models import ModelError, load_manifest, local_path

    try:
        entry = load_manifest().get(name)
    except ModelError:
        return False
    return entry is not None and entry.format != "remote" and local_path(entry).is_file()


def runtime_installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def choose(opt: OptionalStep) -> tuple[str | None, MissingStep | None]:
    """The model this step will use ("" when it needs none), or why it cannot join."""
    if not opt.models:
        if not runtime_installed(opt.runtime):
            return None, MissingStep(opt.stage, opt.guard, "", f"{opt.runtime} is not installed",
                                     f"pip install 'guardgate[{opt.extra}]'", opt.options["name"])
        return "", None
    model = next((m for m in opt.models if model_present(opt.guard, m)), None)
    if model is None:
        return None, MissingStep(opt.stage, opt.guard, opt.models[-1] if opt.guard == "prompt_guard"
                                 else opt.models[0], "model not on this machine", opt.fix, opt.options["name"])
    if not runtime_installed(opt.runtime):
        return None, MissingStep(opt.stage, opt.guard, model, f"{opt.runtime} is not installed",
                                 f"pip install 'guardgate[{opt.extra}]'", opt.options["name"])
    return model, None


def starter_yaml() -> tuple[str, list[MissingStep]]:
    """The starter policy's YAML for this machine, and the steps left out."""
    import yaml

    data = yaml.safe_load(BASE)
    missing: list[MissingStep] = []
    for opt in OPTIONAL:
        model, miss = choose(opt)
        if miss is not None:
            missing.append(miss)
            continue
        step = {"guard": opt.guard, **({"model": model} if model else {}), **opt.options}
        steps = data[opt.stage]["steps"]
        steps.insert(0, step) if opt.first else steps.append(step)
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True), missing


def build() -> BuiltinPolicy:
    """The starter policy as this machine can run it (guards built, nothing loaded yet)."""
    text, missing = starter_yaml()
    p = parse_policy_text(text, BUILTIN_FILE)
    p.name, p.file = NAME, BUILTIN_FILE
    values = {f.name: getattr(p, f.name) for f in dataclasses.fields(Policy)}
    return BuiltinPolicy(**values, missing=missing)

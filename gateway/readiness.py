"""What is running and what is missing: the startup table on stderr and the `/readyz` JSON.

One description (`describe`) of a running gateway: where it listens, its upstreams, its routes and
the policy each applies, and for every step its guard, model, device (CPU / CUDA / Metal, threads)
and state: `ready`, `loading` (the server is still starting), `missing` (with the command that fixes
it). A step the built-in `starter` policy left out for want of a model is listed as missing too.
A guard may report more through an optional `status()` method (a mapping, e.g. CodeShield's live
tier); it is read with `getattr`, so guards without one are described from their options.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
from typing import Any

_FIX = re.compile(r"`((?:guardgate|pip|python) [^`]+)`|(pip install '[^']+')")
MODEL_GUARDS = ("llama_guard", "prompt_guard")


@functools.cache
def llama_backend() -> str:
    """The GPU backend llama-cpp-python was built with: CUDA, Metal, Vulkan, ROCm, SYCL, or CPU."""
    try:
        if importlib.util.find_spec("llama_cpp") is None:
            return "not installed"
        import llama_cpp
    except Exception as e:  # a broken build must not break the table
        return f"unavailable ({type(e).__name__})"
    info = llama_cpp.llama_print_system_info()
    text = info.decode(errors="replace") if isinstance(info, bytes) else str(info)
    for name, marker in (("CUDA", "CUDA"), ("Metal", "MTL"), ("Metal", "Metal"), ("Vulkan", "Vulkan"),
                         ("ROCm", "HIP"), ("SYCL", "SYCL")):
        if marker in text:
            return name
    return "GPU" if llama_cpp.llama_supports_gpu_offload() else "CPU"


def _threads(n: Any) -> str:
    return f"{n or os.cpu_count() or 1} threads"


def device_of(guard: str, options: dict[str, Any]) -> str:
    """Where a step's model runs, from its options and the installed runtimes."""
    if guard == "llama_guard":
        if options.get("remote") or options.get("backend") == "remote":
            return "remote"
        return _llama_device(options)
    if guard == "prompt_guard":
        providers = options.get("providers") or ["cpu"]
        first = providers if isinstance(providers, str) else str(providers[0])
        return f"{'CPU' if first.lower() == 'cpu' else first} (onnxruntime), {_threads(options.get('threads'))}"
    return "CPU (in-process)"


def _llama_device(options: dict[str, Any]) -> str:
    layers = int(options.get("n_gpu_layers") or 0)
    backend = llama_backend()
    where = "CPU" if layers == 0 or backend in ("CPU", "not installed") else \
        f"{backend} ({'all' if layers < 0 else layers} layers)"
    return f"{where}, {_threads(options.get('n_threads'))}"


def fix_from(message: str) -> str | None:
    """The command an error message tells the user to run, if it names one."""
    m = _FIX.search(message or "")
    return (m.group(1) or m.group(2)) if m else None


def _guard_status(guard: Any) -> dict[str, Any]:
    status = getattr(guard, "status", None)
    if not callable(status):
        return {}
    try:
        st = status()
    except Exception as e:  # a status report must never take the probe down
        return {"status_error": f"{type(e).__name__}: {e}"}
    return dict(st) if isinstance(st, dict) else {"status": str(st)}


def describe_step(step: Any, ready: bool) -> dict[str, Any]:
    opts = dict(step.options)
    out: dict[str, Any] = {"stage": step.stage, "step": step.label, "guard": step.guard_name,
                           "action": step.action, "model": opts.get("model"),
                           "device": device_of(step.guard_name, opts)}
    if step.unavailable:
        out["state"] = "missing"
        out["detail"] = step.unavailable
        out["fix"] = fix_from(step.unavailable)
        if out["fix"] is None and step.guard_name in MODEL_GUARDS and opts.get("model"):
            out["fix"] = f"guardgate models pull {opts['model']}"
        return out
    out["state"] = "ready" if ready else "loading"
    extra = _guard_status(step.guard)
    if extra:
        state = extra.pop("state", None)
        if state and ready:
            out["state"] = str(state)
        out["status"] = extra
    return out


def describe_policy(policy: Any, ready: bool) -> dict[str, Any]:
    steps = [describe_step(s, ready) for s in policy.steps]
    for m in getattr(policy, "missing", ()):
        steps.append({"stage": m.stage, "step": m.label or f"{m.stage}:{m.guard}", "guard": m.guard, "action": "block",
                      "model": m.model, "device": "-", "state": "missing", "detail": m.why, "fix": m.fix,
                      "optional": True})
    order = {"input": 0, "stream": 1, "output": 2}
    steps.sort(key=lambda s: order.get(s["stage"], 3))
    out = {"name": policy.name, "mode": policy.mode, "source": policy.file or "", "steps": steps}
    content = getattr(policy, "content", None)
    if content is not None and policy.steps:  # media parts: refuse | allow | guard (policy/content.py)
        out["content"] = content.describe()
    return out


def describe_upstream(name: str, ucfg: Any, up: Any, ready: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"name": name, "type": ucfg.type, "dialect": ucfg.dialect}
    if ucfg.type == "llama_cpp":
        opts = dict(getattr(up, "engine_options", None) or ucfg.options or {})
        out.update(target=ucfg.model or "gemma-3-270m", device=_llama_device(opts),
                   state="ready" if getattr(up, "model", None) is not None else ("loading" if not ready
                                                                                   else "missing"))
    else:
        out.update(target=ucfg.base_url, device="-", state="ready" if ready else "loading")
        if ucfg.api_key_env:
            out["api_key_env"] = ucfg.api_key_env
            out["api_key_set"] = bool(os.environ.get(ucfg.api_key_env))
    return out


def describe(gw: Any) -> dict[str, Any]:
    """The whole picture of a gateway (`gateway.server.Gateway`), as JSON-ready data."""
    cfg = gw.cfg
    ready = bool(gw.ready)
    store = gw.policies
    routes = []
    for r in cfg.routes:
        match = " ".join(x for x in (f"path {r.path}" if r.path else "", f"model {r.model}" if r.model else "") if x)
        routes.append({"match": match or "*", "upstream": r.upstream, "policy": cfg.policy or r.policy or "none",
                       "passthrough": sorted(r.passthrough)})
    used = [cfg.policy] if cfg.policy else [r.policy for r in cfg.routes] + [k.policy for k in cfg.keys] + [
        s.policy for s in cfg.mcp_servers.values()]
    policies = []
    for name in dict.fromkeys(n for n in used if n):
        try:
            pol = store.get(name) if store is not None else None
        except KeyError:
            pol = None
        if pol is None:
            policies.append({"name": name, "state": "missing", "steps": [],
                             "fix": f"add policies/{name}.yaml or check policy_dirs"})
        else:
            policies.append(describe_policy(pol, ready))
    out = {
        "ready": ready,
        "listen": f"http://{cfg.host}:{cfg.port}",
        "config": cfg.source or "(flags)",
        "upstreams": [describe_upstream(n, u, gw.upstreams.get(n), ready) for n, u in cfg.upstreams.items()],
        "routes": routes,
        "keys": [{"name": k.name, "policy": k.policy} for k in cfg.keys],
        "policies": policies,
        "audit": cfg.audit_path,
    }
    if cfg.mcp_servers:  # gateway.mcp: guarded at /mcp/{name}
        out["mcp_servers"] = [{"name": n, "path": f"/mcp/{n}", "url": m.url, "policy": cfg.policy or m.policy or "none"}
                              for n, m in cfg.mcp_servers.items()]
    return out


def _table(rows: list[list[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [indent + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def render(desc: dict[str, Any], event_loop: str = "") -> str:
    """The startup table (plain text: it goes to stderr and into logs)."""
    loop = f"; event loop: {event_loop}" if event_loop else ""
    lines = [f"guardgate listening on {desc['listen']} (config: {desc['config']}{loop})", "", "upstreams"]
    lines += _table([["name", "type", "target", "device", "state"]]
                    + [[u["name"], u["type"], u["target"] or "-", u["device"], u["state"]] for u in desc["upstreams"]])
    lines += ["", "routes"]
    lines += _table([["match", "upstream", "policy"]]
                    + [[r["match"], r["upstream"], r["policy"]] for r in desc["routes"]])
    if desc.get("mcp_servers"):
        lines += ["", "mcp servers"]
        lines += _table([["path", "url", "policy"]]
                        + [[m["path"], m["url"], m["policy"]] for m in desc["mcp_servers"]])
    if not desc["policies"]:
        lines += ["", "policy: none (guarding off: requests are relayed as they come)"]
    for p in desc["policies"]:
        lines += ["", f"policy {p['name']}" + (f" ({p.get('mode')}, {p.get('source')})" if p.get("source") else "")]
        if p.get("state") == "missing":
            lines.append(f"  missing: {p.get('fix')}")
            continue
        rows = [["stage", "step", "guard", "model", "device", "state"]]
        for s in p["steps"]:
            state = s["state"]
            if state == "missing":
                state = f"missing ({s.get('detail') or '?'})" + (f": {s['fix']}" if s.get("fix") else "")
            elif s.get("status"):
                flat = [f"{k}={v}" for k, v in s["status"].items() if not isinstance(v, dict | list)]
                state += f" ({', '.join(flat)})" if flat else ""
            rows.append([s["stage"], s["step"], s["guard"], s.get("model") or "-", s["device"], state])
        lines += _table(rows)
        if p.get("content"):
            rules = [f"{k} {v}" + (" (relayed unchecked, audited)" if v == "allow" else "")
                     for k, v in p["content"].items()]
            lines.append("  content: " + ", ".join(rules))
    if desc.get("audit"):
        lines += ["", f"audit log: {desc['audit']} (guardgate audit {desc['audit']})"]
    return "\n".join(lines)

"""The import graph of `gateway/`: no cycle, and guards reach nothing above them.

Every import statement counts, wherever it stands (module level, inside a function, under
`TYPE_CHECKING`): a cycle hidden in a function is still two modules that each need the other. Read
with `ast`, nothing is imported. `python -m pytest -q tests/test_import_graph.py` is the check.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "gateway"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The `gateway` modules that `name` imports (a `from pkg import sub` names the submodule)."""
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join([*base, node.module] if node.module else base)
            else:
                mod = node.module or ""
            for a in node.names:
                sub = f"{mod}.{a.name}"
                out.add(sub if sub in known else mod)
    return {m for m in out if m in known and m != name}


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {name: _imports(name, path, known) for name, path in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_walker_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_walker_reads_the_package() -> None:
    g = import_graph()
    assert "gateway.policy.chain" in g and "gateway.policy.schema" in g["gateway.policy.chain"]
    assert "gateway.guards.code_shield.guard" in g["gateway.guards.code_shield"]  # relative or absolute


def test_no_import_cycle_in_gateway() -> None:
    found = cycles(import_graph())
    assert not found, "import cycles in gateway/: " + "; ".join(" <-> ".join(c) for c in found)


FORBIDDEN_FOR_GUARDS = ("gateway.dialects", "gateway.upstreams", "gateway.server")


def test_guards_import_nothing_above_them() -> None:
    """Guards see neutral types and text; a guard that asks a model gets a chat client at start."""
    bad = {
        mod: sorted(d for d in deps if d.startswith(FORBIDDEN_FOR_GUARDS))
        for mod, deps in import_graph().items()
        if mod.startswith("gateway.guards")
    }
    bad = {m: d for m, d in bad.items() if d}
    assert not bad, f"guard modules importing transport or the server: {bad}"


def _deps_of(graph: dict[str, set[str]], layer: str) -> set[str]:
    """What the modules of `layer` (a module or a package) import from outside it."""
    out: set[str] = set()
    for mod, deps in graph.items():
        if mod == layer or mod.startswith(layer + "."):
            out |= {d for d in deps if d != layer and not d.startswith(layer + ".")}
    return out


def _under(mod: str, prefixes: tuple[str, ...]) -> bool:
    return any(mod == p or mod.startswith(p + ".") for p in prefixes)


# layer: (may import only these, or None for no such rule; may never import these) - docs/architecture.md
RULES: dict[str, tuple[tuple[str, ...] | None, tuple[str, ...]]] = {
    "gateway.errors": ((), ()),
    "gateway.context": (("gateway.errors", "gateway.config", "gateway.endpoints"), ()),
    "gateway.endpoints": (("gateway.errors",), ()),
    "gateway.types": ((), ()),
    "gateway.dialects": (("gateway.types",), ()),
    "gateway.limits": (("gateway.context", "gateway.errors", "gateway.policy.tokens"), ()),
    "gateway.routing": (None, ("gateway.pipeline", "gateway.server")),
    "gateway.pipeline": (None, ("gateway.server",)),
    "gateway.guards": (None, ("gateway.dialects", "gateway.upstreams", "gateway.server", "gateway.policy")),
    "gateway.engine": (None, ("gateway.guards", "gateway.policy")),
    "gateway.policy": (None, ("gateway.dialects", "gateway.telemetry", "gateway.server", "gateway.pipeline")),
}


def test_each_layer_imports_what_the_architecture_allows() -> None:
    g = import_graph()
    broken = {}
    for layer, (only, never) in RULES.items():
        deps = _deps_of(g, layer)
        bad = {d for d in deps if (only is not None and not _under(d, only)) or _under(d, never)}
        if bad:
            broken[layer] = sorted(bad)
    assert not broken, f"imports the architecture's rules forbid: {broken}"

"""Every import of the `gateway` package is declared in pyproject.toml (issue 27).

A module-level import of a third-party package must come from a core dependency (the run profile
and every built-in guard load it at start); an import inside a function (an optional guard's
runtime, loaded lazily) must come from a core dependency or an extra. The test extra installs
everything, so without this check a package that only arrives through another one (jsonschema did)
passes CI and breaks the run profile.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _dist(req: str) -> str:
    return re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0].strip().lower().replace("_", "-")


def _declared() -> tuple[set[str], set[str]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {_dist(r) for r in project["dependencies"]}
    extras = {_dist(r) for reqs in project["optional-dependencies"].values() for r in reqs}
    return core, extras - {"guardgate"}


def _imports() -> list[tuple[str, str, bool]]:
    """(file, top-level module, imported at module level) for every absolute import in gateway/."""
    out = []
    for path in sorted((ROOT / "gateway").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        # `if TYPE_CHECKING:` blocks never run; a module-level `if` runs at import; `try` is an optional import.
        tree.body = [n for n in tree.body if not (isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test))]
        top_level = {id(n) for n in tree.body}
        for node in tree.body:
            if isinstance(node, ast.If):
                top_level |= {id(n) for n in ast.walk(node)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                out.append((str(path.relative_to(ROOT)), name.split(".")[0], id(node) in top_level))
    return out


def test_every_third_party_import_is_declared() -> None:
    core, extras = _declared()
    dists = md.packages_distributions()
    problems = []
    for file, mod, eager in _imports():
        if mod in sys.stdlib_module_names or mod in ("gateway", "__future__"):
            continue
        owners = {d.lower().replace("_", "-") for d in dists.get(mod, [])}
        if not owners:
            problems.append(f"{file}: imports {mod!r}, which no installed distribution provides")
            continue
        allowed = core if eager else core | extras
        if not owners & allowed:
            where = "core dependencies" if eager else "dependencies or extras"
            problems.append(f"{file}: imports {mod!r} ({', '.join(sorted(owners))}) not in the {where}")
    assert not problems, "\n".join(sorted(set(problems)))


def test_run_profile_has_what_the_starter_policy_runs() -> None:
    """The README's run profile installs the extras of every optional starter step that needs no
    download (CodeShield); the model-backed ones are listed as missing until their model is pulled."""
    from gateway import starter

    script = (ROOT / "scripts" / "install.sh").read_text()
    run_line = next(ln for ln in script.splitlines() if ln.strip().startswith("run)"))
    installed = set(re.search(r"\.\[([a-z,]+)\]", run_line).group(1).split(","))
    no_download = {opt.extra for opt in starter.OPTIONAL if not opt.models}
    assert no_download <= installed, (no_download, installed)

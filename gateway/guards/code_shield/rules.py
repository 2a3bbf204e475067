"""CodeShield's rules: Meta's data files read and compiled once, and semgrep's prefilter formulas.

The rules come from the installed `codeshield` package's data files (``rules/config.yaml``,
``rules/regex/*.yaml``, ``rules/semgrep/_generated_/<lang>_<usecase>.json``), read without
importing ``codeshield.cs``: importing it needs a semgrep binary and creates an ``osemgrep`` symlink
inside site-packages (fails on a read-only install).
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gateway.guards.base import GuardConfigError

SEVERITIES = ("error", "warning", "advice", "info")
SEVERITY_RANK = {"error": 3, "warning": 2, "advice": 1, "info": 0}
_SEMGREP_SEVERITY = {"ERROR": "error", "WARNING": "warning", "INFO": "info", "INVENTORY": "info"}

# CodeShield's supported languages: what `scan_code(language=None)` iterates over.
SUPPORTED_LANGUAGES = ("c", "cpp", "csharp", "java", "javascript", "php", "python", "rust")
AGNOSTIC = "language_agnostic"


def find_rules_dir() -> Path | None:
    """The installed `codeshield` package's rules directory, located without importing it."""
    try:
        spec = importlib.util.find_spec("codeshield")
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    for loc in spec.submodule_search_locations or []:
        cand = Path(loc) / "insecure_code_detector" / "rules"
        if (cand / "config.yaml").is_file():
            return cand
    return None


@dataclass(frozen=True, slots=True)
class RegexRule:
    id: str
    source: str  # the rule file's language (c, cpp, language_agnostic, ...)
    cwe: str
    severity: str
    description: str
    pattern: re.Pattern[str]


@dataclass(slots=True)
class SemgrepRule:
    id: str
    language: str  # the _generated_ file's language
    cwe: str
    severity: str
    description: str
    raw: dict[str, Any]
    prescan: re.Pattern[str] | None  # Meta's metadata.prescan_regex
    prefilter: Callable[[str], bool] | None = None  # semgrep's own necessary condition
    key: int = 0  # unique index in the rule set


@dataclass(slots=True)
class RuleSet:
    """CodeShield's rules for one usecase, compiled once."""

    usecase: str
    rules_dir: Path
    regex_by_file: dict[str, list[RegexRule]]
    semgrep_by_lang: dict[str, list[SemgrepRule]]
    skipped: list[str] = field(default_factory=list)  # rules that did not compile
    prefilters_loaded: bool = False
    _regex_cache: dict[str, tuple[RegexRule, ...]] = field(default_factory=dict)

    @classmethod
    def load(cls, rules_dir: Path | str | None = None, usecase: str = "codeshield") -> RuleSet:
        root = Path(rules_dir) if rules_dir else find_rules_dir()
        if root is None or not (root / "config.yaml").is_file():
            raise GuardConfigError(
                "CodeShield rules not found: install the `codeshield` package "
                "(pip install 'guardgate[codeshield]') or set rules_dir"
            )
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        with open(root / "config.yaml", encoding="utf-8") as f:
            config = (yaml.load(f, Loader=loader) or {}).get("config", {})
        if usecase not in config:
            raise GuardConfigError(f"unknown CodeShield usecase {usecase!r} (known: {', '.join(config)})")
        enabled_cfg: dict[str, Any] = config[usecase] or {}
        skipped: list[str] = []

        def enabled(lang: str, analyzer: str) -> set[str]:
            entry = (enabled_cfg.get(lang) or {}).get(analyzer) or {}
            return set(entry.get("rules") or [])

        regex_by_file: dict[str, list[RegexRule]] = {}
        for path in sorted((root / "regex").glob("*.yaml")):
            lang = path.stem
            on = enabled(lang, "regex")
            with open(path, encoding="utf-8") as f:
                entries = yaml.load(f, Loader=loader) or []
            rules: list[RegexRule] = []
            for e in entries:
                pid = e.get("pattern_id")
                if pid is not None and pid not in on:  # Meta: rules without an id are always on
                    continue
                try:
                    pat = re.compile(e["rule"])
                except re.error as exc:
                    skipped.append(f"{lang}/{pid}: {exc}")
                    continue
                rules.append(
                    RegexRule(
                        id=pid or e["rule"],
                        source=lang,
                        cwe=str(e.get("cwe_id", "")),
                        severity=norm_severity(e.get("severity", "warning")),
                        description=str(e.get("description", "")).strip(),
                        pattern=pat,
                    )
                )
            regex_by_file[lang] = rules

        semgrep_by_lang: dict[str, list[SemgrepRule]] = {}
        shared: dict[str, SemgrepRule] = {}  # C and C++ ship the same rules: share the objects
        key = 0
        for path in sorted((root / "semgrep" / "_generated_").glob(f"*_{usecase}.json")):
            lang = path.name[: -len(f"_{usecase}.json")]
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            out: list[SemgrepRule] = []
            for r in data.get("rules", []):
                ident = json.dumps(r, sort_keys=True)
                if ident in shared:
                    out.append(shared[ident])
                    continue
                meta = r.get("metadata") or {}
                prescan = None
                if meta.get("prescan_regex"):
                    try:
                        prescan = re.compile(meta["prescan_regex"])
                    except re.error as exc:
                        skipped.append(f"semgrep {lang}/{r.get('id')} prescan: {exc}")
                rule = SemgrepRule(
                    id=str(r.get("id")),
                    language=lang,
                    cwe=str(meta.get("cwe_id") or ""),
                    severity=norm_severity(str(r.get("severity", "WARNING"))),
                    description=str(r.get("message", "")).strip(),
                    raw=r,
                    prescan=prescan,
                    key=key,
                )
                key += 1
                shared[ident] = rule
                out.append(rule)
            semgrep_by_lang[lang] = out
        return cls(usecase, root, regex_by_file, semgrep_by_lang, skipped)

    @property
    def all_semgrep_rules(self) -> list[SemgrepRule]:
        seen: dict[int, SemgrepRule] = {}
        for rules in self.semgrep_by_lang.values():
            for r in rules:
                seen.setdefault(r.key, r)
        return list(seen.values())

    def regex_for(self, language: str) -> tuple[RegexRule, ...]:
        """The regex rules CodeShield runs for `language` (same composition as Meta's `load`)."""
        hit = self._regex_cache.get(language)
        if hit is None:
            seen: dict[tuple[str, str], RegexRule] = {}
            for r in self._chain(language):
                seen.setdefault((r.source, r.id), r)
            hit = self._regex_cache[language] = tuple(seen.values())
        return hit

    def _chain(self, language: str) -> list[RegexRule]:
        own = list(self.regex_by_file.get(language, ())) if language != AGNOSTIC else []
        if language in ("cpp", "objective_c"):
            return own + self._chain("c")
        if language == "objective_cpp":
            return own + self._chain("objective_c") + self._chain("cpp")
        return own + list(self.regex_by_file.get(AGNOSTIC, ()))

    def has_language(self, language: str) -> bool:
        return language in self.regex_by_file and language != AGNOSTIC


def norm_severity(s: str) -> str:
    s = s.strip()
    if s in _SEMGREP_SEVERITY:
        return _SEMGREP_SEVERITY[s]
    s = s.lower()
    return s if s in SEVERITY_RANK else "warning"


def compile_prefilter(node: Any) -> Callable[[str], bool] | None:
    """Turn a `semgrep-core -prefilter_of_rules` formula into a predicate (None = no filter).

    Conservative on purpose: identifier sets are treated as "any of them occurs as a substring",
    regexes are compiled with re.MULTILINE, and anything we cannot read lets the rule through.
    """
    if node == "None" or node is None:
        return None
    try:
        if isinstance(node, list) and node and node[0] == "Some":
            return _formula(node[1])
    except Exception:  # an unreadable formula must never drop a rule
        return None
    return None


def _formula(f: Any) -> Callable[[str], bool]:
    kind = f[0]
    if kind == "And":
        parts = [_formula(x) for x in f[1]]
        return lambda s: all(p(s) for p in parts)
    if kind == "Or":
        parts = [_formula(x) for x in f[1]]
        return lambda s: any(p(s) for p in parts)
    if kind == "Pred":
        pred = f[1]
        if pred[0] == "Idents":
            idents = [str(x) for x in pred[1]]
            return lambda s: any(i in s for i in idents)
        if pred[0] == "Regexp":
            try:
                rx = re.compile(pred[1], re.M)
            except re.error:
                return lambda s: True
            return lambda s: rx.search(s) is not None
    return lambda s: True


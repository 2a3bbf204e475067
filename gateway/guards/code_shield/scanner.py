"""The scanner: tier 1 (Meta's regexes, in-process) and tier 2 (semgrep, batched), and what they found.

Tier 1 runs every enabled pattern on each block in the block's own language (C++ and Objective-C
also get C's rules, every language the language-agnostic secret rules), with Meta's comment filter;
a rule reports its first match that is not on a comment line. Tier 2 sends a block to semgrep only
if some rule can match (semgrep's own prefilter, else Meta's prescan gate), and only if that can
change the outcome; all blocks of one check share one semgrep request.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from gateway.guards.code_fences import CodeBlock
from gateway.guards.code_shield.options import CodeShieldOptions
from gateway.guards.code_shield.rules import (
    AGNOSTIC,
    SUPPORTED_LANGUAGES,
    RuleSet,
    SemgrepRule,
    compile_prefilter,
    norm_severity,
)
from gateway.guards.code_shield.semgrep import LOG, SemgrepError, SemgrepRunner, cached_prefilter_formulas
from gateway.types import ACTION_RANK

_EXTENSIONS = {
    "c": ".c",
    "cpp": ".cpp",
    "csharp": ".cs",
    "java": ".java",
    "javascript": ".js",
    "typescript": ".ts",
    "php": ".php",
    "python": ".py",
}


@dataclass(slots=True)
class Finding:
    rule: str
    cwe: str
    severity: str
    line: int  # 1-based line within the scanned code
    description: str
    analyzer: Literal["regex", "semgrep"]
    language: str  # the rule set that matched (python, c, language_agnostic, ...)
    action: str = "warn"
    offset: int | None = None  # char offset of that line in the whole text, when known
    column: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "rule": self.rule,
            "cwe": self.cwe,
            "severity": self.severity,
            "line": self.line,
            "analyzer": self.analyzer,
            "language": self.language,
            "action": self.action,
            "description": self.description,
        }
        if self.offset is not None:
            d["offset"] = self.offset
        if self.column is not None:
            d["column"] = self.column
        return d


Tier2Status = Literal["ran", "not_needed", "skipped", "not_run", "off", "error"]


@dataclass(slots=True)
class ScanResult:
    """What the scanner found in one piece of code."""

    language: str | None
    scanned_as: list[str]
    findings: list[Finding] = field(default_factory=list)
    tier2: Tier2Status = "not_needed"
    tier2_reason: str = ""
    latency_ms: float = 0.0

    @property
    def action(self) -> str:
        best = "ignore"
        for f in self.findings:
            if ACTION_RANK[f.action] > ACTION_RANK[best]:
                best = f.action
        return best

    @property
    def flagged(self) -> bool:
        return self.action != "ignore"

    @property
    def recommended_treatment(self) -> str:
        """Meta's treatment, computed as Meta meant it: block on any error-severity finding."""
        if not self.findings:
            return "ignore"
        return "block" if any(f.severity == "error" for f in self.findings) else "warn"


@dataclass(slots=True)
class ScanItem:
    """One piece of code to scan, located in the guarded text."""

    span: tuple[int, int]
    code: str
    language: str | None
    language_source: str
    label: str
    line_offsets: list[int] | None = None
    block_index: int | None = None

    @classmethod
    def from_block(cls, b: CodeBlock) -> ScanItem:
        return cls(
            span=b.span,
            code=b.code,
            language=b.language,
            language_source=b.language_source,
            label=f"code block {b.index + 1}" + (f" ({b.info.split()[0]})" if b.info else ""),
            line_offsets=list(b.line_offsets),
            block_index=b.index,
        )


class CodeScanner:
    """Tier 1 in-process, tier 2 batched through one semgrep process."""

    def __init__(self, rules: RuleSet, opts: CodeShieldOptions, semgrep: SemgrepRunner | None,
                 semgrep_reason: str = "", semgrep_broken: bool = False) -> None:  # fmt: skip
        self.rules = rules
        self.opts = opts
        self.semgrep = semgrep
        self.semgrep_reason = semgrep_reason  # why there is no runner
        # no runner because the configured semgrep is broken (not merely absent): blocks that need
        # tier 2 are errors, never "not run"
        self.semgrep_broken = semgrep_broken
        self._gate_cache: dict[str, tuple[list[SemgrepRule], list[re.Pattern[str]]]] = {}

    # languages -------------------------------------------------------------

    def scan_languages(self, language: str | None) -> list[str]:
        """Rule sets to apply to code of `language` (canonical name, or None when unknown)."""
        if language is None:
            if self.opts.unknown_language == "all":
                return list(SUPPORTED_LANGUAGES)
            return [AGNOSTIC]
        if language == "typescript":
            return ["javascript"]
        if self.rules.has_language(language):
            return [language]
        return [AGNOSTIC]

    # tier 1 ----------------------------------------------------------------

    def regex_findings(self, code: str, languages: Iterable[str]) -> list[Finding]:
        out: list[Finding] = []
        seen: set[tuple[str, str]] = set()
        acts = self.opts.severity_actions
        for lang in languages:
            for rule in self.rules.regex_for(lang):
                if (rule.source, rule.id) in seen:
                    continue
                for m in rule.pattern.finditer(code):
                    pos = m.start()
                    ls = code.rfind("\n", 0, pos) + 1
                    if ls < pos and _is_comment_or_directive(code[ls:pos]):
                        continue  # Meta drops matches on comment lines
                    seen.add((rule.source, rule.id))
                    out.append(
                        Finding(
                            rule=rule.id,
                            cwe=rule.cwe,
                            severity=rule.severity,
                            line=code.count("\n", 0, pos) + 1,
                            description=rule.description,
                            analyzer="regex",
                            language=rule.source,
                            action=acts.get(rule.severity, "warn"),
                            column=pos - ls + 1,
                        )
                    )
                    break
        return out

    # tier 2 gate -----------------------------------------------------------

    def tier2_rules(self, code: str, language: str) -> list[SemgrepRule]:
        """Semgrep rules of `language` that can match `code` (empty: semgrep would find nothing new).

        A rule with a semgrep prefilter is kept iff the prefilter matches (exact necessary
        condition); a rule without one iff Meta's language-level prescan gate opens.
        """
        if language not in self.opts.semgrep_languages:
            return []
        rules = self.rules.semgrep_by_lang.get(language)
        if not rules:
            return []
        gate_open: bool | None = None
        out: list[SemgrepRule] = []
        for r in rules:
            if r.prefilter is not None:
                if r.prefilter(code):
                    out.append(r)
                continue
            if gate_open is None:
                prescans = [x.prescan for x in rules if x.prescan is not None]
                gate_open = not prescans or any(p.search(code) for p in prescans)
            if gate_open:
                out.append(r)
        return out

    def _may_escalate(self, res: ScanResult, wanted: list[tuple[str, list[SemgrepRule]]]) -> bool:
        """Whether a candidate semgrep rule could raise an already flagged block's action.

        Without `severity_actions` the policy step's own action applies to any flagged block, so
        nothing tier 2 finds can change what happens to it.
        """
        if not self.opts.severity_actions_set:
            return False
        acts = self.opts.severity_actions
        best = max(ACTION_RANK[acts.get(r.severity, "warn")] for _, rules in wanted for r in rules)
        return best > ACTION_RANK[res.action]

    # scanning --------------------------------------------------------------

    async def scan_items(self, items: Sequence[ScanItem]) -> list[ScanResult]:
        """Scan several pieces of code; every one that needs semgrep shares one process."""
        t0 = time.perf_counter()
        results: list[ScanResult] = []
        pending: list[tuple[int, str, str, list[SemgrepRule]]] = []  # (item, code, ext lang, rules)
        for i, item in enumerate(items):
            langs = self.scan_languages(item.language)
            if len(item.code) > self.opts.max_inline_chars:
                found = await asyncio.to_thread(self.regex_findings, item.code, langs)
            else:
                found = self.regex_findings(item.code, langs)
            res = ScanResult(language=item.language, scanned_as=langs, findings=found)
            results.append(res)
            if self.opts.semgrep == "off":
                res.tier2, res.tier2_reason = "off", "semgrep disabled by policy"
                continue
            wanted = [(lang, self.tier2_rules(item.code, lang)) for lang in langs]
            wanted = [(lang, rules) for lang, rules in wanted if rules]
            if not wanted:
                continue  # not_needed
            if res.flagged and not self.opts.exhaustive and not self._may_escalate(res, wanted):
                res.tier2, res.tier2_reason = "skipped", "tier 1 already decided"
                continue
            if self.semgrep is None:
                state = "error" if self.semgrep_broken else "not_run"
                res.tier2, res.tier2_reason = state, self.semgrep_reason or "semgrep not available"
                continue
            for lang, rules in wanted:
                ext = ".ts" if item.language == "typescript" else _EXTENSIONS.get(lang, ".txt")
                pending.append((i, item.code, ext, rules))
        if pending and self.semgrep is not None:
            await self._run_tier2(results, pending)
        dt = (time.perf_counter() - t0) * 1000.0
        for item, res in zip(items, results, strict=True):
            res.latency_ms = dt
            offs = item.line_offsets
            if offs:
                for f in res.findings:
                    if 1 <= f.line <= len(offs):
                        f.offset = offs[f.line - 1] + (f.column - 1 if f.column else 0)
        return results

    async def _run_tier2(
        self,
        results: list[ScanResult],
        pending: list[tuple[int, str, str, list[SemgrepRule]]],
    ) -> None:
        assert self.semgrep is not None
        union: dict[int, SemgrepRule] = {}
        for _, _, _, rules in pending:
            for r in rules:
                union.setdefault(r.key, r)
        targets = [(code, ext) for _, code, ext, _ in pending]
        try:
            found, n_errors = await self.semgrep.scan(targets, list(union.values()))
        except SemgrepError as exc:
            for i, *_ in pending:
                results[i].tier2, results[i].tier2_reason = "error", str(exc)
            return
        allowed = [{r.key for r in rules} for _, _, _, rules in pending]
        acts = self.opts.severity_actions
        for hit in found:
            rule = hit.rule
            if rule.key not in allowed[hit.target]:
                continue  # the batch shares one config; keep only what this target's gate allowed
            res = results[pending[hit.target][0]]
            sev = norm_severity(hit.severity) if hit.severity else rule.severity
            if any(f.analyzer == "semgrep" and f.rule == rule.id and f.line == hit.line for f in res.findings):
                continue
            res.findings.append(
                Finding(
                    rule=rule.id,
                    cwe=rule.cwe,
                    severity=sev,
                    line=hit.line,
                    description=(hit.message or rule.description).strip(),
                    analyzer="semgrep",
                    language=rule.language,
                    action=acts.get(sev, "warn"),
                    column=hit.col,
                )
            )
        for i, *_ in pending:
            results[i].tier2 = "ran"
            if n_errors:
                results[i].tier2_reason = f"semgrep reported {n_errors} error(s)"


def _is_comment_or_directive(prefix: str) -> bool:
    s = prefix.strip()
    return s.startswith(("#", "//", "/*")) or s.endswith("*/")


_SHARED_LOCK = threading.Lock()
_SHARED: dict[tuple[str | None, str, str | None], RuleSet] = {}


def shared_rules(rules_dir: str | None, usecase: str, runner: SemgrepRunner | None) -> RuleSet:
    """Rules compiled once per process (per rules dir, usecase and semgrep binary), prefilters included."""
    key = (rules_dir, usecase, runner.binary if runner else None)
    with _SHARED_LOCK:
        hit = _SHARED.get(key)
        if hit is not None:
            return hit
        rules = RuleSet.load(rules_dir, usecase)
        if runner is not None:
            try:
                formulas = cached_prefilter_formulas(runner, rules)
                for r in rules.all_semgrep_rules:
                    r.prefilter = compile_prefilter(formulas.get(r.key))
                rules.prefilters_loaded = True
            except Exception as exc:  # fall back to Meta's prescan gate for every rule
                LOG.warning("code_shield: semgrep prefilters unavailable (%s); using prescans", exc)
        _SHARED[key] = rules
        return rules

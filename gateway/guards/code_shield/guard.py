"""The `code_shield` guard: CodeShield on the code in answers, as it streams, and in tool-call arguments.

The stream check keeps a `Document`: each check feeds the new text, scans the pieces that became
complete (and the unterminated one on the final check) and, with ``hold_code_blocks``, asks the gate
to hold text from the start of the open block (``Verdict.hold_from``) so prose flows and code is
released only after it was scanned.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

from gateway.guards.base import NO_RESOURCES, Guard, GuardInput, GuardResources, StreamCheck, register
from gateway.guards.code_fences import detect_language, normalize_language
from gateway.guards.code_shield.document import Document
from gateway.guards.code_shield.options import CodeShieldOptions
from gateway.guards.code_shield.rules import SEVERITY_RANK
from gateway.guards.code_shield.scanner import CodeScanner, ScanItem, ScanResult, shared_rules
from gateway.guards.code_shield.semgrep import SemgrepRunner
from gateway.types import ACTION_RANK, Message, Verdict

LOG = logging.getLogger("gateway.guards.code_shield")


@register("code_shield")
class CodeShieldGuard(Guard):
    """Meta's CodeShield rules on the code in answers (fenced blocks) and tool-call arguments."""

    name = "code_shield"
    stages = frozenset({"input", "stream", "output"})

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.opts = CodeShieldOptions.parse(options)
        self._scanner: CodeScanner | None = None
        self._lock = threading.Lock()
        self.startup_ms: float = 0.0

    # lifecycle -------------------------------------------------------------

    async def start(self, resources: GuardResources = NO_RESOURCES) -> None:
        """Load and compile the rules, locate semgrep, read its prefilters (once per process), start
        this loop's semgrep server and prove tier 2 works on a canary, so no request pays for it and
        `status()` (/readyz) and the log say which tiers are live."""
        if self._scanner is None:
            await asyncio.to_thread(self._load)
        assert self._scanner is not None
        sg = self._scanner.semgrep
        if sg is not None:
            await sg.self_test()
        st = self.status()
        tier2 = st["semgrep"]
        if st["state"] == "ready" and tier2["state"] in ("ready", "off"):
            LOG.info("code_shield: live tiers %s (semgrep %s)", "+".join(st["tiers"]),
                     tier2.get("engine", tier2["state"]))  # fmt: skip
        else:
            LOG.warning("code_shield: %s; live tiers %s; semgrep %s: %s", st["state"], "+".join(st["tiers"]),
                        tier2["state"], tier2.get("reason", ""))  # fmt: skip

    def _load(self) -> CodeScanner:
        with self._lock:
            if self._scanner is not None:
                return self._scanner
            t0 = time.perf_counter()
            runner: SemgrepRunner | None = None
            reason = ""
            broken = False
            if self.opts.semgrep != "off":
                binary = SemgrepRunner.locate(self.opts.semgrep_path)
                if binary is None and self.opts.semgrep_path:
                    reason = f"semgrep_path {self.opts.semgrep_path} is not an executable file"
                    broken = True  # configured and missing: a broken tier, never "not installed"
                elif binary is None:
                    reason = "semgrep not installed (pip install semgrep) or semgrep-core not on PATH"
                    broken = self.opts.semgrep == "required"
                else:
                    runner = SemgrepRunner(
                        binary, self.opts.semgrep_timeout_s, self.opts.semgrep_concurrency, self.opts.semgrep_mode
                    )
            rules = shared_rules(self.opts.rules_dir, self.opts.usecase, runner)
            if runner is not None:
                langs = set(self.opts.semgrep_languages)
                runner.server_rules = [r for r in rules.all_semgrep_rules if r.language in langs or (
                    r.language == "c" and "cpp" in langs)]  # fmt: skip
            self._scanner = CodeScanner(rules, self.opts, runner, reason, broken)
            self.startup_ms = (time.perf_counter() - t0) * 1000.0
            return self._scanner

    async def aclose(self) -> None:
        """Stop the semgrep servers this guard started."""
        if self._scanner is not None and self._scanner.semgrep is not None:
            await self._scanner.semgrep.aclose()

    async def scanner(self) -> CodeScanner:
        """The scanner, loading the rules on first use (the semgrep server then starts lazily)."""
        if self._scanner is None:
            await asyncio.to_thread(self._load)
        assert self._scanner is not None
        return self._scanner

    def status(self) -> dict[str, Any]:
        """Which tiers are live, for /readyz and the startup log.

        state: "ready"; "degraded" when tier 2 does not work (not installed, or broken) and the step
        allows it (``semgrep: auto``): blocks that needed it are reported not run, or are errors;
        "failed" (the gateway is not ready) when it does not work and the step says
        ``semgrep: required``. "semgrep" says the tier's own state and why.
        """
        s = self._scanner
        if s is None:
            return {"state": "ready", "tiers": [], "semgrep": {"state": "not loaded"}}
        if self.opts.semgrep == "off":
            tier2: dict[str, Any] = {"state": "off"}
        elif s.semgrep is None:
            tier2 = {"state": "failed" if s.semgrep_broken else "not installed", "reason": s.semgrep_reason}
        else:
            tier2 = s.semgrep.status()
            if not s.semgrep.tested:
                tier2["self_test"] = "not run"
        up = tier2["state"] in ("ready", "off")
        state = "ready" if up else ("failed" if self.opts.semgrep == "required" else "degraded")
        tiers = ["regex", "semgrep"] if tier2["state"] == "ready" else ["regex"]
        return {"state": state, "tiers": tiers, "semgrep": tier2}

    def describe(self) -> dict[str, Any]:
        """Rule counts and tier-2 availability (for `guardgate models`/health output)."""
        s = self._scanner
        if s is None:
            return {"loaded": False}
        return {
            "loaded": True,
            "usecase": s.rules.usecase,
            "rules_dir": str(s.rules.rules_dir),
            "regex_rules": {k: len(v) for k, v in s.rules.regex_by_file.items() if v},
            "semgrep_rules": {k: len(v) for k, v in s.rules.semgrep_by_lang.items()},
            "semgrep": s.semgrep.binary if s.semgrep else None,
            "semgrep_version": s.semgrep.version() if s.semgrep else None,
            "semgrep_reason": s.semgrep_reason,
            "semgrep_mode": (s.semgrep.mode if s.semgrep.server_error is None else "process") if s.semgrep else None,
            "semgrep_server_error": s.semgrep.server_error if s.semgrep else None,
            "prefilters": s.rules.prefilters_loaded,
            "skipped_rules": list(s.rules.skipped),
            "startup_ms": round(self.startup_ms, 1),
        }

    # one-shot checks ---------------------------------------------------------

    async def check(self, inp: GuardInput) -> Verdict:
        t0 = time.perf_counter()
        if inp.stage == "input":
            items: list[ScanItem] = []
            for i, m in enumerate(inp.messages):
                if m.role not in self.opts.roles:
                    continue
                for text in [m.text, *(c.arguments for c in m.tool_calls)]:
                    for it in Document(self.opts.detect_language, self.opts.tool_arguments).advance(text, True):
                        it.label = f"message {i} {it.label}"
                        items.append(it)
            return await self._judge(t0, items, hold_from=None)
        doc = Document(self.opts.detect_language, self.opts.tool_arguments)
        items = doc.advance(inp.text, final=inp.final)
        hold = doc.hold_from() if (self.opts.hold_code_blocks and not inp.final) else None
        return await self._judge(t0, items, hold_from=hold)

    async def scan_text(self, text: str) -> Verdict:
        """Scan a complete answer (or tool-call arguments): every fenced block, one semgrep batch."""
        return await self.check(GuardInput(stage="output", messages=[], text=text))

    async def scan_code(self, code: str, language: str | None = None) -> ScanResult:
        """Scan one snippet in `language` (canonical name or alias; None = detect, else all)."""
        lang = normalize_language(language) if language else None
        src = "info" if lang else "none"
        if lang is None and self.opts.detect_language:
            lang = detect_language(code)
            src = "detected" if lang else "none"
        item = ScanItem((0, len(code)), code, lang, src, "snippet")
        scanner = await self.scanner()
        return (await scanner.scan_items([item]))[0]

    def open_stream(self, messages: list[Message], request_id: str) -> CodeShieldStream:
        return CodeShieldStream(self, messages, request_id)

    # verdicts ----------------------------------------------------------------

    async def _judge(self, t0: float, items: list[ScanItem], hold_from: int | None) -> Verdict:
        if not items:
            return self.verdict(t0, hold_from=hold_from, details={"blocks_scanned": 0})
        scanner = await self.scanner()
        results = await scanner.scan_items(items)
        return self._verdict(t0, items, results, hold_from)

    def _verdict(self, t0: float, items: list[ScanItem], results: list[ScanResult], hold_from: int | None) -> Verdict:
        blocks = []
        flagged: list[tuple[ScanItem, ScanResult]] = []
        for item, res in zip(items, results, strict=True):
            blocks.append(
                {
                    "span": list(item.span),
                    "label": item.label,
                    "language": item.language,
                    "language_source": item.language_source,
                    "scanned_as": res.scanned_as,
                    "findings": [
                        {"rule": f.rule, "cwe": f.cwe, "line": f.line, "severity": f.severity, "analyzer": f.analyzer}
                        for f in res.findings
                    ],
                    "action": res.action,
                    "tier2": res.tier2,  # ran | not_needed | skipped | not_run | off | error
                    **({"tier2_reason": res.tier2_reason} if res.tier2_reason else {}),
                }
            )
            if res.flagged:
                flagged.append((item, res))
        tier2 = _merge_tier2(results)
        details: dict[str, Any] = {"blocks_scanned": len(items), "blocks": blocks, "tier2": tier2}
        errors = [r.tier2_reason for r in results if r.tier2 == "error" and not r.flagged]
        not_run = [r for r in results if r.tier2 == "not_run" and not r.flagged]
        if not_run:
            details["tier2_not_run"] = not_run[0].tier2_reason
        if not flagged:
            error = errors[0] if errors else None
            if error is None and not_run and self.opts.semgrep == "required":
                error = f"semgrep tier not run: {not_run[0].tier2_reason}"
            return self.verdict(
                t0,
                flagged=False,
                score=0.0,
                hold_from=hold_from,
                details=details,
                error=f"code_shield tier 2 failed: {error}" if error else None,
            )
        findings: list[dict[str, Any]] = []
        for item, res in flagged:
            for f in res.findings:
                d = f.to_dict()
                d["span"] = list(item.span)
                d["block"] = item.label
                findings.append(d)
        findings.sort(
            key=lambda d: (
                -ACTION_RANK[d["action"]],
                -SEVERITY_RANK.get(d["severity"], 0),
                d["span"][0],
                d["line"],
            )
        )
        top = findings[0]
        first_item, first_res = min(flagged, key=lambda p: p[0].span[0])
        action = max((r.action for _, r in flagged), key=lambda a: ACTION_RANK[a])
        cwes = sorted({f["cwe"] for f in findings if f["cwe"]})
        if self.opts.severity_actions_set:
            details["action"] = action  # the step asked the severity mapping to decide the action
        details.update(
            recommended_action=action,
            rule=top["rule"],
            cwe=top["cwe"],
            line=top["line"],
            severity=top["severity"],
            language=top["language"],
            analyzer=top["analyzer"],
            findings=findings,
            spans=[list(i.span) for i, _ in flagged],
            recommended_treatment=max(
                (r.recommended_treatment for _, r in flagged),
                key=lambda t: {"ignore": 0, "warn": 1, "block": 2}[t],
            ),
            notice=_notice(first_res),
            annotation=[f"{d['block']}: {d['rule']} {d['cwe']} line {d['line']} ({d['severity']})" for d in findings],
        )
        if errors:
            details["tier2_error"] = errors[0]
        reason = (
            f"insecure code in {first_item.label}: {top['cwe'] or top['rule']} {top['rule']} "
            f"({top['language']} line {top['line']}, {top['severity']})"
        )
        return self.verdict(
            t0,
            flagged=True,
            score=1.0,
            categories=cwes,
            reason=reason,
            span=first_item.span,
            hold_from=hold_from,
            details=details,
        )


def _merge_tier2(results: Sequence[ScanResult]) -> str:
    order = ("error", "not_run", "ran", "skipped", "off", "not_needed")
    states = {r.tier2 for r in results}
    for s in order:
        if s in states:
            return s
    return "not_needed"


def _notice(res: ScanResult) -> str:
    cwes = sorted({f.cwe for f in res.findings if f.cwe}) or ["insecure code"]
    rules = sorted({f.rule for f in res.findings})
    return f"[code removed by Guardgate CodeShield: {', '.join(cwes)} ({', '.join(rules)})]"


class CodeShieldStream(StreamCheck):
    """Per-stream state: a fence tracker fed with each new window."""

    guard: CodeShieldGuard

    def __init__(self, guard: CodeShieldGuard, messages: list[Message], request_id: str) -> None:
        super().__init__(guard, messages, request_id)
        self.doc = Document(guard.opts.detect_language, guard.opts.tool_arguments)
        self.checks = 0

    async def check(self, text: str, window_start: int, final: bool) -> Verdict:
        """Feed `text[fed:]`; scan blocks that closed (and the open one when final).

        `text` is the whole answer so far and must only grow; offsets in the verdict (span,
        hold_from, finding offsets) index into it.
        """
        t0 = time.perf_counter()
        self.checks += 1
        g = self.guard
        items = self.doc.advance(text, final)
        hold = self.doc.hold_from() if (g.opts.hold_code_blocks and not final) else None
        if not items:
            return Verdict(guard=g.name, score=0.0, hold_from=hold, latency_ms=(time.perf_counter() - t0) * 1000.0)
        return await g._judge(t0, items, hold)

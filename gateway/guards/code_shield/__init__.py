"""CodeShield on fenced code blocks, as they stream: Meta's rule set, our driver.

The package, along its seams:

- `rules`: Meta's rules (regex and semgrep) read from the installed `codeshield` package's data
  files and compiled once; semgrep's own prefilter formulas turned into predicates.
- `semgrep`: the semgrep client. Runs the multi-call ``semgrep-core`` binary as ``osemgrep`` through
  a link of that name (never through ``executable=``, which uvloop does not honour for argv[0]): a
  long-lived ``osemgrep lsp`` per event loop (all rules loaded once: milliseconds per batch), or
  one ``osemgrep scan`` per batch (``semgrep_mode: process``, and the fallback when the server
  cannot start). A canary scan at start-up proves the tier finds what it should.
- `scanner`: the two tiers. Tier 1, regex, in-process; tier 2, semgrep, one request per batch of
  blocks, only for blocks where a rule can match and the outcome can change.
- `document`: what to scan in a growing text (fenced blocks, code in tool-call arguments).
- `guard`: the `code_shield` guard, its stream check, verdicts and `status()`.

What the driver does differently from ``CodeShield.scan_code`` (reference/guards.md §3): semgrep
runs without ``--project-root /`` (which makes semgrep >= 1.101 scan nothing); severities are
normalised (Meta's driver compares ``"ERROR"`` with ``"error"`` and never blocks on a semgrep
finding) and mapped to actions by ``severity_actions``; ``nosemgrep`` comments in model output are
neutralised. A block that needed tier 2 and did not get it is never a pass: a semgrep that is
configured but broken (missing binary, crash, timeout) is a guard error (``on_error``), and a
semgrep that is not installed is reported as not run (``semgrep: required`` makes both an error,
and the gateway not ready).
"""

from gateway.guards.code_shield.document import Document
from gateway.guards.code_shield.guard import CodeShieldGuard, CodeShieldStream
from gateway.guards.code_shield.options import ACTIONS, DEFAULT_SEVERITY_ACTIONS, CodeShieldOptions
from gateway.guards.code_shield.rules import AGNOSTIC, SUPPORTED_LANGUAGES, RuleSet, find_rules_dir
from gateway.guards.code_shield.scanner import CodeScanner, Finding, ScanItem, ScanResult
from gateway.guards.code_shield.semgrep import SemgrepError, SemgrepRunner

__all__ = [
    "ACTIONS",
    "AGNOSTIC",
    "DEFAULT_SEVERITY_ACTIONS",
    "SUPPORTED_LANGUAGES",
    "CodeScanner",
    "CodeShieldGuard",
    "CodeShieldOptions",
    "CodeShieldStream",
    "Document",
    "Finding",
    "RuleSet",
    "ScanItem",
    "ScanResult",
    "SemgrepError",
    "SemgrepRunner",
    "find_rules_dir",
]

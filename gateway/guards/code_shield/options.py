"""The `code_shield` step's options, parsed and checked once when the policy loads."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from gateway.guards.base import GuardConfigError
from gateway.guards.code_fences import normalize_language
from gateway.guards.code_shield.rules import SEVERITIES

# What a severity may be mapped to: a step action, or "ignore" (the finding is reported, not acted on).
ACTIONS = ("block", "redact", "warn", "log", "ignore")
# Meta's intent (its driver only reaches "block" for regex errors): error -> block, the rest -> warn.
DEFAULT_SEVERITY_ACTIONS = {"error": "block", "warning": "warn", "advice": "warn", "info": "warn"}
# Languages with semgrep in CodeShield's analyzer map (PHP has rules but Meta does not run them).
DEFAULT_SEMGREP_LANGUAGES = ("c", "cpp", "csharp", "java", "javascript", "python")


def _words(s: str) -> frozenset[str]:
    return frozenset(s.split())


# Option keys the policy layer may pass along with a step; accepted and not ours to validate.
_GENERIC_KEYS = _words(
    "guard action notice on_error timeout timeout_ms timeout_s mode name id description stage stages enabled model"
)


@dataclass(slots=True)
class CodeShieldOptions:
    """Policy-step options of the `code_shield` guard (docs/configuration.md)."""

    hold_code_blocks: bool = True
    severity_actions: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_SEVERITY_ACTIONS))
    severity_actions_set: bool = False  # the step configured severity_actions: details["action"] applies
    usecase: str = "codeshield"
    semgrep: Literal["auto", "required", "off"] = "auto"
    semgrep_timeout_s: float = 4.0  # below the policy step timeout (default 5 s): ours reports first
    semgrep_path: str | None = None
    semgrep_concurrency: int = 2
    semgrep_mode: Literal["server", "process"] = "server"
    semgrep_languages: tuple[str, ...] = DEFAULT_SEMGREP_LANGUAGES
    exhaustive: bool = False  # run tier 2 even when it cannot change the verdict (complete findings)
    detect_language: bool = True
    unknown_language: Literal["all", "agnostic"] = "all"
    tool_arguments: bool = True
    roles: tuple[str, ...] = ("tool",)
    rules_dir: str | None = None
    max_inline_chars: int = 65_536  # larger blocks run the regex tier in a worker thread

    @classmethod
    def parse(cls, options: dict[str, Any]) -> CodeShieldOptions:
        o = cls()
        known = (set(cls.__dataclass_fields__) - {"severity_actions_set"}) | {"semgrep_timeout_ms"}
        unknown = sorted(k for k in options if k not in known and k not in _GENERIC_KEYS)
        if unknown:
            raise GuardConfigError(
                f"code_shield: unknown option(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})"
            )
        for key in ("hold_code_blocks", "exhaustive", "detect_language", "tool_arguments"):
            if key in options:
                v = options[key]
                if not isinstance(v, bool):
                    raise GuardConfigError(f"code_shield: {key} must be true or false, got {v!r}")
                setattr(o, key, v)
        sa = options.get("severity_actions")
        if sa is not None:
            if not isinstance(sa, dict):
                raise GuardConfigError("code_shield: severity_actions must be a mapping severity -> action")
            for sev, act in sa.items():
                sv = str(sev).lower()
                if sv not in SEVERITIES:
                    known_sev = ", ".join(SEVERITIES)
                    raise GuardConfigError(f"code_shield: unknown severity {sev!r} in severity_actions ({known_sev})")
                o.severity_actions[sv] = _check_action(act, f"severity_actions.{sv}")
            o.severity_actions_set = True
        if "usecase" in options:
            o.usecase = str(options["usecase"])
        sg = options.get("semgrep", "auto")
        if sg is True:
            sg = "auto"
        elif sg is False:
            sg = "off"
        if sg not in ("auto", "required", "off"):
            raise GuardConfigError(f"code_shield: semgrep must be auto, required or off, got {sg!r}")
        o.semgrep = sg
        if "semgrep_timeout_s" in options or "semgrep_timeout_ms" in options:
            t = options.get("semgrep_timeout_s")
            t = float(t) if t is not None else float(options["semgrep_timeout_ms"]) / 1000.0
            if not t > 0:
                raise GuardConfigError("code_shield: semgrep_timeout_s must be > 0")
            o.semgrep_timeout_s = t
        if options.get("semgrep_path"):
            o.semgrep_path = str(options["semgrep_path"])
        mode = options.get("semgrep_mode", "server")
        if mode not in ("server", "process"):
            raise GuardConfigError(f"code_shield: semgrep_mode must be server or process, got {mode!r}")
        o.semgrep_mode = mode
        if "semgrep_concurrency" in options:
            o.semgrep_concurrency = max(1, int(options["semgrep_concurrency"]))
        if "semgrep_languages" in options:
            langs = tuple(normalize_language(str(x)) or str(x) for x in options["semgrep_languages"] or ())
            o.semgrep_languages = langs
        ul = options.get("unknown_language", "all")
        if ul not in ("all", "agnostic"):
            raise GuardConfigError(f"code_shield: unknown_language must be all or agnostic, got {ul!r}")
        o.unknown_language = ul
        if "roles" in options:
            o.roles = tuple(str(r) for r in options["roles"] or ())
        if options.get("rules_dir"):
            o.rules_dir = str(options["rules_dir"])
        if "max_inline_chars" in options:
            o.max_inline_chars = int(options["max_inline_chars"])
        return o


def _check_action(v: Any, where: str) -> str:
    s = str(v).lower()
    if s not in ACTIONS:
        raise GuardConfigError(f"code_shield: {where} must be one of {', '.join(ACTIONS)}, got {v!r}")
    return s


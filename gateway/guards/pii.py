"""`pii`: personal data and secrets, found by pattern plus checksum (no model), masked, blocked or logged.

Kinds (each validated beyond its pattern where a check exists, so an order number is not a card):

    email      local@domain.tld
    phone      international (+CC ...) with 8-15 digits, or national with 10-15 digits
    card       payment card: 13-19 digits (spaces/dashes allowed), Luhn check
    iban       2 letters, 2 check digits, up to 30 alphanumerics (spaces every 4 allowed), mod-97 == 1
    us_ssn     US social security number ddd-dd-dddd (the never-issued ranges excluded)
    uk_nino    UK National Insurance number (AB 12 34 56 C; invalid prefixes excluded)
    ca_sin     Canadian social insurance number ddd-ddd-ddd / ddd ddd ddd, Luhn check
    es_dni     Spanish DNI (8 digits + check letter) and NIE (X/Y/Z + 7 digits + letter), letter checked
    ipv4       dotted quad, each octet 0-255
    ipv6       any form `ipaddress` accepts (compressed, full), with at least two colons
    api_key    well-known token shapes: OpenAI/Anthropic `sk-`, GitHub `ghp_`/`gho_`/`ghs_`/`ghu_`/
               `github_pat_`, AWS `AKIA`/`ASIA`, Slack `xox?-`, Google `AIza`, Stripe `sk_live_`/
               `rk_live_`, JWTs, and the token after `Bearer `

Options:
    kinds      per-kind action: `mask`, `block`, `log` or `off`; a list of kinds means `mask` for
               each and `off` for the rest (default: every kind `mask`, `ipv4`/`ipv6` `log`)
    unmask     input stage: put the values back into the answer for the client (default false)
    messages   input stage: roles scanned (default every role)
    tool_arguments  input stage: also scan tool-call arguments in the conversation (default true)
    allow      values never flagged (e.g. the company's support address), compared exactly

Input stage: `mask` replaces each value with a placeholder `<EMAIL_1>`, numbered per kind in order
of first appearance in the conversation, so the same value gets the same placeholder everywhere in
one request, and a conversation that grows turn by turn keeps its earlier numbers (a placeholder
text the client itself sent is never reused). The verdict's action is the strongest of the kinds
found (block > mask (= redact) > log), so a `block` kind refuses the request and `mask` rewrites it.
Output and stream stages: `mask` replaces a value the model writes with `<EMAIL>` (no number: the
answer has no map to restore it from), `block` stops the answer, `log` records. On a stream the last
`HOLD_CHARS` characters of a non-final window are held (a value may still be growing).

The verdict's details say which kinds were found and how many (`kinds`, `count`), never the values;
`Verdict.restore` (not recorded) carries placeholder -> value for `unmask`.
"""

from __future__ import annotations

import ipaddress
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

from gateway.guards import conversation
from gateway.guards.base import (
    GuardInput,
    ImmediateGuard,
    StreamCheck,
    config_error,
    register,
    reject_unknown_options,
)
from gateway.types import ACTION_RANK, Message, TextEdit, Verdict

ROLES = ("system", "developer", "user", "assistant", "tool")
KIND_ACTIONS = ("mask", "block", "log", "off")
HOLD_CHARS = 64  # longer than any value a kind matches except long tokens, which a hold cannot bound anyway
_TO_ACTION = {"mask": "redact", "block": "block", "log": "log"}


def _digits(s: str) -> str:
    return "".join(ch for ch in s if ch.isdigit())


def luhn_ok(number: str) -> bool:
    """The Luhn checksum of a digit string (cards, Canadian SINs)."""
    total = 0
    for i, ch in enumerate(reversed(number)):
        d = int(ch)
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def iban_ok(value: str) -> bool:
    """ISO 13616 mod-97 check (the rearranged number, letters as 10..35, mod 97 == 1)."""
    s = value.replace(" ", "").upper()
    if not 15 <= len(s) <= 34:
        return False
    moved = s[4:] + s[:4]
    try:
        return int("".join(str(int(ch, 36)) for ch in moved)) % 97 == 1
    except ValueError:
        return False


def _card_ok(v: str) -> bool:
    d = _digits(v)
    return 13 <= len(d) <= 19 and luhn_ok(d) and len(set(d)) > 1


def _phone_ok(v: str) -> bool:
    n = len(_digits(v))
    return 8 <= n <= 15 if v.lstrip().startswith("+") else 10 <= n <= 15


def _sin_ok(v: str) -> bool:
    d = _digits(v)
    return len(d) == 9 and d[0] not in "08" and luhn_ok(d)


_DNI_LETTERS = "TRWAGMYFPDXBNJZSQVHLCKE"


def _dni_ok(v: str) -> bool:
    s = v.upper().replace("-", "")
    head = {"X": "0", "Y": "1", "Z": "2"}.get(s[0], s[0]) + s[1:-1]
    return head.isdigit() and _DNI_LETTERS[int(head) % 23] == s[-1]


def _ipv6_ok(v: str) -> bool:
    try:
        ipaddress.IPv6Address(v)
    except ValueError:
        return False
    return v.count(":") >= 2


@dataclass(frozen=True, slots=True)
class Kind:
    name: str
    rx: re.Pattern[str]
    valid: Callable[[str], bool] | None = None


# Order matters: a span claimed by an earlier kind is not reported again by a later one (an IBAN's
# digits are not also a phone number; a card number is not also a phone number).
KINDS: tuple[Kind, ...] = (
    Kind("api_key", re.compile(
        r"(?<![\w-])(sk-(?:ant-|proj-)?[A-Za-z0-9_-]{20,}|(?:sk|rk)_live_[A-Za-z0-9]{16,}|gh[opsu]_[A-Za-z0-9]{30,}"
        r"|github_pat_[A-Za-z0-9_]{30,}|(?:AKIA|ASIA)[0-9A-Z]{16}|xox[abprs]-[A-Za-z0-9-]{10,}"
        r"|AIza[0-9A-Za-z_-]{35}|eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,})(?![\w-])"
        r"|(?i:bearer)\s+([A-Za-z0-9._~+/=-]{20,})")),
    Kind("email", re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"
                             r"(?![\w-])")),
    Kind("iban", re.compile(r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?(?![A-Za-z0-9])"),
         iban_ok),
    # 16-19 digits in groups of four, or Amex-like 4-6-5 / 4-6-4; one separator style per number, so two
    # numbers side by side are not read as one
    Kind("card", re.compile(r"(?<![\d-])(?:\d{4}([ -]?)\d{4}\1\d{4}\1\d{4}(?:\1?\d{1,3})?|\d{4}([ -]?)\d{6}\2\d{4,5})"
                            r"(?![\d-])"), _card_ok),
    Kind("us_ssn", re.compile(r"(?<![\d-])(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?![\d-])")),
    Kind("uk_nino", re.compile(
        r"(?<![A-Za-z0-9])(?!BG|GB|NK|KN|TN|NT|ZZ)[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z] ?\d{2} ?\d{2} ?\d{2} ?[A-D]"
        r"(?![A-Za-z0-9])")),
    Kind("ca_sin", re.compile(r"(?<![\d-])\d{3}[ -]\d{3}[ -]\d{3}(?![\d-])"), _sin_ok),
    Kind("es_dni", re.compile(r"(?<![A-Za-z0-9])(?:\d{8}|[XYZ]\d{7})-?[A-Z](?![A-Za-z0-9])"), _dni_ok),
    Kind("ipv4", re.compile(r"(?<![\d.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
                            r"(?![\d.]|\.\d)")),
    Kind("ipv6", re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])"), _ipv6_ok),
    Kind("phone", re.compile(r"(?<![\w+:./-])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]?\d{2,4}){1,4}"
                             r"(?![\w])"), _phone_ok),
)
KIND_NAMES = tuple(k.name for k in KINDS)
DEFAULT_KINDS = {**{k: "mask" for k in KIND_NAMES}, "ipv4": "log", "ipv6": "log"}


@dataclass(frozen=True, slots=True)
class Found:
    start: int
    end: int
    kind: str
    value: str


_config_error = partial(config_error, "pii")  # (msg, option) -> GuardConfigError


@register("pii")
class PiiGuard(ImmediateGuard):
    """Emails, phone numbers, cards, IBANs, national ids, IPs and API keys: mask, block or log."""

    name: ClassVar[str] = "pii"
    stages: ClassVar[frozenset[str]] = frozenset({"input", "stream", "output"})
    rewrites_input: ClassVar[bool] = True
    OPTIONS: ClassVar[tuple[str, ...]] = ("kinds", "unmask", "messages", "tool_arguments", "allow")

    def __init__(self, **options: Any) -> None:
        reject_unknown_options(self.name, options, self.OPTIONS)
        super().__init__(**options)
        kinds = options.get("kinds")
        if kinds is None:
            self.kinds = dict(DEFAULT_KINDS)
        elif isinstance(kinds, list):
            self.kinds = {k: "off" for k in KIND_NAMES}
            for k in kinds:
                if k not in KIND_NAMES:
                    raise _config_error(f"unknown kind {k!r} (known: {', '.join(KIND_NAMES)})", "kinds")
                self.kinds[k] = "mask"
        elif isinstance(kinds, dict):
            self.kinds = dict(DEFAULT_KINDS)
            for k, a in kinds.items():
                if k not in KIND_NAMES:
                    raise _config_error(f"unknown kind {k!r} (known: {', '.join(KIND_NAMES)})", "kinds")
                if a not in KIND_ACTIONS:
                    raise _config_error(f"kinds.{k} must be one of {', '.join(KIND_ACTIONS)}, got {a!r}", "kinds")
                self.kinds[k] = a
        else:
            raise _config_error("kinds must be a list of kinds or a mapping kind: mask|block|log|off", "kinds")
        self.unmask = options.get("unmask", False)
        if not isinstance(self.unmask, bool):
            raise _config_error("unmask must be true or false", "unmask")
        self.tool_arguments = options.get("tool_arguments", True)
        if not isinstance(self.tool_arguments, bool):
            raise _config_error("tool_arguments must be true or false", "tool_arguments")
        roles = options.get("messages", list(ROLES))
        if not isinstance(roles, list) or any(r not in ROLES for r in roles):
            raise _config_error(f"messages must be a list of roles ({', '.join(ROLES)})", "messages")
        self.roles = frozenset(roles)
        allow = options.get("allow", [])
        if not isinstance(allow, list) or not all(isinstance(a, str) for a in allow):
            raise _config_error("allow must be a list of strings", "allow")
        self.allow = frozenset(allow)
        self.active = tuple(k for k in KINDS if self.kinds[k.name] != "off")

    # ------------------------------------------------------------------ finding

    def find(self, text: str, pos: int = 0) -> list[Found]:
        """Every value of an active kind in `text` from `pos` on, in text order, spans not overlapping."""
        found: list[Found] = []
        for kind in self.active:
            for m in kind.rx.finditer(text, pos):
                g = (1 if m.group(1) is not None else 2) if kind.name == "api_key" else 0
                a, b = m.span(g)
                value = text[a:b]
                if kind.name == "phone":  # a run of numbers: the longest leading groups that form one alone
                    while (not _phone_ok(value) or any(a < f.end and f.start < b for f in found)) \
                            and re.search(r"[ .-]\d+$", value):
                        value = re.sub(r"[ .-]\d+$", "", value)
                        b = a + len(value)
                if value in self.allow or (kind.valid is not None and not kind.valid(value)):
                    continue
                if any(a < f.end and f.start < b for f in found):
                    continue
                found.append(Found(a, b, kind.name, value))
        found.sort(key=lambda f: f.start)
        return found

    def _action(self, kinds: dict[str, int]) -> str:
        """The strongest verdict action over the kinds found (block > redact > log)."""
        best = "log"
        for k in kinds:
            a = _TO_ACTION.get(self.kinds[k], "log")
            if ACTION_RANK[a] > ACTION_RANK[best]:
                best = a
        return best

    # ------------------------------------------------------------------ checks

    def check_now(self, inp: GuardInput) -> Verdict:
        t0 = time.perf_counter()
        if inp.stage == "input":
            return self._check_input(t0, inp.messages)
        return self._check_text(t0, inp.text, self.find(inp.text))

    def _check_input(self, t0: float, messages: list[Message]) -> Verdict:
        texts = conversation.texts(messages, self.roles, self.tool_arguments)
        hits: list[tuple[Any, Found]] = [((mi, pi), f) for mi, pi, text in texts for f in self.find(text)]
        # Values the model reads across texts (a number split over two turns, one in a `name`).
        seen: set[tuple[str, str, int, int | None, int]] = set()
        for run in conversation.runs(messages, self.roles, self.tool_arguments):
            for f in self.find(run.text):
                first = next(p for p in run.pieces if p.end > f.start)
                at = (f.kind, f.value, first.message, first.part, f.start - first.start)
                if run.crosses(f.start, f.end) and at not in seen:
                    seen.add(at)
                    hits.append((run, f))
        if not hits:
            return self.verdict(t0, flagged=False, score=0.0)
        counts: dict[str, int] = {}
        for _, f in hits:
            counts[f.kind] = counts.get(f.kind, 0) + 1
        action = self._action(counts)
        # Placeholders: per kind, numbered by first appearance; never one the conversation already contains.
        taken = {m.group(0) for _, _, text in texts for m in re.finditer(r"<[A-Z0-9_]+_\d+>", text)}
        names: dict[tuple[str, str], str] = {}
        next_n: dict[str, int] = {}
        edits: list[TextEdit] = []
        unrewritable = False
        for where, f in hits:
            if self.kinds[f.kind] != "mask":
                continue
            key = (f.kind, f.value)
            if key not in names:
                n = next_n.get(f.kind, 0)
                while True:
                    n += 1
                    ph = f"<{f.kind.upper()}_{n}>"
                    if ph not in taken:
                        break
                next_n[f.kind] = n
                names[key] = ph
            if isinstance(where, conversation.Run):
                run_edits = where.edits(f.start, f.end, names[key])
                unrewritable |= run_edits is None
                edits += run_edits or []
            else:
                edits.append(TextEdit(where[0], where[1], f.start, f.end, names[key]))
        if unrewritable:
            edits = []  # a value in a `name` cannot be masked: nothing to rewrite, so the step blocks
        restore = {ph: value for (_, value), ph in names.items()} if self.unmask else {}
        return self.verdict(
            t0, flagged=True, score=1.0, categories=sorted(counts), edits=edits, restore=restore,
            reason=f"{len(hits)} value(s): " + ", ".join(f"{k} x{n}" for k, n in sorted(counts.items())),
            details={"action": action, "kinds": dict(sorted(counts.items())), "count": len(hits),
                     "masked": len(edits), "distinct_masked": len(names)},
        )

    def _check_text(self, t0: float, text: str, found: list[Found], hold_from: int | None = None) -> Verdict:
        if not found:
            return self.verdict(t0, flagged=False, score=0.0, hold_from=hold_from)
        counts: dict[str, int] = {}
        for f in found:
            counts[f.kind] = counts.get(f.kind, 0) + 1
        action = self._action(counts)
        spans = [[f.start, f.end] for f in found if self.kinds[f.kind] == "mask" or action != "redact"]
        reps = [f"<{f.kind.upper()}>" for f in found if self.kinds[f.kind] == "mask" or action != "redact"]
        return self.verdict(
            t0, flagged=True, score=1.0, categories=sorted(counts), span=(found[0].start, found[0].end),
            hold_from=hold_from,
            reason=f"{len(found)} value(s): " + ", ".join(f"{k} x{n}" for k, n in sorted(counts.items())),
            details={"action": action, "kinds": dict(sorted(counts.items())), "count": len(found),
                     "spans": spans, "replacements": reps},
        )

    def open_stream(self, messages: list[Message], request_id: str) -> StreamCheck:
        return _PiiStream(self, messages, request_id)


class _PiiStream(StreamCheck):
    """Scans from where the last check could not decide; a value still within the last `HOLD_CHARS`
    characters of a non-final window is not reported yet but held (it may grow: more digits)."""

    guard: PiiGuard

    def __init__(self, guard: PiiGuard, messages: list[Message], request_id: str) -> None:
        super().__init__(guard, messages, request_id)
        self._resume = 0

    def check_now(self, text: str, window_start: int, final: bool) -> Verdict:
        t0 = time.perf_counter()
        found = self.guard.find(text, self._resume)
        if final:
            self._resume = len(text)
            return self.guard._check_text(t0, text, found)
        cut = max(self._resume, len(text) - HOLD_CHARS)
        ready = [f for f in found if f.end < cut]
        later = [f.start for f in found if f.end >= cut]
        self._resume = min([cut, *later])
        return self.guard._check_text(t0, text, ready, hold_from=self._resume)

"""`hidden_unicode`: invisible characters used to smuggle instructions past a human reader.

A model reads characters a person never sees: Unicode tag characters (U+E0000–E007F mirror ASCII
and render as nothing, so "ignore previous instructions" can ride inside an innocent prompt),
bidirectional overrides that make text read differently from how it is stored, and zero-width or
other invisible format characters that hide text or encode bits. No model is needed to find them.

Character classes (`classes:`; the first five are on by default):

    tags                 U+E0000–E007F. Allowed: an emoji tag sequence (U+1F3F4 black flag, 1–6 tag
                         digits or lowercase letters, U+E007F cancel tag: the subdivision flags).
    bidi                 U+202A–202E (LRE RLE PDF LRO RLO), U+2066–2069 (LRI RLI FSI PDI).
    zero_width           U+200B ZWSP, U+200C ZWNJ, U+200D ZWJ, U+2060 word joiner, U+FEFF (allowed
                         as a byte-order mark at the very start). Allowed in context: a ZWJ (or
                         U+FE0F + ZWJ) joining two emoji; one ZWJ, ZWNJ or ZWSP after a letter of a
                         script that uses them (Arabic and Persian, Syriac, Thaana, N'Ko, the Indic
                         scripts, Sinhala, Thai, Lao, Tibetan, Myanmar, Khmer, Mongolian).
    invisible            U+2061–2064 (invisible math operators), U+180E (allowed after Mongolian),
                         U+206A–206F (deprecated format controls), U+FFF9–FFFB (annotation anchors),
                         U+1D173–1D17A (musical format controls), U+3164 and U+FFA0 (Hangul fillers).
    variation_selectors  U+FE00–FE0F, U+E0100–E01EF. Allowed: one selector right after a visible
                         character (emoji presentation, CJK ideographic variants). Runs of selectors
                         carry arbitrary bytes and are flagged.
    bidi_marks (off)     U+200E LRM, U+200F RLM, U+061C ALM: ordinary in Arabic and Hebrew text.
    soft (off)           U+00AD soft hyphen, U+034F combining grapheme joiner.
    private_use (off)    U+E000–F8FF, U+F0000–FFFFD, U+100000–10FFFD.

Options:
    classes         classes flagged (default: tags, bidi, zero_width, invisible, variation_selectors)
    allow           characters never flagged: "U+200B", "U+2060-U+2064" or the character itself
    extra           further characters flagged (class "extra"), same forms
    messages        input stage: roles whose messages are scanned (default: every role)
    tool_arguments  input stage: scan tool-call names and arguments, JSON `\\u` escapes decoded
                    (default true)

Contiguous flagged characters form one span; on the stream, `action: redact` with `notice: ""`
strips them and `action: block` stops the answer. A character whose verdict depends on what
follows (a ZWJ at the end of a window, a flag's tag sequence still open) is held, not passed.
Streamed text is scanned as characters: JSON `\\u` escapes inside streamed tool-call arguments are
not decoded (the input stage decodes them when the conversation comes back).
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

from gateway.guards.base import (
    GuardConfigError,
    GuardInput,
    ImmediateGuard,
    ResumingStream,
    StreamCheck,
    register,
)
from gateway.types import Message, Verdict

ROLES = ("system", "developer", "user", "assistant", "tool")
Range = tuple[int, int]  # inclusive

CLASSES: dict[str, tuple[Range, ...]] = {
    "tags": ((0xE0000, 0xE007F),),
    "bidi": ((0x202A, 0x202E), (0x2066, 0x2069)),
    "zero_width": ((0x200B, 0x200D), (0x2060, 0x2060), (0xFEFF, 0xFEFF)),
    "invisible": ((0x2061, 0x2064), (0x180E, 0x180E), (0x206A, 0x206F), (0xFFF9, 0xFFFB),
                  (0x1D173, 0x1D17A), (0x3164, 0x3164), (0xFFA0, 0xFFA0)),
    "variation_selectors": ((0xFE00, 0xFE0F), (0xE0100, 0xE01EF)),
    "bidi_marks": ((0x200E, 0x200F), (0x061C, 0x061C)),
    "soft": ((0x00AD, 0x00AD), (0x034F, 0x034F)),
    "private_use": ((0xE000, 0xF8FF), (0xF0000, 0xFFFFD), (0x100000, 0x10FFFD)),
}
DEFAULT_CLASSES = ("tags", "bidi", "zero_width", "invisible", "variation_selectors")

ZWSP, ZWNJ, ZWJ, BOM, MVS, VS16 = 0x200B, 0x200C, 0x200D, 0xFEFF, 0x180E, 0xFE0F
BLACK_FLAG, CANCEL_TAG = 0x1F3F4, 0xE007F

# Scripts whose orthography uses ZWJ / ZWNJ (and, for Thai, Lao, Khmer, Myanmar, ZWSP as a word break).
_JOINING_SCRIPTS: tuple[Range, ...] = (
    (0x0600, 0x08FF),  # Arabic, Syriac, Arabic Supplement, Thaana, N'Ko, Samaritan, Mandaic, Arabic Ext.
    (0x0900, 0x0DFF),  # Devanagari .. Sinhala
    (0x0E00, 0x0FFF),  # Thai, Lao, Tibetan
    (0x1000, 0x109F),  # Myanmar
    (0x1780, 0x18AF),  # Khmer, Mongolian
    (0x19E0, 0x19FF),  # Khmer symbols
    (0xA8E0, 0xA8FF),  # Devanagari Extended
    (0xAA60, 0xAA7F),  # Myanmar Extended-A
    (0xFB50, 0xFDFF),  # Arabic Presentation Forms-A
    (0xFE70, 0xFEFE),  # Arabic Presentation Forms-B
)
_MONGOLIAN: tuple[Range, ...] = ((0x1800, 0x18AF),)
# Extended_Pictographic, roughly, plus what may sit between an emoji and its ZWJ (skin tones, VS16).
_EMOJI: tuple[Range, ...] = (
    (0x00A9, 0x00A9), (0x00AE, 0x00AE), (0x203C, 0x203C), (0x2049, 0x2049), (0x2122, 0x2122),
    (0x2139, 0x2139), (0x2194, 0x21FF), (0x231A, 0x23FF), (0x24C2, 0x24C2), (0x25AA, 0x25FE),
    (0x2600, 0x27BF), (0x2934, 0x2935), (0x2B05, 0x2B55), (0x3030, 0x3030), (0x303D, 0x303D),
    (0x3297, 0x3297), (0x3299, 0x3299), (0xFE0F, 0xFE0F), (0x1F000, 0x1FAFF),
)
_FLAG_TAGS: tuple[Range, ...] = ((0xE0030, 0xE0039), (0xE0061, 0xE007A))


def _in(cp: int, ranges: Iterable[Range]) -> bool:
    return any(a <= cp <= b for a, b in ranges)


def _config_error(msg: str, option: str) -> GuardConfigError:
    e = GuardConfigError(f"hidden_unicode: {msg}")
    e.option = option  # type: ignore[attr-defined]  # lets the policy loader point at the right line
    return e


def _parse_chars(items: Any, option: str) -> list[Range]:
    """`["U+200B", "U+2060-U+2064", "\u00ad"]` → inclusive ranges."""
    if not isinstance(items, list):
        raise _config_error(f"{option} must be a list of characters or U+XXXX[-U+YYYY] ranges", option)
    out: list[Range] = []
    for item in items:
        s = str(item).strip()
        m = re.fullmatch(r"[Uu]\+([0-9A-Fa-f]{4,6})(?:\s*-\s*[Uu]\+([0-9A-Fa-f]{4,6}))?", s)
        if m:
            a = int(m.group(1), 16)
            b = int(m.group(2), 16) if m.group(2) else a
        elif len(str(item)) == 1:
            a = b = ord(str(item))
        else:
            raise _config_error(f"{option}: {item!r} is not a character or U+XXXX[-U+YYYY]", option)
        if not (0 <= a <= b <= 0x10FFFF):
            raise _config_error(f"{option}: {item!r} is not a valid code point range", option)
        out.append((a, b))
    return out


def _char_class(ranges: Iterable[Range]) -> str:
    return "".join(f"{re.escape(chr(a))}-{re.escape(chr(b))}" if a != b else re.escape(chr(a))
                   for a, b in ranges)


@dataclass(slots=True)
class Finding:
    start: int
    end: int
    classes: Counter[str]
    codepoints: list[int]


@dataclass(slots=True)
class Scan:
    findings: list[Finding]
    pending: int | None  # start of a run whose verdict depends on text not seen yet


@register("hidden_unicode")
class HiddenUnicodeGuard(ImmediateGuard):
    """Flags invisible characters that change what a model reads but not what a person sees."""

    name: ClassVar[str] = "hidden_unicode"
    stages: ClassVar[frozenset[str]] = frozenset({"input", "stream", "output"})
    OPTIONS: ClassVar[tuple[str, ...]] = ("classes", "allow", "extra", "messages", "tool_arguments")

    def __init__(self, classes: list[str] | None = None, allow: list[Any] | None = None,
                 extra: list[Any] | None = None, messages: list[str] | None = None,
                 tool_arguments: bool = True, **options: Any) -> None:
        if options:
            raise _config_error(f"unknown option(s) {', '.join(sorted(options))} (known: "
                                f"{', '.join(self.OPTIONS)})", next(iter(sorted(options))))
        super().__init__(classes=classes, allow=allow, extra=extra, messages=messages,
                         tool_arguments=tool_arguments)
        names = list(DEFAULT_CLASSES) if classes is None else classes
        if not isinstance(names, list) or any(c not in CLASSES for c in names):
            raise _config_error(f"classes must be a list of: {', '.join(CLASSES)}", "classes")
        self.classes = tuple(dict.fromkeys(names))
        self.extra = _parse_chars(extra or [], "extra")
        self.allow = _parse_chars(allow or [], "allow")
        roles = list(ROLES) if messages is None else messages
        if not isinstance(roles, list) or any(r not in ROLES for r in roles):
            raise _config_error(f"messages must be a list of roles ({', '.join(ROLES)})", "messages")
        self.roles = frozenset(roles)
        if not isinstance(tool_arguments, bool):
            raise _config_error("tool_arguments must be true or false", "tool_arguments")
        self.tool_arguments = tool_arguments
        flagged = [r for c in self.classes for r in CLASSES[c]] + self.extra
        if not flagged:
            self._rx: re.Pattern[str] | None = None
        else:
            allow_rx = f"(?![{_char_class(self.allow)}])" if self.allow else ""
            self._rx = re.compile(f"(?:{allow_rx}[{_char_class(flagged)}])+")

    # ------------------------------------------------------------------ classification

    def class_of(self, cp: int) -> str:
        for c in self.classes:
            if _in(cp, CLASSES[c]):
                return c
        return "extra"

    def _benign(self, text: str, a: int, b: int, final: bool) -> bool | None:
        """Is the run text[a:b] an allowed use? None: it depends on text not seen yet."""
        run = [ord(ch) for ch in text[a:b]]
        prev = ord(text[a - 1]) if a > 0 else None
        at_end = b == len(text)
        nxt = ord(text[b]) if not at_end else None
        undecided = at_end and not final
        # an emoji tag sequence: 🏴 + 1..6 tag digits / lowercase letters + cancel tag
        if prev == BLACK_FLAG and _in(run[0], CLASSES["tags"]):
            if not all(_in(c, _FLAG_TAGS) for c in run[:-1]):
                return False
            body = run[:-1] if run[-1] == CANCEL_TAG else run
            if run[-1] == CANCEL_TAG and 1 <= len(body) <= 6:
                return True
            if run[-1] != CANCEL_TAG and _in(run[-1], _FLAG_TAGS) and len(body) < 6 and undecided:
                return None
            return False
        if run == [BOM] and a == 0:
            return True
        one_sel = len(run) == 1 and _in(run[0], CLASSES["variation_selectors"])
        if one_sel and prev is not None and not chr(prev).isspace():
            return None if undecided else True  # a second selector could follow
        joiner = run in ([ZWJ], [VS16, ZWJ])
        if joiner and prev is not None and _in(prev, _EMOJI):
            if undecided:
                return None
            if nxt is not None and _in(nxt, _EMOJI):
                return True
        if len(run) == 1 and run[0] in (ZWJ, ZWNJ, ZWSP) and prev is not None and _in(prev, _JOINING_SCRIPTS):
            return None if undecided else True
        if run == [MVS] and prev is not None and _in(prev, _MONGOLIAN):
            return None if undecided else True
        return False

    # ------------------------------------------------------------------ scanning

    def scan(self, text: str, pos: int = 0, final: bool = True) -> Scan:
        """Flagged runs starting at or after `pos` (the text before it is context)."""
        found: list[Finding] = []
        pending: int | None = None
        if self._rx is None:
            return Scan(found, None)
        for m in self._rx.finditer(text, pos):
            a, b = m.span()
            benign = self._benign(text, a, b, final)
            if benign is None:
                pending = a
                break
            if benign:
                continue
            cps = [ord(ch) for ch in text[a:b]]
            found.append(Finding(a, b, Counter(self.class_of(c) for c in cps), cps))
        return Scan(found, pending)

    def _verdict(self, t0: float, findings: list[Finding], where: str = "",
                 hold_from: int | None = None, spans: bool = True) -> Verdict:
        if not findings:
            return self.verdict(t0, flagged=False, score=0.0, hold_from=hold_from)
        classes: Counter[str] = Counter()
        cps: list[str] = []
        for f in findings:
            classes.update(f.classes)
            for c in f.codepoints:
                u = f"U+{c:04X}"
                if u not in cps and len(cps) < 16:
                    cps.append(u)
        summary = ", ".join(f"{n} {c}" for c, n in classes.most_common())
        details: dict[str, Any] = {"classes": dict(classes), "codepoints": cps,
                                   "chars": sum(classes.values())}
        if spans:
            details["spans"] = [[f.start, f.end] for f in findings]
        return self.verdict(
            t0, flagged=True, score=1.0, categories=list(classes),
            span=(findings[0].start, findings[0].end) if spans else None, hold_from=hold_from,
            reason=f"hidden Unicode{where}: {summary}", details=details,
        )

    def check_now(self, inp: GuardInput) -> Verdict:
        t0 = time.perf_counter()
        if inp.stage != "input":
            return self._verdict(t0, self.scan(inp.text).findings)
        findings: list[Finding] = []
        where: list[str] = []
        for i, msg in enumerate(inp.messages):
            if msg.role not in self.roles:
                continue
            hits = [f for text in self._message_texts(msg) for f in self.scan(text).findings]
            if hits:
                findings += hits
                where.append(f"{msg.role} message {i}")
        v = self._verdict(t0, findings, f" in {', '.join(where)}" if where else "", spans=False)
        if where:
            v.details["messages"] = where
        return v

    def _message_texts(self, msg: Message) -> Iterator[str]:
        yield msg.text
        if msg.name:
            yield msg.name
        if not self.tool_arguments:
            return
        for tc in msg.tool_calls:
            yield tc.name
            yield tc.arguments
            try:
                parsed = json.loads(tc.arguments)
            except ValueError:
                continue
            yield from _json_strings(parsed)  # `\u` escapes decoded

    def scan_from(self, t0: float, text: str, pos: int, final: bool) -> tuple[Verdict, int | None]:
        """A stream check from `pos` (`ResumingStream`): the verdict and where an undecided run starts."""
        s = self.scan(text, pos, final)
        return self._verdict(t0, s.findings, hold_from=None if final else s.pending), s.pending

    def open_stream(self, messages: list[Message], request_id: str) -> StreamCheck:
        return ResumingStream(self, messages, request_id)


def _json_strings(v: Any) -> Iterator[str]:
    if isinstance(v, str):
        yield v
    elif isinstance(v, dict):
        for k, x in v.items():
            yield str(k)
            yield from _json_strings(x)
    elif isinstance(v, list):
        for x in v:
            yield from _json_strings(x)

"""What to scan in a growing text: fenced code blocks, and code in tool-call arguments (JSON strings).

`Document` is fed the answer as it streams; each `advance` returns the pieces of code that became
complete (a closed fence, a finished JSON string value), as `ScanItem`s located in the whole text,
and `hold_from` says where the gate must hold text back until the open piece has been scanned.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from gateway.guards.code_fences import FenceTracker, detect_language, normalize_language
from gateway.guards.code_shield.rules import SUPPORTED_LANGUAGES
from gateway.guards.code_shield.scanner import ScanItem


def _words(s: str) -> frozenset[str]:
    return frozenset(s.split())


# JSON keys whose string values are code (tool-call arguments of code-running / file-editing tools).
_CODE_KEYS = _words(
    "code source source_code sourcecode script program snippet patch diff function body query sql "
    "python javascript js command cmd shell bash commands file_content file_contents new_content "
    "new_str old_str contents text_to_insert replacement"
)
_SHELL_KEYS = frozenset({"command", "cmd", "shell", "bash", "commands"})


_JSON_START = re.compile(r"\s*(?:\{\s*[\"}]|\[\s*[{\"\]\d-])")


class _JsonStrings:
    """Incrementally finds complete string tokens in streamed JSON text, with their keys."""

    def __init__(self) -> None:
        self.pos = 0
        self.last_key: str | None = None
        self.open_at: int | None = None  # offset of an incomplete string token

    def advance(self, text: str, final: bool) -> list[tuple[int, int, str, str | None]]:
        """Return [(start, end, decoded value, key)] for string values completed so far."""
        out: list[tuple[int, int, str, str | None]] = []
        n = len(text)
        i = self.pos
        self.open_at = None
        while True:
            q = text.find('"', i)
            if q < 0:
                self.pos = n
                return out
            j = q + 1
            while True:
                k = text.find('"', j)
                if k < 0:
                    self.open_at = q
                    self.pos = q
                    return out
                b = k - 1
                while b > q and text[b] == "\\":
                    b -= 1
                if (k - 1 - b) % 2 == 0:
                    break  # an even run of backslashes: the quote is real
                j = k + 1
            end = k + 1
            m = end
            while m < n and text[m] in " \t\r\n":
                m += 1
            if m >= n and not final:
                self.open_at = q  # cannot tell key from value yet
                self.pos = q
                return out
            try:
                value = json.loads(text[q:end])
            except ValueError:
                value = None
            if m < n and text[m] == ":":
                self.last_key = value if isinstance(value, str) else None
            elif isinstance(value, str):
                out.append((q, end, value, self.last_key))
            i = end


def _tool_language(tool: str | None) -> str | None:
    """A language hint from a tool's name (run_python, execute_javascript, bash, ...)."""
    t = (tool or "").lower()
    for word, lang in (("python", "python"), ("javascript", "javascript"), ("node", "javascript"),
                       ("typescript", "typescript"), ("php", "php"), ("java", "java"), ("bash", "shell"),
                       ("shell", "shell"), ("terminal", "shell")):  # fmt: skip
        if word in t:
            return lang
    return None


def _json_items(
    value: str, key: str | None, span: tuple[int, int], detect: bool, tool: str | None = None
) -> list[ScanItem]:
    """Code to scan inside one JSON string value (tool-call arguments, JSON answers)."""
    k = (key or "").lower()
    where = f"{'tool call ' + repr(tool) + ' ' if tool else ''}argument {key!r}"
    if "```" in value or "~~~" in value:
        tracker = FenceTracker(detect=detect)
        tracker.feed(value)
        tracker.finish()
        if tracker.blocks:
            return [
                ScanItem(span, b.code, b.language, b.language_source, f"fenced code in {where}") for b in tracker.blocks
            ]
    named = normalize_language(k) if k else None
    if named in SUPPORTED_LANGUAGES or named == "typescript":
        return [ScanItem(span, value, named, "key", where)]
    hint = _tool_language(tool) if k in _CODE_KEYS else None
    if hint and hint != "shell":
        return [ScanItem(span, value, hint, "tool", where)]
    guess = detect_language(value) if detect and ("\n" in value or len(value) > 40) else None
    if guess:
        return [ScanItem(span, value, guess, "detected", where)]
    if k in _CODE_KEYS:
        lang = "shell" if (k in _SHELL_KEYS or hint == "shell") else None
        return [ScanItem(span, value, lang, "key" if lang else "none", where)]
    return []


# The separator the stream gate puts before each tool call's arguments in the guarded text.
_TOOL_HEADER = re.compile(r"\[tool_call(?: ([^\]\n]*))?\] ?")


@dataclass(slots=True)
class _JsonSegment:
    base: int  # offset of the segment in the whole text
    tool: str | None
    scanner: _JsonStrings = field(default_factory=lambda: _JsonStrings())
    end: int | None = None  # set when the next tool call starts
    done: bool = False


class Document:
    """Everything scannable in one growing text: fenced blocks, plus JSON string values of
    tool-call arguments (after the gate's ``[tool_call name]`` separators, or a text that is JSON)."""

    def __init__(self, detect: bool, tool_arguments: bool) -> None:
        self.tracker = FenceTracker(detect=detect)
        self.detect = detect
        self.tool_arguments = tool_arguments
        self.segments: list[_JsonSegment] = []
        self._decided = not tool_arguments  # whether the text as a whole is JSON is settled
        self._hdr_pos = 0

    def advance(self, text: str, final: bool) -> list[ScanItem]:
        items: list[ScanItem] = []
        fed = self.tracker.fed
        if len(text) > fed:
            items += [ScanItem.from_block(b) for b in self.tracker.feed(text[fed:])]
        if final:
            items += [ScanItem.from_block(b) for b in self.tracker.finish()]
        if not self.tool_arguments:
            return items
        if not self._decided:
            stripped = text.lstrip()
            if stripped:
                if stripped[0] not in "{[":
                    self._decided = True
                elif _JSON_START.match(text):
                    self.segments.append(_JsonSegment(0, None))
                    self._decided = True
                elif final or stripped[1:].strip():
                    self._decided = True  # "[link](...)" and friends: not JSON
        at = text.find("[tool_call", self._hdr_pos)
        if at >= 0:
            for m in _TOOL_HEADER.finditer(text, at):
                if self.segments and self.segments[-1].end is None:
                    self.segments[-1].end = m.start()
                self.segments.append(_JsonSegment(m.end(), m.group(1)))
                self._hdr_pos = m.end()
        self._hdr_pos = max(self._hdr_pos, len(text) - 200)  # a header may still be arriving
        for seg in self.segments:
            if seg.done:
                continue
            end = len(text) if seg.end is None else seg.end
            seg_final = final or seg.end is not None
            for a, b, value, key in seg.scanner.advance(text[seg.base : end], seg_final):
                items += _json_items(value, key, (seg.base + a, seg.base + b), self.detect, seg.tool)
            seg.done = seg_final
        return items

    def hold_from(self) -> int | None:
        held = [self.tracker.pending_fence_start()]
        held += [s.base + s.scanner.open_at for s in self.segments if not s.done and s.scanner.open_at is not None]
        cands = [h for h in held if h is not None]
        return min(cands) if cands else None


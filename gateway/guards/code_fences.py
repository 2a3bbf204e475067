"""A streaming Markdown code-fence tracker (CommonMark fenced code blocks).

Feed the answer text as it arrives, in chunks cut anywhere; the tracker reports each fenced code
block with character offsets into the whole text, its info string, its language and its content
(container indentation removed, as a renderer would show it). Only complete lines are interpreted;
the last, partial line waits for its newline (or `finish()`), so the result never depends on where
chunks were cut.

CommonMark rules implemented (spec 0.31, "Fenced code blocks", with the containers that matter in
model output):
- an opening fence is >= 3 backticks or tildes indented 0-3 columns relative to its container;
  a backtick fence's info string must not contain a backtick (```` ```x``` ```` is inline code);
- the closing fence uses the same character, is at least as long, is indented 0-3 columns and has
  nothing but spaces/tabs after it; anything else inside the block (shorter fences, the other fence
  character, ```` ```lang ````) is content, which is what makes nested fences work;
- a fence indented 4+ columns (outside a list item) is an indented code block, not a fence;
- list items (``-``, ``*``, ``+``, ``1.``, ``1)``) and block quotes (``>``) are containers: a fence
  inside them is measured from the item's content column, and the block ends when its container
  does (a line indented less than the item's content, or a line without the quote marker);
- a block still open at end of input runs to the end (`finish()`);
- content lines lose up to the opening fence's indentation (plus the container's).

Lazy continuation lines of paragraphs keep their containers open, and list items that cannot
interrupt a paragraph ("2) x", empty items) are text, as in the spec. Known simplifications: HTML
blocks and link reference definitions are not modelled (a fence inside an HTML block is still a
fence), and block quotes are recognised only at the start of a line (not nested inside list items).
The tests check the tracker against markdown-it-py (a CommonMark implementation) on random documents.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "CodeBlock",
    "FenceTracker",
    "detect_language",
    "extract_code_blocks",
    "normalize_language",
]

Termination = Literal["fence", "container", "eof"]

_FENCE_OPEN = re.compile(r"(`{3,}|~{3,})([^\r\n]*)")
_LIST_MARKER = re.compile(r"(?:[-+*]|[0-9]{1,9}[.)])(?=[ \t]|$)")
_ATX_HEADING = re.compile(r"#{1,6}(?:[ \t]|$)")
_THEMATIC_BREAK = re.compile(r"[ ]{0,3}(?:(?:-[ \t]*){3,}|(?:\*[ \t]*){3,}|(?:_[ \t]*){3,})$")


@dataclass(slots=True)
class CodeBlock:
    """One fenced code block. Offsets are indices into the whole text fed so far."""

    index: int  # 0-based order of appearance
    start: int  # offset of the first fence character of the opening fence
    line_start: int  # offset of the opening fence's line (container prefixes included)
    fence: str  # the opening fence run, e.g. "```" or "~~~~"
    info: str  # the info string, stripped ("python title=x.py")
    info_language: str | None  # normalized language named by the info string, if any
    code_start: int  # offset where the first content line starts (== end of the opener line + 1)
    end: int | None = None  # offset just after the closing fence (or last content), None while open
    terminated: Termination | None = None
    language: str | None = None  # info language, else the detector's guess (set when closed)
    language_source: Literal["info", "detected", "none"] = "none"
    lines: list[str] = field(default_factory=list)  # content lines, container indentation removed
    line_offsets: list[int] = field(default_factory=list)  # offset of each content line's content
    # internal fence geometry
    _char: str = "`"
    _len: int = 3
    _base: int = 0  # container content column
    _rel: int = 0  # opening fence indentation relative to the container
    _qdepth: int = 0  # block-quote depth of the opening fence

    @property
    def closed(self) -> bool:
        return self.end is not None

    @property
    def code(self) -> str:
        """The block's content as a renderer shows it (each line ends with a newline)."""
        return "".join(line + "\n" for line in self.lines)

    @property
    def span(self) -> tuple[int, int]:
        """(start, end) of the whole block, fences included; end is provisional while open."""
        return (self.start, self.end if self.end is not None else self._provisional_end())

    def _provisional_end(self) -> int:
        if self.lines:
            return self.line_offsets[-1] + len(self.lines[-1])
        return self.code_start

    def offset_of_line(self, line: int) -> int | None:
        """Offset in the whole text of content line `line` (1-based), or None."""
        if 1 <= line <= len(self.line_offsets):
            return self.line_offsets[line - 1]
        return None

    def to_dict(self) -> dict[str, object]:
        return {
            "index": self.index,
            "span": list(self.span),
            "info": self.info,
            "language": self.language,
            "language_source": self.language_source,
            "terminated": self.terminated,
            "lines": len(self.lines),
        }


class FenceTracker:
    """Incremental fenced-code-block finder. Not thread-safe; one per stream."""

    def __init__(self, detect: bool = True) -> None:
        self.detect = detect
        self.blocks: list[CodeBlock] = []
        self._open: CodeBlock | None = None
        self._parts: list[str] = []  # pieces of the current, incomplete line
        self._line_start = 0  # offset of the current (incomplete) line
        self._fed = 0
        self._list_cols: list[int] = []  # content columns of the open list items
        self._list_qdepth = 0
        self._prev_line_end = 0  # offset just after the previous complete line's content
        self._next_line_start = 0  # offset of the line after the one being interpreted
        self._finished = False
        self._para = False  # the last interpreted line continues an open paragraph

    # ------------------------------------------------------------------ public API

    @property
    def fed(self) -> int:
        """How many characters have been fed."""
        return self._fed

    @property
    def open_block(self) -> CodeBlock | None:
        """The block currently open (its closing fence not seen yet)."""
        return self._open

    def feed(self, text: str) -> list[CodeBlock]:
        """Consume `text`; return the blocks that closed within it (in order)."""
        if self._finished:
            raise RuntimeError("FenceTracker.feed() after finish()")
        if not text:
            return []
        self._fed += len(text)
        if "\n" not in text:
            self._parts.append(text)
            return []
        closed: list[CodeBlock] = []
        pieces = text.split("\n")
        first = pieces[0]
        if self._parts:
            self._parts.append(first)
            first = "".join(self._parts)
            self._parts = []
        self._line(first, 1, closed)
        for piece in pieces[1:-1]:
            self._line(piece, 1, closed)
        if pieces[-1]:
            self._parts.append(pieces[-1])
        return closed

    def finish(self) -> list[CodeBlock]:
        """End of input: interpret the partial last line and close the open block (eof)."""
        if self._finished:
            return []
        closed: list[CodeBlock] = []
        if self._parts:
            last = "".join(self._parts)
            self._parts = []
            self._line(last, 0, closed)
        if self._open is not None:
            self._close(self._open, self._prev_line_end, "eof", closed)
        self._finished = True
        return closed

    def pending_fence_start(self) -> int | None:
        """Offset from which text should be held because it may be (or already is) a code block.

        The open block's start if there is one; else, if the incomplete last line could still
        turn into an opening fence (e.g. ``"``"``, ``"  ~~~py"``, ``"- "``), where that fence would
        start; else None.
        """
        if self._open is not None:
            return self._open.start
        if not self._parts:
            return None
        line = "".join(self._parts)
        _depth, i = _strip_quotes(line, 99)
        n = len(line)
        while True:  # skip list markers and whitespace
            while i < n and line[i] in " \t":
                i += 1
            m = _LIST_MARKER.match(line, i)
            if m is None:
                break
            i = m.end()
        if i >= n or (line[i:].isdigit() and n - i <= 9):
            return self._line_start + i
        ch = line[i]
        if ch not in "`~":
            return None
        j = i
        while j < n and line[j] == ch:
            j += 1
        if j == n or (j - i >= 3 and not (ch == "`" and "`" in line[j:])):
            return self._line_start + i
        return None

    # ------------------------------------------------------------------ line machinery

    def _line(self, raw: str, eol_len: int, closed: list[CodeBlock]) -> None:
        start = self._line_start
        line = raw[:-1] if raw.endswith("\r") else raw
        self._next_line_start = start + len(raw) + eol_len
        if self._open is not None and self._in_block_line(self._open, line, start, closed):
            self._advance(start, len(line), len(raw) + eol_len)
            return
        self._outside_line(line, start)
        self._advance(start, len(line), len(raw) + eol_len)

    def _advance(self, start: int, content_len: int, total_len: int) -> None:
        self._prev_line_end = start + content_len
        self._line_start = start + total_len

    def _in_block_line(self, block: CodeBlock, line: str, start: int, closed: list[CodeBlock]) -> bool:
        """Handle a line while `block` is open. False: the block ended before this line."""
        depth, i = _strip_quotes(line, block._qdepth)
        if depth < block._qdepth:
            self._close(block, self._prev_line_end, "container", closed)
            return False
        k, col = _skip_ws(line, i)
        if k >= len(line):  # blank line: content
            self._content(block, line, start, i)
            return True
        if col < block._base:
            self._close(block, self._prev_line_end, "container", closed)
            return False
        rel = col - block._base
        if rel <= 3 and line[k] == block._char:
            j = k
            while j < len(line) and line[j] == block._char:
                j += 1
            if j - k >= block._len and not line[j:].strip(" \t"):
                self._close(block, start + j, "fence", closed)
                return True
        self._content(block, line, start, i)
        return True

    def _content(self, block: CodeBlock, line: str, start: int, i: int) -> None:
        """Append a content line, removing up to base + rel columns of indentation."""
        limit = block._base + block._rel
        col = 0
        n = len(line)
        while i < n and col < limit:
            c = line[i]
            if c == " ":
                col += 1
            elif c == "\t":
                nxt = col + 4 - (col % 4)
                if nxt > limit:  # a tab straddling the limit leaves its remaining columns
                    block.lines.append(" " * (nxt - limit) + line[i + 1 :])
                    block.line_offsets.append(start + i + 1)
                    return
                col = nxt
            else:
                break
            i += 1
        block.lines.append(line[i:])
        block.line_offsets.append(start + i)

    def _outside_line(self, line: str, start: int) -> None:
        depth, i = _strip_quotes(line, 99)
        k, col = _skip_ws(line, i)
        n = len(line)
        blank = k >= n
        cols = self._list_cols
        same_container = True  # False once a container of the open paragraph was left
        if depth != self._list_qdepth:
            if not blank and self._para and depth < self._list_qdepth and not _starts_block(line, k, col):
                return  # lazy continuation of a quoted paragraph: containers stay open
            cols.clear()
            self._list_qdepth = depth
            same_container = False
        if blank:
            self._para = False  # blank lines end paragraphs but keep list items open
            return
        if cols and col < cols[-1]:
            kept = [c for c in cols if c <= col]
            if self._para and not _starts_block(line, k, col - (kept[-1] if kept else 0)):
                return  # lazy continuation line of an open paragraph: containers stay open
            while cols and col < cols[-1]:
                cols.pop()
            same_container = False
        first = True
        while True:
            base = cols[-1] if cols else 0
            if col - base > 3:
                return  # indented code, or a paragraph continuation (paragraph state unchanged)
            m = _LIST_MARKER.match(line, k)
            if (
                m is not None
                and first
                and self._para
                and same_container
                and not _can_interrupt_paragraph(line, k, m.end())
            ):
                return  # "2) x" or an empty item cannot interrupt a paragraph: continuation text
            first = False
            if m is not None and not _THEMATIC_BREAK.match(line, k):
                end_col = col + (m.end() - k)
                j, after = _skip_ws(line, m.end(), end_col)
                if j >= n or after - end_col >= 5:
                    cols.append(end_col + 1)
                    self._para = False
                    return  # empty item start, or item starting with indented code
                cols.append(after)
                k, col = j, after
                continue
            break
        fm = _FENCE_OPEN.match(line, k)
        if fm is None or (fm.group(1)[0] == "`" and "`" in fm.group(2)):
            self._para = not (_THEMATIC_BREAK.match(line, k) or _ATX_HEADING.match(line, k))
            return
        run, info = fm.group(1), fm.group(2).strip(" \t")
        lang_word = info.split(None, 1)[0] if info else ""
        base = cols[-1] if cols else 0
        block = CodeBlock(
            index=len(self.blocks),
            start=start + k,
            line_start=start,
            fence=run,
            info=info,
            info_language=normalize_language(lang_word) if lang_word else None,
            code_start=self._next_line_start,
            _char=run[0],
            _len=len(run),
            _base=base,
            _rel=col - base,
            _qdepth=depth,
        )
        self.blocks.append(block)
        self._open = block
        self._para = False

    def _close(self, block: CodeBlock, end: int, how: Termination, closed: list[CodeBlock]) -> None:
        block.end = max(end, block.start)
        block.terminated = how
        if block.info_language:
            block.language, block.language_source = block.info_language, "info"
        elif self.detect:
            guess = detect_language(block.code)
            if guess:
                block.language, block.language_source = guess, "detected"
        self._open = None
        closed.append(block)


def _starts_block(line: str, k: int, rel: int) -> bool:
    """Whether line[k:], indented `rel` columns in the containers it matches, starts a block.

    If not, it is a lazy continuation line of the open paragraph and the containers stay open.

    (Any list marker counts here: the "ordered lists must start at 1 to interrupt a paragraph"
    rule applies only when the paragraph is in the line's own container.)
    """
    if rel > 3:
        return False  # indented code cannot interrupt a paragraph either
    fm = _FENCE_OPEN.match(line, k)
    if fm is not None and not (fm.group(1)[0] == "`" and "`" in fm.group(2)):
        return True
    return bool(
        _LIST_MARKER.match(line, k)
        or _THEMATIC_BREAK.match(line, k)
        or _ATX_HEADING.match(line, k)
        or line.startswith(">", k)
    )


def _can_interrupt_paragraph(line: str, k: int, marker_end: int) -> bool:
    """A list item may interrupt a paragraph only if non-empty and (if ordered) numbered 1."""
    if not line[marker_end:].strip(" \t"):
        return False
    return not line[k].isdigit() or int(line[k : marker_end - 1]) == 1


def _strip_quotes(line: str, max_depth: int) -> tuple[int, int]:
    """Count up to `max_depth` block-quote markers at the start of `line`; return (depth, index after)."""
    depth = 0
    pos = 0
    n = len(line)
    while depth < max_depth:
        j = pos
        while j < n and j - pos < 3 and line[j] == " ":
            j += 1
        if j < n and line[j] == ">":
            depth += 1
            pos = j + 1
            if pos < n and line[pos] == " ":
                pos += 1
        else:
            break
    return depth, pos


def _skip_ws(line: str, i: int, col: int = 0) -> tuple[int, int]:
    """Skip spaces/tabs from index i at column col; return (index, column) of the next char."""
    n = len(line)
    while i < n:
        c = line[i]
        if c == " ":
            col += 1
        elif c == "\t":
            col += 4 - (col % 4)
        else:
            break
        i += 1
    return i, col


def extract_code_blocks(text: str, detect: bool = True) -> list[CodeBlock]:
    """All fenced code blocks of a complete text (an unterminated last block runs to the end)."""
    tracker = FenceTracker(detect=detect)
    tracker.feed(text)
    tracker.finish()
    return tracker.blocks


# --------------------------------------------------------------------------- languages

# Info-string word -> canonical language name. Canonical names follow CodeShield's Language enum
# (c, cpp, csharp, java, javascript, php, python, rust, kotlin, swift, ruby, objective_c, hack, xml)
# plus "typescript" (scanned with the JavaScript rules); other words pass through lower-cased.
_ALIAS_WORDS: dict[str, str] = {
    "python": "py python python3 py3 python2 ipython pycon pyw sage gyp",
    "javascript": "js javascript jsx node nodejs mjs cjs ecmascript",
    "typescript": "ts typescript tsx mts",
    "c": "c h ansic",
    "cpp": "cpp c++ cc cxx hpp hxx h++ hh cplusplus arduino ino cuda cu",
    "csharp": "cs csharp c# dotnet",
    "java": "java",
    "php": "php php3 php4 php5 php7 php8",
    "rust": "rust rs",
    "kotlin": "kotlin kt kts",
    "swift": "swift",
    "ruby": "ruby rb jruby",
    "objective_c": "objc objective-c objectivec obj-c m objective_c",
    "objective_cpp": "objcpp objective-c++ obj-c++ mm objective_cpp",
    "hack": "hack",
    "xml": "xml xsd xsl xslt plist wsdl",
    "shell": "sh bash shell zsh console shell-session",
    "text": "text txt plaintext plain output none",
}
_ALIASES: dict[str, str] = {w: lang for lang, words in _ALIAS_WORDS.items() for w in words.split()}


def normalize_language(word: str) -> str | None:
    """Canonical language for an info-string word (``"Python"``, ``"{.py}"``, ``"c++"``, ``"js:app.js"``)."""
    w = word.strip().lower()
    w = w.strip("{}.")
    if w.startswith("language-"):
        w = w[len("language-") :]
    for sep in (":", ",", "{", "}", "="):
        w = w.split(sep, 1)[0]
    if not w:
        return None
    return _ALIASES.get(w, w)


_SIGNS: dict[str, list[tuple[re.Pattern[str], int]]] = {
    lang: [(re.compile(p, re.M), w) for p, w in signs]
    for lang, signs in {
        "python": [
            (r"^[ \t]*def \w+\(.*\)(?:\s*->\s*[\w\[\], .]+)?:[ \t]*$", 4),
            (r"^[ \t]*(?:import [\w.]+(?: as \w+)?|from [\w.]+ import [\w*(]+)[ \t]*$", 3),
            (r"^[ \t]*(?:elif\b.*|except\b.*|try|finally|else)[ \t]*:[ \t]*$", 2),
            (r"^[ \t]*class \w+(?:\(.*\))?:[ \t]*$", 4),
            (r"\bself\.\w+", 1),
            (r"^[ \t]*print\(", 1),
            (r"^[ \t]*(?:if|for|while|with) .*:[ \t]*$", 1),
            (r"\b(?:None|True|False)\b", 1),
        ],
        "javascript": [
            (r"\b(?:const|let|var)\s+[\w${}\[\], ]+\s*=", 2),
            (r"=>", 1),
            (r"\bfunction\s*[\w$]*\s*\(", 2),
            (r"\bconsole\.(?:log|error|warn)\(", 3),
            (r"\brequire\(\s*['\"`]", 3),
            (r"\b(?:document|window)\.\w+", 2),
            (r"\bmodule\.exports\b|^\s*export\s+(?:default|const|function|class)\b", 3),
            (r"===|!==", 2),
            (r"^\s*import\s+.+\s+from\s+['\"]", 3),
        ],
        "java": [
            (r"\bSystem\.(?:out|err)\.print", 5),
            (r"^\s*import\s+(?:java|javax|org|com)\.[\w.*]+;", 5),
            (r"\bString\[\]\s+\w+", 3),
            (r"@Override\b", 3),
            (r"\bpublic\s+(?:static\s+)?(?:final\s+)?(?:class|interface|void|int|String|boolean)\b", 2),
            (r"^\s*package\s+[\w.]+;", 4),
            (r"\bthrows\s+\w+", 2),
        ],
        "csharp": [
            (r"^\s*using\s+System(?:\.[\w.]+)?;", 6),
            (r"\bConsole\.Write(?:Line)?\(", 5),
            (r"^\s*namespace\s+[\w.]+", 2),
            (r"\{\s*get;\s*(?:set;)?\s*\}", 5),
            (r"\bvar\s+\w+\s*=\s*new\b", 2),
            (
                r"\b(?:public|private|internal)\s+(?:static\s+)?(?:async\s+)?(?:void|string|int|bool|Task)\b",
                1,
            ),
            (r"\[(?:HttpGet|HttpPost|Route|ApiController|Serializable)\b", 4),
        ],
        "c": [
            (
                r"^\s*#\s*include\s*<(?:stdio|stdlib|string|unistd|stdint|stddef|errno|fcntl|signal|time|math|"
                r"ctype|assert|limits|stdbool|sys/\w+|netinet/\w+|arpa/\w+|openssl/\w+)\.h>",
                4,
            ),
            (r"\b(?:printf|fprintf|snprintf|sprintf|puts)\s*\(", 2),
            (
                r"\b(?:malloc|calloc|realloc|free|strcpy|strncpy|strcat|gets|fgets|scanf|memcpy|memset|strlen)\s*\(",
                2,
            ),
            (r"\bint\s+main\s*\(", 3),
            (r"\b(?:char|int|void|unsigned|size_t|uint8_t|FILE)\s*\*+\s*\w+", 2),
            (r"^\s*#\s*(?:define|ifdef|ifndef|endif)\b", 2),
        ],
        "cpp": [
            (
                r"^\s*#\s*include\s*<(?:iostream|vector|string|map|set|memory|algorithm|sstream|fstream|"
                r"unordered_map|unordered_set|thread|mutex|cstdio|cstdlib|cstring|array|functional)>",
                5,
            ),
            (r"\bstd::\w+", 4),
            (r"\b(?:cout|cerr)\s*<<|\bcin\s*>>", 4),
            (r"\btemplate\s*<", 3),
            (r"\busing\s+namespace\s+\w+\s*;", 3),
            (r"^\s*(?:public|private|protected):", 2),
            (r"\bnullptr\b|\bauto\s+\w+\s*=|\bnew\s+\w+(?:<.*>)?\s*[\[(]", 2),
        ],
        "php": [
            (r"<\?php", 10),
            (r"\$\w+\s*=", 3),
            (r"\$_(?:GET|POST|REQUEST|SERVER|COOKIE|FILES|SESSION)\b", 5),
            (r"\bfunction\s+\w+\s*\(\s*\$", 4),
            (r"^\s*echo\s", 2),
            (r"\$this->", 3),
        ],
        "rust": [
            (r"\bfn\s+\w+\s*(?:<[^>]*>)?\s*\(", 3),
            (r"\blet\s+mut\b", 4),
            (r"\b(?:println|format|vec|panic|eprintln)!\s*[(\[]", 5),
            (r"^\s*use\s+(?:std|crate|super)::", 5),
            (r"^\s*impl\b|\bpub\s+fn\b|\bpub\s+struct\b", 3),
            (r"\b(?:u8|u16|u32|u64|i32|i64|usize|isize)\b|&str\b|&mut\b", 2),
            (r"\bunsafe\s*\{|\bOption<|\bResult<", 2),
        ],
    }.items()
}


def detect_language(code: str) -> str | None:
    """Cheap guess of a code block's language among the languages CodeShield has rules for.

    Counts weighted syntax signals (each signal once); returns the best language if it scores at
    least 4 and clearly beats the runner-up, else None. C vs C++: any C++ signal wins, since the
    C++ rule set includes C's.
    """
    if not code.strip():
        return None
    sample = code if len(code) <= 20_000 else code[:20_000]
    scores: dict[str, int] = {}
    for lang, signs in _SIGNS.items():
        s = 0
        for pat, w in signs:
            if pat.search(sample):
                s += w
        if s:
            scores[lang] = s
    if not scores:
        return None
    if scores.get("c", 0) >= 4 and scores.get("cpp", 0) >= 3:
        scores["cpp"] += scores.pop("c")
    ranked = sorted(scores.items(), key=lambda kv: kv[1], reverse=True)
    best, top = ranked[0]
    second = ranked[1][1] if len(ranked) > 1 else 0
    if top < 4 or top - second < 2:
        return None
    return best

"""The streaming code-fence tracker: CommonMark cases, fed whole and cut at every boundary."""

from __future__ import annotations

import codecs
import itertools
import random

import pytest

from gateway.guards.code_fences import (
    CodeBlock,
    FenceTracker,
    detect_language,
    extract_code_blocks,
    normalize_language,
)

# (name, text, expected [(info, language, code, terminated)])
CASES: list[tuple[str, str, list[tuple[str, str | None, str, str]]]] = [
    (
        "python",
        "Intro.\n\n```python\nprint('hi')\n```\n\nOutro.\n",
        [("python", "python", "print('hi')\n", "fence")],
    ),
    ("tilde", "~~~c\nint x;\n~~~\n", [("c", "c", "int x;\n", "fence")]),
    ("c++ info", "```c++\nstd::cout << 1;\n```\n", [("c++", "cpp", "std::cout << 1;\n", "fence")]),
    (
        "js info + attrs",
        '```js title="app.js"\nfetch(u)\n```',
        [('js title="app.js"', "javascript", "fetch(u)\n", "fence")],
    ),
    (
        "two blocks",
        "a\n```py\nx = 1\n```\nb\n```java\nint y;\n```\nc",
        [("py", "python", "x = 1\n", "fence"), ("java", "java", "int y;\n", "fence")],
    ),
    (
        "unterminated",
        "Here:\n```python\nimport os\nos.system(x)\n",
        [("python", "python", "import os\nos.system(x)\n", "eof")],
    ),
    ("unterminated no newline", "```js\neval(a)", [("js", "javascript", "eval(a)\n", "eof")]),
    ("empty block", "```\n```\n", [("", None, "", "fence")]),
    ("inline code ignored", "Use ```x``` or `y` inline.\n``not a fence``\n", []),
    ("backtick in info", "```a`b\nnot code\n```\n", [("", None, "", "eof")]),
    ("two backticks", "``\nnot\n``\n", []),
    (
        "nested: longer outer fence",
        "````markdown\n```python\ninner\n```\n````\n",
        [("markdown", "markdown", "```python\ninner\n```\n", "fence")],
    ),
    ("nested: tilde around backticks", "~~~\n```\nx\n```\n~~~\n", [("", None, "```\nx\n```\n", "fence")]),
    ("closing needs same char", "```\n~~~\nx\n```\n", [("", None, "~~~\nx\n", "fence")]),
    ("closing at least as long", "````\n```\nx\n````\n", [("", None, "```\nx\n", "fence")]),
    ("closing has no info", "```py\nx\n```py\n```\n", [("py", "python", "x\n```py\n", "fence")]),
    ("closing trailing spaces", "```\nx\n```   \nafter\n", [("", None, "x\n", "fence")]),
    ("indented fence", "  ```\n  a\n   b\n c\n  ```\n", [("", None, "a\n b\nc\n", "fence")]),
    ("four spaces: indented code", "    ```\n    not a fence\n", []),
    ("tab-indented fence is code", "\t```\n\tx\n", []),
    (
        "fence in list item",
        "1. Install:\n\n   ```bash\n   pip install x\n   ```\n2. Run.\n",
        [("bash", "shell", "pip install x\n", "fence")],
    ),
    (
        "fence in list, 4 spaces",
        "1. Step\n\n    ```py\n    x = 1\n    ```\n",
        [("py", "python", "x = 1\n", "fence")],
    ),
    ("fence on the marker line", "- ```c\n  int x;\n  ```\n", [("c", "c", "int x;\n", "fence")]),
    ("nested list", "- a\n  - b\n\n    ```py\n    deep\n    ```\n", [("py", "python", "deep\n", "fence")]),
    ("list item ends the block", "- ```c\n  int x;\nafter\n", [("c", "c", "int x;\n", "container")]),
    ("block quote", "> ```c\n> int x;\n> ```\n", [("c", "c", "int x;\n", "fence")]),
    ("block quote ends the block", "> ```c\n> int x;\nplain\n", [("c", "c", "int x;\n", "container")]),
    ("crlf", "```py\r\nx=1\r\n```\r\nafter\r\n", [("py", "python", "x=1\n", "fence")]),
    (
        "unicode",
        "Voilà 🙂\n```python\nprint('héllo 🙂')\n```\n",
        [("python", "python", "print('héllo 🙂')\n", "fence")],
    ),
    ("blank lines kept", "```\n\n\nx\n\n```\n", [("", None, "\n\nx\n\n", "fence")]),
    ("thematic break then fence", "* * *\n```\nx\n```\n", [("", None, "x\n", "fence")]),
    ("lazy list paragraph", "- item\ncontinued\n    ```\n    x\n    ```\n", [("", None, "x\n", "fence")]),
    ("2) cannot interrupt", "text\n2) x\n    ```\n", []),
    (
        "unlabelled python detected",
        "```\nimport os\n\ndef f(x):\n    return x\n```\n",
        [("", "python", "import os\n\ndef f(x):\n    return x\n", "fence")],
    ),
]


def _key(blocks: list[CodeBlock]) -> list[tuple[object, ...]]:
    return [
        (
            b.index,
            b.start,
            b.line_start,
            b.end,
            b.code_start,
            b.info,
            b.language,
            b.code,
            b.terminated,
            b.line_offsets,
        )
        for b in blocks
    ]


def _feed(chunks: list[str]) -> tuple[list[CodeBlock], list[CodeBlock]]:
    """Feed chunks; return (all blocks, blocks in the order they were reported closed)."""
    t = FenceTracker()
    reported: list[CodeBlock] = []
    for c in chunks:
        reported += t.feed(c)
    reported += t.finish()
    return t.blocks, reported


@pytest.mark.parametrize("name,text,expected", CASES, ids=[c[0] for c in CASES])
def test_cases_whole(name: str, text: str, expected: list[tuple[str, str | None, str, str]]) -> None:
    blocks, reported = _feed([text])
    assert [(b.info, b.language, b.code, b.terminated) for b in blocks] == expected
    assert [b.index for b in reported] == list(range(len(blocks)))  # each reported once, in order
    for b in blocks:
        assert b.closed
        seg = text[b.start : b.end]
        assert seg.startswith(("```", "~~~")), seg
        if b.terminated == "fence":
            assert seg.rstrip().endswith(b.fence[0] * len(b.fence))
        for line, off in zip(b.lines, b.line_offsets, strict=True):
            assert text[off : off + len(line)] == line  # content offsets index the original text


@pytest.mark.parametrize("name,text,expected", CASES, ids=[c[0] for c in CASES])
def test_cases_every_split_point(name: str, text: str, expected: object) -> None:
    whole = _key(_feed([text])[0])
    for i in range(len(text) + 1):
        assert _key(_feed([text[:i], text[i:]])[0]) == whole, f"split at {i}"
    assert _key(_feed(list(text))[0]) == whole, "one char at a time"
    if len(text) <= 40:  # every pair of cut points
        for i, j in itertools.combinations(range(1, len(text)), 2):
            assert _key(_feed([text[:i], text[i:j], text[j:]])[0]) == whole, f"split at {i},{j}"


@pytest.mark.parametrize("name,text,expected", CASES, ids=[c[0] for c in CASES])
def test_cases_every_utf8_byte_boundary(name: str, text: str, expected: object) -> None:
    data = text.encode("utf-8")
    whole = _key(_feed([text])[0])
    for i in range(len(data) + 1):
        dec = codecs.getincrementaldecoder("utf-8")()
        chunks = [dec.decode(data[:i]), dec.decode(data[i:], final=True)]
        assert _key(_feed(chunks)[0]) == whole, f"byte split at {i}"


def test_random_chunking_long_document() -> None:
    text = "".join(c[1] + "\n\n" for c in CASES)
    whole = _key(_feed([text])[0])
    rng = random.Random(7)
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(1, 40)))
        chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        assert _key(_feed(chunks)[0]) == whole


def test_blocks_close_as_soon_as_the_closing_fence_line_ends() -> None:
    t = FenceTracker()
    assert t.feed("Text\n```py\nx = 1\n") == []
    assert t.open_block is not None and t.open_block.start == 5
    assert t.feed("``") == [] and t.feed("`") == []  # closing fence not complete until its newline
    closed = t.feed("\nmore prose")
    assert [b.code for b in closed] == ["x = 1\n"]
    assert t.open_block is None


def test_hold_covers_every_open_block_at_every_prefix() -> None:
    """The gate's contract: whatever prefix was fed, code of a block not yet closed is held."""
    text = "Intro `x`.\n\n- item\n\n  ```python\n  import os\n  os.system(cmd)\n  ```\n\nProse.\n~~~\nraw\n"
    final_blocks = extract_code_blocks(text)
    for p in range(len(text) + 1):
        t = FenceTracker()
        t.feed(text[:p])
        hold = t.pending_fence_start()
        for b in final_blocks:
            closed_in_prefix = any(x.start == b.start and x.closed for x in t.blocks)
            if b.start < p and not closed_in_prefix:  # opener (partial or whole) or content arrived
                assert hold is not None and hold <= b.start, (p, hold, b.start)
        if hold is not None and t.open_block is None:
            assert hold >= text.rfind("\n", 0, p) + 1  # a partial line is held, never earlier prose


@pytest.mark.parametrize(
    "partial,held",
    [("``", True), ("  ~~", True), ("```pyth", True), ("- ", True), ("1", True), ("> ```", True), ("", True),
     ("`x` is", False), ("Hello", False), ("```a`b", False), ("12345678901", False)],
)  # fmt: skip
def test_pending_partial_line(partial: str, held: bool) -> None:
    t = FenceTracker()
    t.feed("prose\n" + partial)
    if partial == "":
        assert t.pending_fence_start() is None  # nothing of the next line has arrived
    else:
        assert (t.pending_fence_start() is not None) is held


def test_feed_after_finish_is_an_error() -> None:
    t = FenceTracker()
    t.finish()
    with pytest.raises(RuntimeError):
        t.feed("x")


@pytest.mark.parametrize(
    "word,lang",
    [("python", "python"), ("Py", "python"), ("python3", "python"), ("js", "javascript"),
     ("JSX", "javascript"), ("ts", "typescript"), ("c++", "cpp"), ("cpp", "cpp"), ("C", "c"),
     ("c#", "csharp"), ("cs", "csharp"),
     ("java", "java"), ("php", "php"), ("rs", "rust"), ("kotlin", "kotlin"), ("{.python}", "python"),
     ("python:main.py", "python"), ("language-js", "javascript"), ("bash", "shell"), ("go", "go")],
)  # fmt: skip
def test_normalize_language(word: str, lang: str) -> None:
    assert normalize_language(word) == lang


@pytest.mark.parametrize(
    "code,lang",
    [
        ("import os\n\ndef main():\n    print(os.getcwd())\n", "python"),
        ("const fs = require('fs');\nconsole.log(fs.readFileSync(p));\n", "javascript"),
        ("import java.util.List;\npublic class A {\n  public static void main(String[] a) {\n"
         "    System.out.println(1);\n  }\n}\n", "java"),
        ("using System;\nclass P { static void Main() { Console.WriteLine(1); } }\n", "csharp"),
        ("#include <stdio.h>\nint main(void) {\n  char *p = malloc(4);\n  printf(\"%s\", p);\n}\n", "c"),
        ("#include <iostream>\nint main() { std::cout << 1; }\n", "cpp"),
        ("<?php\n$x = $_GET['a'];\necho $x;\n", "php"),
        ("use std::io;\nfn main() {\n    let mut s = String::new();\n    println!(\"{}\", s);\n}\n", "rust"),
        ("The quick brown fox jumps over the lazy dog.\nNothing to see.\n", None),
        ("", None),
    ],
)  # fmt: skip
def test_detect_language(code: str, lang: str | None) -> None:
    assert detect_language(code) == lang


@pytest.mark.slow
def test_agrees_with_commonmark_reference_on_random_documents() -> None:
    """Differential test against commonmark.py (the CommonMark reference parser, ported from
    commonmark.js): lines, info string and content of every fenced block, on random documents
    mixing fences, lists, block quotes, lazy lines and indentation."""
    commonmark = pytest.importorskip("commonmark")
    frags = ["```", "```python", "~~~", "````", "~~~~c", "code x", "", "text", "- item", "1. item", "> ```py",
             "> code", "  ```", "   ```js", "    ```", "  code", "    indented", "- ```c", "  - sub", "\t```",
             "```a`b", "* * *", "3. z", "2) x", "   - y", "      ```", "```  ", "# h", "10. ten", "> quote",
             ">"]  # fmt: skip

    def ours(text: str) -> list[tuple[int, int, str, str]]:
        starts = [0] + [i + 1 for i, c in enumerate(text) if c == "\n"]

        def line_of(off: int) -> int:
            return max(i for i, s in enumerate(starts) if s <= off)

        return [
            (line_of(b.line_start), line_of(b.end) + 1, b.info, b.code) for b in extract_code_blocks(text)
        ]

    def reference(text: str) -> list[tuple[int, int, str, str]]:
        out = []
        for node, entering in commonmark.Parser().parse(text).walker():
            if entering and node.t == "code_block" and node.is_fenced:
                (first, _), (last, _) = node.sourcepos
                out.append((first - 1, last, (node.info or "").strip(), node.literal))
        return out

    rng = random.Random(1234)
    mismatches = []
    for _ in range(4000):
        text = "\n".join(rng.choice(frags) for _ in range(rng.randint(1, 9)))
        if rng.random() < 0.7:
            text += "\n"
        if ours(text) != reference(text):
            mismatches.append(text)
    assert not mismatches, mismatches[:3]

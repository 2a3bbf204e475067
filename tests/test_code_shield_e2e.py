"""CodeShield through the real server with the real SDKs: the action applies to the insecure block only.

An answer with prose, an insecure C block (gets: tier 1) and a safe Python block streams from a
scripted upstream through the gateway's stream gate; `block` ends the stream before any of the C
block reaches the client, `redact` swaps just that block for the notice, `warn` lets it through
with the finding in the annotation. Non-stream answers get the same treatment in one shot.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from aiohttp import web
from harness import llama_stream, oa_completion, openai_text_stream, openai_tool_stream, stream_frames, wait_until

from gateway.guards.code_fences import extract_code_blocks
from gateway.guards.code_shield import SemgrepRunner, find_rules_dir
from gateway.policy.audit import AuditLog
from gateway.policy.chain import PolicyStore

if find_rules_dir() is None:  # pragma: no cover
    pytest.skip("codeshield package not installed", allow_module_level=True)

C_BAD = "```c\n#include <stdio.h>\nint main(void) {\n  char name[32];\n  gets(name);\n  return 0;\n}\n```"
PY_OK = "```python\ndef greet(name):\n    return 'Hello ' + name\n```"
ANSWER = (
    "Sure. Reading a line in C is easy to get wrong, here is the classic way:\n\n"
    f"{C_BAD}\n\nIn Python it is simpler:\n\n{PY_OK}\n\nEither reads one name from the user.\n"
)
C_SPAN = extract_code_blocks(ANSWER)[0].span
NOTICE = "[insecure code removed]"
MSG = [{"role": "user", "content": "read a name in C and Python"}]


def policy(tmp_path: Path, action: str, answer: str = ANSWER) -> str:
    p = tmp_path / "cs.yaml"
    p.write_text(
        textwrap.dedent(f"""
        name: cs
        stream:
          check_every_tokens: 8
          max_unchecked_tokens: 0
          steps:
            - guard: code_shield
              hold_code_blocks: true
              action: {action}
              notice: "{NOTICE}"
        """)
    )
    return str(p)


def handler(answer: str, dialect: str = "openai", tool_args: str | None = None):
    pieces = [answer[i : i + 7] for i in range(0, len(answer), 7)]

    async def handle(request: web.Request, up) -> web.StreamResponse:
        if not up.last.json().get("stream"):
            return web.json_response(oa_completion(answer))
        if tool_args is not None:
            parts = [tool_args[i : i + 5] for i in range(0, len(tool_args), 5)]
            frames = openai_tool_stream(answer, "call_1", "run_python", parts)
        else:
            frames = llama_stream(pieces) if dialect == "llama" else openai_text_stream(pieces)
        return await stream_frames(request, frames, delay=0.001)

    return handle


@pytest.fixture
def gateway(make_stack, tmp_path):
    def make(action: str, dialect: str = "openai", answer: str = ANSWER, tool_args: str | None = None):
        path = policy(tmp_path, action)
        st = make_stack(
            {"upstreams": {"main": {"base_url": "SCRIPTED", "dialect": dialect}}, "policy": path},
            handler=handler(answer, dialect, tool_args),
            dialect=dialect,
            policies=PolicyStore(required=[path]),
            audit=AuditLog(tmp_path / "audit.jsonl"),
        )
        st.audit_path = tmp_path / "audit.jsonl"
        return st

    return make


def audit(st) -> dict:
    wait_until(lambda: st.audit_path.exists() and st.audit_path.read_text().strip() != "")
    return json.loads(st.audit_path.read_text().splitlines()[-1])


def stream_text(chunks: list) -> tuple[str, list[str], list[dict]]:
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    notes = [c.model_extra["guardgate"] for c in chunks if c.model_extra and "guardgate" in c.model_extra]
    return text, finishes, notes


def test_block_ends_the_stream_before_the_insecure_block_and_prose_flows(gateway) -> None:
    st = gateway("block")
    text, finishes, notes = stream_text(list(st.openai().chat.completions.create(model="m", messages=MSG, stream=True)))
    assert finishes == ["content_filter"]
    assert ANSWER[: C_SPAN[0]].startswith(text)  # nothing of the C block (held), nothing after it
    assert text.startswith("Sure. Reading a line in C")  # the prose before it was not held back
    assert "gets" not in text and "```" not in text
    assert notes and notes[-1]["action"] == "block"
    rec = audit(st)
    assert rec["action"] == "block" and rec["leaked_tokens"] == 0
    assert rec["steps"][0]["verdict"] == "flagged"


def test_redact_replaces_only_the_c_block(gateway) -> None:
    st = gateway("redact")
    text, finishes, _ = stream_text(list(st.openai().chat.completions.create(model="m", messages=MSG, stream=True)))
    assert finishes == ["stop"]
    assert text == ANSWER[: C_SPAN[0]] + NOTICE + ANSWER[C_SPAN[1] :]
    assert PY_OK in text and "gets(" not in text


def test_warn_releases_everything_and_annotates_the_finding(gateway) -> None:
    st = gateway("warn")
    text, finishes, notes = stream_text(list(st.openai().chat.completions.create(model="m", messages=MSG, stream=True)))
    assert text == ANSWER and finishes == ["stop"]
    assert notes and notes[-1]["action"] == "warn"
    assert audit(st)["action"] == "warn"


def test_non_stream_answer_is_redacted_the_same_way(gateway) -> None:
    st = gateway("redact")
    out = st.openai().chat.completions.create(model="m", messages=MSG)
    assert out.choices[0].message.content == ANSWER[: C_SPAN[0]] + NOTICE + ANSWER[C_SPAN[1] :]


@pytest.mark.skipif(SemgrepRunner.locate() is None, reason="semgrep not installed")
@pytest.mark.slow
async def test_llama_sdk_semgrep_finding_blocks(gateway) -> None:
    answer = (
        "Evaluate the expression like this:\n\n```python\ndef calc(expr):\n    return eval(expr)\n```\n\n"
        "Then call calc().\n"
    )
    st = gateway("block", dialect="llama", answer=answer)
    stream = await st.async_llama().chat.completions.create(model="m", messages=MSG, stream=True)
    text, stop = "", None
    async for chunk in stream:
        ev = chunk.event
        if ev.event_type == "progress" and ev.delta and getattr(ev.delta, "text", None):
            text += ev.delta.text
        if ev.event_type == "complete":
            stop = ev.stop_reason
    assert stop == "content_filter"
    assert "eval" not in text and text.startswith("Evaluate the expression")


def test_tool_call_arguments_carrying_code_are_scanned(gateway) -> None:
    args = json.dumps({"code": "import hashlib\nprint(hashlib.md5(open('f', 'rb').read()).hexdigest())"})
    st = gateway("block", answer="Running it now.", tool_args=args)
    chunks = list(st.openai().chat.completions.create(model="m", messages=MSG, stream=True))
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    sent = "".join(
        tc.function.arguments or ""
        for c in chunks
        if c.choices and c.choices[0].delta.tool_calls
        for tc in c.choices[0].delta.tool_calls
        if tc.function
    )
    assert finishes == ["content_filter"]
    assert "md5" not in sent  # the code string was held until scanned, then the stream was cut
    rec = audit(st)
    assert rec["action"] == "block" and rec["steps"][0]["verdict"] == "flagged"

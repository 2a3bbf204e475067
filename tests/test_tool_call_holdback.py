"""A streamed tool call reaches the client whole or not at all (issue 17): the gate holds a call's
arguments until the call is complete and checked, so a blocked call never leaves `{"city": ` behind
(the `llm` CLI and other clients json.loads the arguments they got)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from aiohttp import web
from harness import oa_chunk, openai_tool_stream, sse, stream_frames

from gateway.policy.chain import PolicyStore

PHRASE = "forbidden city"


def policy(tmp_path: Path, every: int) -> str:
    p = tmp_path / "p.yaml"
    p.write_text(f"""name: p
stream:
  check_every_tokens: {every}
  steps:
    - guard: regex
      patterns: ["{PHRASE}"]
""")
    return str(p)


def two_calls(first_args: list[str], second_args: list[str]) -> list[bytes]:
    frames = [sse(oa_chunk({"role": "assistant", "content": "", "refusal": None}))]
    for i, (cid, name, parts) in enumerate((("c1", "weather", first_args), ("c2", "weather", second_args))):
        frames.append(sse(oa_chunk({"tool_calls": [{"index": i, "id": cid, "type": "function",
                                                    "function": {"name": name, "arguments": ""}}]})))
        frames += [sse(oa_chunk({"tool_calls": [{"index": i, "function": {"arguments": a}}]})) for a in parts]
    return [*frames, sse(oa_chunk({}, "tool_calls")), sse("[DONE]")]


@pytest.mark.parametrize("every", [1, 4, 64])
def test_a_blocked_call_leaves_no_fragment_and_a_clean_call_is_whole(make_stack, tmp_path, every: int) -> None:
    frames = two_calls(['{"city": ', '"Paris"}'], ['{"city": ', '"the ', 'forbidden', ' city"}'])

    async def handler(request: web.Request, up: object) -> web.StreamResponse:
        return await stream_frames(request, frames, delay=0.05)

    st = make_stack({"upstreams": {"main": {"base_url": "SCRIPTED"}}, "policy": "p"}, handler=handler,
                    policies=PolicyStore(required=[policy(tmp_path, every)]))
    chunks = list(st.openai().chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                                      stream=True))
    args: dict[int, str] = {}
    for ch in chunks:
        for tc in (ch.choices[0].delta.tool_calls or []) if ch.choices else []:
            args[tc.index] = args.get(tc.index, "") + (tc.function.arguments or "")
    assert chunks[-1].choices[0].finish_reason == "content_filter"
    # Every call the client got is whole (the clean one, if it was checked apart from the blocked one
    # before the block), and nothing of the blocked call came out.
    for index, text in args.items():
        assert json.loads(text) == {"city": "Paris"} and index == 0, args
    assert PHRASE not in json.dumps(args)


def test_a_single_clean_call_streams_through(make_stack, tmp_path) -> None:
    async def handler(request: web.Request, up: object) -> web.StreamResponse:
        return await stream_frames(request, openai_tool_stream("", "c1", "weather", ['{"ci', 'ty": "Ro', 'me"}']))

    st = make_stack({"upstreams": {"main": {"base_url": "SCRIPTED"}}, "policy": "p"}, handler=handler,
                    policies=PolicyStore(required=[policy(tmp_path, 1)]))
    chunks = list(st.openai().chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                                      stream=True))
    args = "".join(tc.function.arguments or "" for ch in chunks if ch.choices
                   for tc in ch.choices[0].delta.tool_calls or [])
    assert json.loads(args) == {"city": "Rome"} and chunks[-1].choices[0].finish_reason == "tool_calls"

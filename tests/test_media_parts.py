"""Issue 35: images, audio and files under a policy, through the uvloop server with real SDKs (openai chat,
the Responses API, llama-api-client): refused by default with an error naming the part and the policy
line; `allow` relays them unchanged and audits them as uninspected; `images: guard` sends them with the
conversation to a scripted Llama Guard 4 backend (OpenAI-compatible chat with a vision projector, or
the Llama API moderations endpoint): the image reaches the guard, unsafe blocks, safe relays."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import llama_api_client
import openai
import pytest
from aiohttp import web
from harness import Loop, llama_completion, wait_until

from gateway.policy.audit import AuditLog
from gateway.policy.chain import PolicyStore

PNG = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGNgYGD4DwABBAEAwS2OUAAAAABJRU5"
    "ErkJggg=="
)
PNG_BYTES = 70  # the decoded payload of PNG
BOMB = PNG.replace("iVBOR", "iVBOR" + "Ym9tYg")  # another image: the scripted guard calls it unsafe
TEXT_ONLY = """name: text-only
CONTENT
input:
  steps:
    - guard: regex
      patterns: [{pattern: 'ignore previous', category: injection}]
"""


def write_policy(tmp_path: Path, content: str = "", guard_url: str | None = None, api: str = "openai_chat") -> str:
    p = tmp_path / "media.yaml"
    text = TEXT_ONLY.replace("CONTENT\n", content)
    if guard_url is not None:
        text += f"""    - guard: llama_guard
      backend: remote
      remote: {{base_url: '{guard_url}', api: {api}, model: Llama-Guard-4-12B}}
"""
    p.write_text(text)
    return str(p)


@pytest.fixture
def media_stack(make_stack, tmp_path):
    def make(policy_path: str, dialect: str = "openai"):
        audit = AuditLog(tmp_path / "audit.jsonl", include_content=True)
        handler = llama_handler if dialect == "llama" else None
        st = make_stack(
            {"upstreams": {"main": {"base_url": "SCRIPTED", "dialect": dialect}}, "policy": policy_path},
            handler=handler,
            dialect=dialect,
            policies=PolicyStore(required=[policy_path]),
            audit=audit,
        )
        st.audit_path = tmp_path / "audit.jsonl"
        return st

    return make


async def llama_handler(request: web.Request, up: Any) -> web.StreamResponse:
    return web.json_response(llama_completion("I see a pixel."))


def last_audit(st) -> dict:
    wait_until(lambda: st.audit_path.exists() and st.audit_path.read_text().strip() != "")
    return json.loads(st.audit_path.read_text().splitlines()[-1])


# ---------------------------------------------------------------------------- the three faces


def chat_image(st, image: str = PNG) -> Any:
    return st.openai().chat.completions.create(
        model="gpt-test",
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is in this picture?"},
                    {"type": "image_url", "image_url": {"url": image, "detail": "low"}},
                ],
            }
        ],
    )


def responses_image(st, image: str = PNG) -> Any:
    return st.openai().responses.create(
        model="gpt-test",
        input=[
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "What is in this picture?"},
                    {"type": "input_image", "image_url": image, "detail": "low"},
                ],
            }
        ],
    )


def llama_image(st, image: str = PNG) -> Any:
    return st.llama().chat.completions.create(
        model="Llama-4-Scout",
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is in this picture?"},
                    {"type": "image_url", "image_url": {"url": image}},
                ],
            }
        ],
    )


FACES = {
    # face: (call, upstream dialect, where the part is, its wire type, the part as the upstream must get it)
    "chat": (
        chat_image,
        "openai",
        "messages[0].content[1]",
        "image_url",
        {"type": "image_url", "image_url": {"url": PNG, "detail": "low"}},
    ),
    "responses": (
        responses_image,
        "openai",
        "input[0].content[1]",
        "input_image",
        {"type": "image_url", "image_url": {"url": PNG, "detail": "low"}},
    ),
    "llama": (
        llama_image,
        "llama",
        "messages[0].content[1]",
        "image_url",
        {"type": "image_url", "image_url": {"url": PNG}},
    ),
}


def refused(call, st, image: str = PNG) -> tuple[int, dict]:
    err = openai.APIStatusError if call is not llama_image else llama_api_client.APIStatusError
    with pytest.raises(err) as e:
        call(st, image)
    return e.value.status_code, e.value.response.json()


@pytest.mark.parametrize("face", FACES)
def test_image_under_text_only_policy_refused_naming_part_and_policy_line(media_stack, tmp_path, face) -> None:
    call, dialect, where, wire, _ = FACES[face]
    policy = write_policy(tmp_path)
    st = media_stack(policy, dialect)
    status, body = refused(call, st)
    err = body["error"]
    assert status == 400 and err["code"] == "content_not_inspected" and err["param"] == where
    assert where in err["message"] and f"`{wire}`" in err["message"]
    assert "content: {images: allow}" in err["message"] and policy in err["message"]
    assert st.upstream.requests == []  # nothing went upstream
    rec = last_audit(st)
    assert rec["status"] == 400 and rec["action"] == "block" and rec["blocked_stage"] == "input"
    assert rec["media"]["image"] == {
        "rule": "refuse",
        "count": 1,
        "bytes": PNG_BYTES,
        "by_reference": 0,
        "inspected": False,
    }


def test_refusal_points_at_the_content_line(media_stack, tmp_path) -> None:
    policy = write_policy(tmp_path, "content:\n  audio: allow\n  images: refuse\n")
    st = media_stack(policy)
    _, body = refused(chat_image, st)
    assert f"{policy}:4" in body["error"]["message"]  # the `images:` line to change


@pytest.mark.parametrize(
    ("part", "kind", "wire"),
    [
        ({"type": "input_audio", "input_audio": {"data": "UklGRiQAAABXQVZF", "format": "wav"}}, "audio", "input_audio"),
        (
            {"type": "file", "file": {"file_data": "data:application/pdf;base64,JVBERi0xLjQK", "filename": "a.pdf"}},
            "files",
            "file",
        ),
    ],
)
def test_audio_and_files_refused_by_default_and_relayed_when_allowed(media_stack, tmp_path, part, kind, wire) -> None:
    msgs = [{"role": "user", "content": [{"type": "text", "text": "listen"}, part]}]
    st = media_stack(write_policy(tmp_path))
    with pytest.raises(openai.BadRequestError) as e:
        st.openai().chat.completions.create(model="gpt-test", messages=msgs)
    assert e.value.code == "content_not_inspected" and f"`{wire}`" in e.value.message
    assert f"content: {{{kind}: allow}}" in e.value.message and st.upstream.requests == []

    st = media_stack(write_policy(tmp_path, f"content:\n  {kind}: allow\n"))
    st.openai().chat.completions.create(model="gpt-test", messages=msgs)
    assert st.upstream.last.json()["messages"][0]["content"][1] == part  # unchanged
    assert last_audit(st)["media"]["audio" if kind == "audio" else "file"]["rule"] == "allow"


@pytest.mark.parametrize("face", FACES)
def test_allowed_image_relayed_unchanged_and_audited_uninspected(media_stack, tmp_path, face) -> None:
    call, dialect, _, _, sent = FACES[face]
    st = media_stack(write_policy(tmp_path, "content:\n  images: allow\n"), dialect)
    call(st)
    assert st.upstream.last.json()["messages"][0]["content"][1] == sent
    rec = last_audit(st)
    assert rec["status"] == 200 and rec["action"] == "allow"
    assert rec["media"] == {
        "image": {"rule": "allow", "count": 1, "bytes": PNG_BYTES, "by_reference": 0, "inspected": False}
    }


def test_image_by_url_counted_by_reference(media_stack, tmp_path) -> None:
    st = media_stack(write_policy(tmp_path, "content:\n  images: allow\n"))
    chat_image(st, "https://example.com/cat.png")
    assert last_audit(st)["media"]["image"] == {
        "rule": "allow",
        "count": 1,
        "bytes": 0,
        "by_reference": 1,
        "inspected": False,
    }


def test_llama_upstream_refuses_audio_it_cannot_carry(media_stack, tmp_path) -> None:
    """An OpenAI client's audio part toward a Llama API upstream: refused (the Llama API has no audio
    item), never dropped on the way."""
    st = media_stack(write_policy(tmp_path, "content:\n  audio: allow\n"), "llama")
    with pytest.raises(openai.BadRequestError) as e:
        st.openai().chat.completions.create(
            model="m",
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}],
                }
            ],
        )
    assert e.value.code == "unsupported_content" and "Llama API has no audio" in e.value.message
    assert st.upstream.requests == []


# ---------------------------------------------------------------------------- images: guard (Llama Guard 4)


class ScriptedLG4:
    """Llama Guard 4 behind an OpenAI-compatible chat server (llama-server --mmproj, vLLM) and the Llama
    API's /moderations: an image whose data says "bomb" is unsafe (S9), anything else safe."""

    def __init__(self) -> None:
        self.requests: list[dict] = []

    def app(self) -> web.Application:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/moderations", self.moderations)
        return app

    def unsafe(self, body: dict) -> bool:
        return "Ym9tYg" in json.dumps(body)

    async def chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append({"path": request.path, "body": body})
        first, other = ("unsafe", "safe") if self.unsafe(body) else ("safe", "unsafe")
        text = "unsafe\nS9" if first == "unsafe" else "safe"
        lp = {
            "content": [
                {
                    "token": first,
                    "logprob": -0.01,
                    "top_logprobs": [{"token": first, "logprob": -0.01}, {"token": other, "logprob": -5.0}],
                }
            ]
        }
        return web.json_response(
            {
                "id": "g",
                "object": "chat.completion",
                "created": 1,
                "model": body["model"],
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "logprobs": lp,
                        "finish_reason": "stop",
                    }
                ],
            }
        )

    async def moderations(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append({"path": request.path, "body": body})
        flagged = self.unsafe(body)
        return web.json_response(
            {
                "model": body.get("model", "Llama-Guard"),
                "results": [{"flagged": flagged, "flagged_categories": ["S9"] if flagged else []}],
            }
        )


@pytest.fixture
def lg4():
    loop = Loop()
    guard = ScriptedLG4()
    guard.url = f"http://127.0.0.1:{loop.serve(guard.app())}/v1"
    yield guard
    loop.close()


GUARD_CASES = [
    ("chat", "openai_chat"),
    ("chat", "llama_moderations"),
    ("responses", "openai_chat"),
    ("llama", "llama_moderations"),
    ("llama", "openai_chat"),
]


@pytest.mark.parametrize(("face", "api"), GUARD_CASES)
def test_guarded_image_reaches_llama_guard_4_unsafe_blocks(media_stack, tmp_path, lg4, face, api) -> None:
    call, dialect, *_ = FACES[face]
    st = media_stack(write_policy(tmp_path, "content:\n  images: guard\n", lg4.url, api), dialect)
    status, body = refused(call, st, BOMB)
    assert status == 400 and body["error"]["code"] == "content_filter" and "S9" in body["error"]["message"]
    assert st.upstream.requests == []
    sent = lg4.requests[-1]
    assert sent["path"] == ("/v1/chat/completions" if api == "openai_chat" else "/v1/moderations")
    user = sent["body"]["messages"][-1]
    assert {"type": "image_url", "image_url": {"url": BOMB}} in user["content"]  # the image itself, not only text
    assert {"type": "text", "text": "What is in this picture?"} in user["content"]
    rec = last_audit(st)
    step = next(s for s in rec["steps"] if s["guard"] == "llama_guard")
    assert step["outcome"] == "block" and step["categories"] == ["S9"]
    assert rec["media"]["image"]["rule"] == "guard" and rec["media"]["image"]["inspected"] is True


@pytest.mark.parametrize(("face", "api"), GUARD_CASES[:3] + GUARD_CASES[4:])
def test_guarded_safe_image_relayed(media_stack, tmp_path, lg4, face, api) -> None:
    call, dialect, _, _, sent = FACES[face]
    st = media_stack(write_policy(tmp_path, "content:\n  images: guard\n", lg4.url, api), dialect)
    call(st)
    assert st.upstream.last.json()["messages"][0]["content"][1] == sent
    assert {"type": "image_url", "image_url": {"url": PNG}} in lg4.requests[-1]["body"]["messages"][-1]["content"]
    rec = last_audit(st)
    step = next(s for s in rec["steps"] if s["guard"] == "llama_guard")
    assert rec["status"] == 200 and step["verdict"] == "pass", step
    assert rec["media"]["image"]["inspected"] is True and step["details"]["images_checked"] == 1


def test_images_guard_without_a_vision_backend_is_a_policy_error(tmp_path) -> None:
    from gateway.policy.schema import PolicyError, load_policy

    path = write_policy(tmp_path, "content:\n  images: guard\n", "http://127.0.0.1:9/v1", "openai_completions")
    with pytest.raises(PolicyError) as e:
        load_policy(path)
    assert str(e.value).startswith(f"{path}:3:") and "accepts images" in str(e.value)


def test_images_guard_blocks_when_no_step_judged_the_images(tmp_path) -> None:
    """A step that answered on the text alone (a backend that fell back to a text-only model) does not
    count: under `images: guard` the request is blocked, never relayed with unjudged images."""
    import asyncio

    from gateway.policy.chain import PolicyRun
    from gateway.policy.schema import load_policy
    from gateway.types import Exchange, Message, Part, Verdict

    policy = load_policy(write_policy(tmp_path, "content:\n  images: guard\n", "http://127.0.0.1:9/v1"))
    step = next(s for s in policy.input.steps if s.guard_name == "llama_guard")
    seen: list = []

    async def text_only_check(inp) -> Verdict:
        seen.append(inp.context.get("images"))
        return Verdict(guard="llama_guard")  # a pass that says nothing about images

    step.guard.check = text_only_check  # type: ignore[method-assign]
    ex = Exchange(model="m", messages=[Message("user", [Part("text", "hi"), Part("image", image_url=PNG)])])
    run = PolicyRun(policy)
    assert run.check_content(ex).refused is None
    decision = asyncio.run(run.check_input(ex))
    assert seen == ["guard"] and decision.blocked and "no input step checked the images" in decision.message
    assert run.finish(400)["media"]["image"] == {
        "rule": "guard",
        "count": 1,
        "bytes": PNG_BYTES,
        "by_reference": 0,
        "inspected": True,
    }


def test_starter_allows_images_and_the_table_says_so() -> None:
    from gateway import readiness
    from gateway.starter import build

    p = build()
    assert p.content.describe() == {"images": "allow", "audio": "refuse", "files": "refuse"}
    desc = {
        "listen": "http://x",
        "config": "c",
        "upstreams": [],
        "routes": [],
        "policies": [readiness.describe_policy(p, True)],
    }
    assert desc["policies"][0]["content"] == {"images": "allow", "audio": "refuse", "files": "refuse"}
    assert "content: images allow (relayed unchecked, audited), audio refuse, files refuse" in readiness.render(desc)


def moderation_input(image: str) -> list[dict]:
    return [{"type": "text", "text": "What is in this picture?"}, {"type": "image_url", "image_url": {"url": image}}]


def test_moderations_answered_by_llama_guard_4_judge_the_image(media_stack, tmp_path, lg4) -> None:
    """/v1/moderations answered by the policy's llama_guard step: the image goes to Llama Guard 4."""
    st = media_stack(write_policy(tmp_path, "content:\n  images: guard\n", lg4.url, "llama_moderations"))
    bad = st.openai().moderations.create(model="Llama-Guard-4-12B", input=moderation_input(BOMB))
    assert (
        bad.results[0].flagged
        and {"type": "image_url", "image_url": {"url": BOMB}} in (lg4.requests[-1]["body"]["messages"][-1]["content"])
    )
    ok = st.openai().moderations.create(model="Llama-Guard-4-12B", input=moderation_input(PNG))
    assert not ok.results[0].flagged and st.upstream.requests == []


def test_moderations_with_an_image_the_guard_cannot_see_refused(media_stack, tmp_path, lg4) -> None:
    """A moderation result for an image nobody judged would read "not flagged": refused instead."""
    st = media_stack(write_policy(tmp_path, "content:\n  images: allow\n", lg4.url, "llama_moderations"))
    with pytest.raises(openai.BadRequestError) as e:
        st.openai().moderations.create(model="Llama-Guard-4-12B", input=moderation_input(PNG))
    assert e.value.code == "content_not_inspected" and "input[1]" in e.value.message and lg4.requests == []


def test_guardgate_check_applies_the_content_rule(tmp_path, capsys) -> None:
    """`guardgate check` judges a line as the server would: an image under a text-only policy is refused."""
    import argparse

    from gateway.check import add_check_parser, main_check

    line = {
        "id": "img",
        "messages": [
            {
                "role": "user",
                "content": [{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": PNG}}],
            }
        ],
    }
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text(json.dumps(line) + "\n")
    parser = argparse.ArgumentParser()
    add_check_parser(parser.add_subparsers(dest="command"))
    for content, blocked in (("", True), ("content:\n  images: allow\n", False)):
        args = parser.parse_args(
            ["check", "--policy", write_policy(tmp_path, content), "--input", str(inp), "--output", str(out)]
        )
        main_check(args)
        res = json.loads(out.read_text().splitlines()[-1])
        assert ("content: {images: allow}" in res.get("input_blocked", "")) is blocked
        assert res["media"]["image"]["rule"] == ("refuse" if blocked else "allow")
    capsys.readouterr()


def test_responses_audio_and_file_reach_the_chat_upstream_when_allowed(media_stack, tmp_path) -> None:
    """Responses `input_audio` / `input_file` become chat `input_audio` / `file` parts, unchanged."""
    st = media_stack(write_policy(tmp_path, "content:\n  audio: allow\n  files: allow\n"))
    st.openai().responses.create(
        model="gpt-test",
        input=[
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "Summarise both."},
                    {"type": "input_audio", "input_audio": {"data": "UklGRiQAAABXQVZF", "format": "wav"}},
                    {
                        "type": "input_file",
                        "file_data": "data:application/pdf;base64,JVBERi0xLjQK",
                        "filename": "a.pdf",
                    },
                    {"type": "input_file", "file_id": "file-abc"},
                ],
            }
        ],
    )
    assert st.upstream.last.json()["messages"][0]["content"][1:] == [
        {"type": "input_audio", "input_audio": {"data": "UklGRiQAAABXQVZF", "format": "wav"}},
        {"type": "file", "file": {"file_data": "data:application/pdf;base64,JVBERi0xLjQK", "filename": "a.pdf"}},
        {"type": "file", "file": {"file_id": "file-abc"}},
    ]
    media = last_audit(st)["media"]
    assert media["audio"]["count"] == 1 and media["file"] == {
        "rule": "allow",
        "count": 2,
        "bytes": 9,
        "by_reference": 1,
        "inspected": False,
    }


def test_llama_api_moderations_send_the_image_to_llama_guard_4(media_stack, tmp_path, lg4) -> None:
    st = media_stack(write_policy(tmp_path, "content:\n  images: guard\n", lg4.url, "openai_chat"), "llama")
    res = st.llama().moderations.create(messages=[{"role": "user", "content": moderation_input(BOMB)}])
    assert res.results[0].flagged and res.results[0].flagged_categories == ["S9"]
    assert {"type": "image_url", "image_url": {"url": BOMB}} in lg4.requests[-1]["body"]["messages"][-1]["content"]

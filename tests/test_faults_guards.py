"""Guard faults through the real server (issue 9): a guard that crashes, hangs, or is slower than
the stream, with both client dialects. test_policy_e2e covers on_error with the openai SDK on a
plain stream; here: the llama dialect (translated), the upstream being cancelled on a block, every
StreamCheck closed, no task left behind, and a slow guard that must not lose or reorder text.
"""

from __future__ import annotations

import time

import httpx
import policy_fakes  # noqa: F401  (registers the t_* guards)
import pytest
from aiohttp import web
from faults import FULL, WORDS, gateway_tasks, make_path_stack, read_stream
from harness import openai_text_stream, stream_frames, wait_until
from policy_fakes import OPENED, PhraseGuard

DIALECT_PATHS = ("gate", "translate-gate")


def stream_policy(guard: str, *, on_error: str = "block", timeout_ms: int = 300, every: int = 8,
                  unchecked: int = 0, options: str = "") -> str:
    return f"""
name: guard-faults
stream:
  check_every_tokens: {every}
  max_unchecked_tokens: {unchecked}
  steps:
    - guard: {guard}
      on_error: {on_error}
      timeout_ms: {timeout_ms}
      action: block
{options}
"""


def slow_words(delay: float = 0.005):
    async def handler(request: web.Request, up) -> web.StreamResponse:
        return await stream_frames(request, openai_text_stream(WORDS, usage=True), delay=delay)

    return handler


def stack_for(make_stack, tmp_path, path: str, policy: str, handler=None):
    """`translate-gate`: the llama SDK, translated, with the policy; `gate`: the openai SDK."""
    st = make_path_stack(make_stack, "gate", tmp_path, handler or slow_words(), policy=policy)
    return st, ("translate" if path == "translate-gate" else "gate")


def settle(st) -> None:
    assert wait_until(lambda: gateway_tasks(st) == [], timeout=3), gateway_tasks(st)
    assert OPENED and all(c.closed for c in OPENED), "a StreamCheck was never closed"


@pytest.mark.parametrize("path", DIALECT_PATHS)
@pytest.mark.parametrize("guard", ["t_raise", "t_sleep"])
def test_failing_guard_blocks_and_cancels_upstream(make_stack, tmp_path, path: str, guard: str) -> None:
    """on_error: block — the stream ends with content_filter in the client's dialect, nothing
    unchecked is released, and the upstream (which would stream for a while yet) is cancelled."""
    OPENED.clear()
    st, client = stack_for(make_stack, tmp_path, path, stream_policy(guard, timeout_ms=200),
                           handler=slow_words(0.05))
    t0 = time.monotonic()
    out = read_stream(st, client)
    assert time.monotonic() - t0 < 5  # the 200 ms timeout, not the 10 s t_sleep sleeps
    assert out.error is None
    assert out.finish == "content_filter" and out.text == ""
    # cut, not waited for: the upstream (2 s of words) is cancelled, never completes
    assert wait_until(lambda: st.upstream.disconnects == 1, timeout=5) and st.upstream.completed == 0
    settle(st)


@pytest.mark.parametrize("path", DIALECT_PATHS)
@pytest.mark.parametrize("guard", ["t_raise", "t_sleep"])
def test_failing_guard_allowed_releases_everything(make_stack, tmp_path, path: str, guard: str) -> None:
    OPENED.clear()
    st, client = stack_for(make_stack, tmp_path, path, stream_policy(guard, on_error="allow", timeout_ms=50,
                                                                     every=16))
    out = read_stream(st, client)
    assert out.error is None and out.text == FULL and out.finish == "stop"
    settle(st)


@pytest.mark.parametrize("path", DIALECT_PATHS)
def test_guard_slower_than_stream_loses_nothing(make_stack, tmp_path, path: str) -> None:
    """Each check takes 30 ms while the upstream sends a token every 1 ms: the gate holds text back
    and releases it in order once checked; every token arrives, once, and nothing before its check."""
    OPENED.clear()
    policy = stream_policy("t_phrase", every=4, timeout_ms=2000, options="      phrase: never-said\n"
                           "      delay: 0.03\n")
    st, client = stack_for(make_stack, tmp_path, path, policy, handler=slow_words(0.001))
    out = read_stream(st, client)
    assert out.error is None and out.text == FULL and out.finish == "stop"
    settle(st)
    guard = st.gateway.policies.get("guard-faults").stream.steps[0].guard
    assert isinstance(guard, PhraseGuard)
    windows = guard.windows
    assert windows[-1][2] is True  # a final check covered the end
    starts = [w[0] for w in windows]
    assert starts == sorted(starts)  # windows advance; never re-checked out of order


def test_slow_guard_past_its_timeout_follows_on_error(make_stack, tmp_path) -> None:
    OPENED.clear()
    policy = stream_policy("t_phrase", every=4, timeout_ms=20, on_error="block",
                           options="      phrase: never-said\n      delay: 0.2\n")
    st, client = stack_for(make_stack, tmp_path, "gate", policy)
    out = read_stream(st, client)
    assert out.finish == "content_filter" and out.text == ""
    settle(st)


def test_guard_flags_mid_stream_with_llama_client(make_stack, tmp_path) -> None:
    """A block found by a (slow) guard mid-stream reaches the llama SDK as stop_reason content_filter,
    with only checked text before it, and the upstream is cancelled."""
    OPENED.clear()
    policy = stream_policy("t_phrase", every=4, options="      phrase: tok20\n      delay: 0.01\n")
    st, client = stack_for(make_stack, tmp_path, "translate-gate", policy, handler=slow_words(0.03))
    out = read_stream(st, client)
    assert out.error is None and out.finish == "content_filter"
    assert "tok20" not in out.text and FULL.startswith(out.text)
    assert wait_until(lambda: st.upstream.disconnects == 1, timeout=3)
    settle(st)


@pytest.mark.parametrize("on_error,status", [("block", 400), ("allow", 200)])
def test_hanging_input_guard_honours_on_error(make_stack, tmp_path, on_error: str, status: int) -> None:
    policy = f"""
name: guard-faults
input:
  steps:
    - guard: t_sleep
      timeout_ms: 150
      on_error: {on_error}
      parallel_with_upstream: true
"""
    st = make_path_stack(make_stack, "gate", tmp_path, None, policy=policy)  # default: a JSON answer
    t0 = time.monotonic()
    r = httpx.post(st.url + "/v1/chat/completions", json={"model": "m", "messages": [{"role": "user",
                                                                                      "content": "x"}]})
    assert time.monotonic() - t0 < 5  # the 150 ms timeout, not the 10 s t_sleep sleeps
    assert r.status_code == status
    if status == 400:
        assert r.json()["error"]["code"] == "content_filter"
        assert r.headers["x-should-retry"] == "false"
    assert wait_until(lambda: gateway_tasks(st) == [], timeout=3), gateway_tasks(st)

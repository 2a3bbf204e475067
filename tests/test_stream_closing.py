"""Stream wrappers close their source when they are closed (`contextlib.aclosing`), so a client that
hangs up ends the gate's checks and the upstream call before the request finishes, not whenever the
garbage collector (or the event loop's async-generator finaliser) gets to a wrapper left suspended."""

from __future__ import annotations

import json
import socket
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web
from faults import policy_store
from harness import openai_text_stream, stream_frames, wait_until
from policy_fakes import OPENED

from gateway import batches
from gateway.context import RequestContext
from gateway.pipeline import Pipeline
from gateway.policy.rewrite import Unmasker
from gateway.types import Event, Exchange, Message, TextDelta


class Source:
    """An upstream of neutral events that notes when it is closed."""

    def __init__(self) -> None:
        self.closed = False

    async def events(self) -> AsyncIterator[Event]:
        try:
            for i in range(100):
                yield TextDelta(f"t{i} ")
        finally:
            self.closed = True


def _ctx() -> RequestContext:
    return RequestContext(id="r1", dialect="openai", meter_tokens=True)


EX = Exchange(model="m", messages=[Message.of("user", "hi")], stream=True)
# The stream path passes lists of events (one write each); `batches.rebatched` / `flat` convert.
WRAPPERS: dict[str, Callable[[AsyncIterator[Event]], Any]] = {
    "pipeline._remembering": lambda ev: Pipeline(None)._remembering(  # type: ignore[arg-type]
        _ctx(), EX, batches.rebatched(ev)),
    "batches.rebatched": lambda ev: batches.rebatched(ev),
    "batches.flat": lambda ev: batches.flat(batches.rebatched(ev)),
    "rewrite.Unmasker.stream": lambda ev: Unmasker({"<EMAIL_1>": "a@b.c"}).stream(ev),
}


@pytest.mark.parametrize("name", sorted(WRAPPERS))
async def test_closing_a_wrapper_closes_its_source_at_once(name: str) -> None:
    src = Source()
    events = src.events()  # held here: only the wrapper's own close can end it
    wrapper = WRAPPERS[name](events)
    first = await wrapper.__anext__()
    assert isinstance(first[0] if isinstance(first, list) else first, TextDelta)
    await wrapper.aclose()
    assert src.closed, f"{name} left its source suspended"


POLICY = """
name: closing
stream:
  check_every_tokens: 256
  steps:
    - guard: t_phrase
      phrase: never-said
      action: block
"""


class AuditAtWrite:
    """The audit log, written when the request ends: notes which stream checks were still open then."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.open_at_write: list[int] = []

    def write(self, record: dict[str, Any]) -> None:
        self.open_at_write.append(sum(1 for c in OPENED if not c.closed))
        self.records.append(record)


async def long_answer(request: web.Request, up: Any) -> web.StreamResponse:
    # more than the kernel buffers between the gateway and a client that stops reading can hold
    return await stream_frames(request, openai_text_stream([f"w{i} " for i in range(40000)]))


def _no_finaliser(leftovers: list[Any]) -> Any:
    """In the servers' loop: async generators dropped unclosed are kept, never finalised, so only an
    explicit close can end them (the hook the loop installs would close them later, in a task)."""

    async def swap() -> Any:
        old = sys.get_asyncgen_hooks()
        sys.set_asyncgen_hooks(firstiter=old.firstiter, finalizer=leftovers.append)
        return old

    return swap()


@pytest.mark.slow
def test_dropped_client_gate_cleanup_runs_before_the_request_ends(make_stack, tmp_path) -> None:
    """A client that stops reading a guarded Responses stream is cut by the gateway (the write fails
    after `send_timeout_s`; no cancellation unwinds the wrappers, only their closing). The stream runs
    through every wrapper (`_remembering` included: `responses_state: gateway`), and every stream
    check is closed by the time the request's audit record is written, with nothing left to a
    finaliser."""
    OPENED.clear()
    store, ppath = policy_store(tmp_path, POLICY)
    audit = AuditAtWrite()
    up = {"main": {"base_url": "SCRIPTED", "dialect": "openai", "timeouts": {"connect": 2, "read": 20}}}
    config = {"upstreams": up, "policy": ppath, "responses_state": "gateway", "limits": {"send_timeout_s": 0.5}}
    st = make_stack(config, handler=long_answer, policies=store, audit=audit)
    leftovers: list[Any] = []
    old = st.loop.run(_no_finaliser(leftovers))
    host, port = st.url.removeprefix("http://").split(":")
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: no autotuning
    s.connect((host, int(port)))
    body = json.dumps({"model": "m", "input": "hi", "stream": True}).encode()
    s.sendall(
        f"POST /v1/responses HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    try:
        s.settimeout(10)
        assert s.recv(1024).startswith(b"HTTP/1.1 200"), "the stream did not start"
        # the client reads no more; the gateway's writes stall and it cuts the client
        assert wait_until(lambda: bool(audit.records), timeout=30), "the request never ended"
    finally:
        s.close()
    assert OPENED, "the stream policy opened no check"
    assert audit.open_at_write == [0], "stream checks were still open when the request ended"

    async def restore() -> None:
        sys.set_asyncgen_hooks(*old)
        for agen in leftovers:
            await agen.aclose()

    st.loop.run(restore())

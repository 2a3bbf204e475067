"""Hot-path cost of the dialect layer, per stream event, measured side by side in one run.

    .venv/bin/python bench/bench_dialects.py [--events 20000]

Rows (µs per event; ratio vs the naive reference in the same run):
- parse:   our SSEParser vs the openai SDK's SSEDecoder on the same bytes (64 KiB TCP chunks)
- decode:  OpenAI/Llama chunk JSON → neutral events
- encode:  neutral events → OpenAI/Llama frames, vs a naive dict + json.dumps per chunk
- translate: Llama upstream bytes → OpenAI client bytes (parse + decode + encode), the whole path,
  vs the obvious parse + json.loads + dict + json.dumps
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

from openai._streaming import SSEDecoder

from gateway.dialects import get
from gateway.dialects.sse import SSEParser
from gateway.types import Exchange, Finish, Message, StreamStart, TextDelta, Usage, UsageEvent

OA, LL = get("openai"), get("llama")


def bench(fn: Callable[[], object], n: int, repeat: int = 5) -> float:
    """Best-of-`repeat` µs per event."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=20000)
    n = ap.parse_args().events
    words = [f"tok{i % 97} " if i % 5 else "héllo ✓ " for i in range(n)]
    events = [StreamStart("chatcmpl-bench", "model-x", 1700000000)] + [TextDelta(w) for w in words]
    events += [Finish("stop"), UsageEvent(Usage(10, n, n + 10))]
    ex = Exchange("model-x", [Message.of("user", "hi")], stream=True, include_usage=True)

    def enc_all(d: object) -> bytes:
        enc = d.stream_encoder(ex)  # type: ignore[attr-defined]
        return b"".join([enc.encode(e) for e in events]) + enc.end()

    oa_body, ll_body = enc_all(OA), enc_all(LL)
    chunk = 65536
    oa_chunks = [oa_body[i : i + chunk] for i in range(0, len(oa_body), chunk)]
    ll_chunks = [ll_body[i : i + chunk] for i in range(0, len(ll_body), chunk)]

    def parse_ours() -> None:
        p = SSEParser()
        for c in oa_chunks:
            p.feed(c)

    def parse_sdk() -> None:
        for _ in SSEDecoder().iter_bytes(iter(oa_chunks)):
            pass

    oa_events = [e for c in [oa_body] for e in SSEParser().feed(c)]
    ll_events = [e for c in [ll_body] for e in SSEParser().feed(c)]

    def decode(d: object, evs: list) -> Callable[[], None]:  # type: ignore[type-arg]
        def run() -> None:
            dec = d.stream_decoder()  # type: ignore[attr-defined]
            for e in evs:
                dec.feed(e.event, e.data)

        return run

    def json_loads_only(evs: list) -> Callable[[], None]:  # type: ignore[type-arg]
        def run() -> None:
            for e in evs:
                if e.data[0] == "{":
                    json.loads(e.data)

        return run

    def naive_openai_encode() -> None:
        out = []
        for e in events:
            if isinstance(e, TextDelta):
                chunk = {
                    "id": "chatcmpl-bench",
                    "object": "chat.completion.chunk",
                    "created": 1700000000,
                    "model": "model-x",
                    "choices": [
                        {"index": 0, "delta": {"content": e.text}, "logprobs": None, "finish_reason": None}
                    ],
                    "usage": None,
                }
                out.append(b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n")

    def translate() -> None:
        p, dec, enc = SSEParser(), LL.stream_decoder(), OA.stream_encoder(ex)
        out = []
        for c in ll_chunks:
            for sse in p.feed(c):
                for ev in dec.feed(sse.event, sse.data):
                    out.append(enc.encode(ev))
        out.append(enc.end())

    def naive_translate() -> None:  # the obvious implementation: loads, build a dict, dumps
        p = SSEParser()
        out = []
        for c in ll_chunks:
            for sse in p.feed(c):
                ev = json.loads(sse.data)["event"]
                chunk = {
                    "id": "chatcmpl-bench",
                    "object": "chat.completion.chunk",
                    "created": 1700000000,
                    "model": "model-x",
                    "choices": [
                        {"index": 0, "delta": {"content": ev["delta"].get("text", "")}, "logprobs": None}
                    ],
                    "usage": None,
                }
                out.append(b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n")

    rows = [
        ("parse  SSEParser (ours)", bench(parse_ours, n), "openai SDK SSEDecoder", bench(parse_sdk, n)),
        (
            "decode openai chunk",
            bench(decode(OA, oa_events), n),
            "json.loads alone",
            bench(json_loads_only(oa_events), n),
        ),
        (
            "decode llama event",
            bench(decode(LL, ll_events), n),
            "json.loads alone",
            bench(json_loads_only(ll_events), n),
        ),
        ("encode openai", bench(lambda: enc_all(OA), n), "dict + json.dumps", bench(naive_openai_encode, n)),
        ("encode llama", bench(lambda: enc_all(LL), n), "dict + json.dumps", bench(naive_openai_encode, n)),
        ("translate llama→openai", bench(translate, n), "naive loads/dict/dumps", bench(naive_translate, n)),
    ]
    print(f"{n} text events, {len(oa_body) / n:.0f} B/event (openai), µs per event, best of 5")
    print(f"{'path':28} {'ours':>8}   {'reference':24} {'ref':>8}  ratio")
    for name, ours, ref_name, ref in rows:
        print(f"{name:28} {ours:8.2f}   {ref_name:24} {ref:8.3f}  {ours / ref:5.2f}x")


if __name__ == "__main__":
    main()

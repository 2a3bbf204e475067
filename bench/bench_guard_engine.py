#!/usr/bin/env python3
"""The shared guard engine next to in-process guards, side by side in one run.

    python bench/bench_guard_engine.py                   # all parts
    python bench/bench_guard_engine.py --parts LR --shape lg3-1b-2l

Parts:
  L  Llama Guard on a 1,000-token streamed answer checked every 32 tokens (+ the final check): guard
     tokens evaluated and per-check latency, in-process vs through the guard engine (its HTTP app on
     loopback, the same llama.cpp engine behind it); the difference is what the hop adds per check.
     Model: random weights (scripts/make_tiny_gguf.py, `--shape`: tiny by default, lg3-1b-2l is Llama
     Guard 3 1B's width with 2 layers), the real Llama 3 vocabulary and the LG3-1B template.
  R  The same answer and checks through Llama Guard's `remote` backend with `api: llama_cpp` against a
     real llama.cpp server (`llama-server --parallel 2`, the same model; scripts/build_llama_server.sh),
     printed in the same table as L: the server's prompt cache and the stream's slot keep it
     incremental; the tokens are what the server reports it evaluated (`timings.prompt_n`).
  M  Resident memory of `guardgate serve --workers 2` with a Prompt Guard policy: the workers and the
     engine with `backend: auto` (the shared engine), and the workers with `backend: local` (each
     worker loads its own copy), next to a policy with no model guard. The Prompt Guard model is
     the crafted test classifier (tests/prompt_guard_fixtures.py: tiny), so what the figures show is
     the runtime a worker no longer carries (onnxruntime, tokenizers); a real model adds its weights
     (Prompt Guard 2 86M int8: ~90 MB; 22M: ~25 MB) to every worker in-process, once with the engine.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "tests"))

EVERY = 32


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


async def part_l(shape: str, tmp: Path, threads: int, parts: str, rounds: int = 3) -> None:
    from make_tiny_gguf import make_tiny_gguf
    from workers_fixtures import free_port

    from gateway.engine import EnginePool
    from gateway.guards.llama_guard import LlamaGuard
    from gateway.types import Message

    model = make_tiny_gguf(tmp / f"{shape}.gguf", shape=shape)
    opts = {"n_threads": threads, "n_ctx": 4096, "max_sessions": 4, "decode_categories": False, "prefix_cache_mb": 0}
    pool = EnginePool()
    local = LlamaGuard(model=str(model), pool=pool, backend="local", **opts)
    guards: dict[str, LlamaGuard] = {"in-process": local}
    procs: list[Any] = []
    if "L" in parts:
        port = free_port()  # the engine in a process of its own, as `serve --workers N` runs it
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "gateway.cli", "guards", "serve", "--port", str(port)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        await asyncio.sleep(0.5)
        for _ in range(200):
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                await asyncio.sleep(0.1)
        guards["engine"] = LlamaGuard(model=str(model), backend=f"http://127.0.0.1:{port}", **opts)
    server = None
    if "R" in parts:
        from llama_server_fixtures import MISSING, LlamaServer, find_llama_server

        binary = find_llama_server()
        if binary is None:
            print(f"\nR: skipped: {MISSING}")
        else:
            server = LlamaServer(binary, model, parallel=2, ctx=8192, threads=threads).wait_ready()
            remote = {"base_url": server.url, "api": "llama_cpp", "slots": 2, "timeout_s": 600}
            guards["llama-server"] = LlamaGuard(
                backend="remote", variant="lg3-1b", remote=remote, decode_categories=False
            )
    for g in guards.values():
        await g.start()
    assert local.model is not None
    words = "Mix flour, water, salt and yeast. Knead the dough for ten minutes and let it rise. " * 80
    toks = local.model.tokenize(words, special=False)[:1000]
    texts = [local.model.detokenize(toks[:n]) for n in [*range(EVERY, len(toks), EVERY), len(toks)]]
    msgs = [Message.of("user", "How do I bake bread at home?")]
    tokens: dict[str, int] = {}  # guard tokens per answer: the first round, every backend cold
    lats: dict[str, list[float]] = {name: [] for name in guards}
    hop: list[float] = []  # llama-server: the client's time for a check less the server's own time
    naive = 0
    names = list(guards)
    for rnd in range(rounds):
        # One stream per backend, open together, their checks interleaved (the order rotating at each
        # check): the machine's noise hits every backend alike.
        streams = {name: g.open_stream(msgs, f"bench-{rnd}-{name}") for name, g in guards.items()}
        totals = dict.fromkeys(names, 0)
        for i, text in enumerate(texts):
            k = i % len(names)
            for name in names[k:] + names[:k]:
                t0 = time.perf_counter()
                v = await streams[name].check(text, 0, i == len(texts) - 1)
                ms = (time.perf_counter() - t0) * 1000
                if i:  # the first check of a stream is a full prefill: latency over the incremental ones
                    lats[name].append(ms)
                    if "server_ms" in v.details:
                        hop.append(ms - float(v.details["server_ms"]))
                totals[name] += v.tokens_evaluated
                if name == "in-process" and rnd == 0:
                    naive += int(v.details.get("prompt_tokens") or 0)
        for sc in streams.values():
            await sc.close()
        if rnd == 0:
            tokens = totals
    lt = tokens["in-process"]
    p50l = statistics.median(lats["in-process"])
    print(
        f"\nL/R: Llama Guard ({shape}, {threads} threads), a {len(toks)}-token answer checked every {EVERY} "
        f"tokens ({len(texts)} checks), {rounds} rounds, the backends' checks interleaved; latency over the "
        "incremental checks (not the first)"
    )
    print(f"  naive full re-checks would evaluate {naive} guard tokens per answer")
    print(f"  {'backend':<14}{'tokens/answer':>14}{'x in-process':>14}{'p50 ms':>10}{'p90 ms':>10}{'+p50 ms':>10}")
    for name, lat in lats.items():
        p50, p90 = statistics.median(lat), _pct(lat, 0.9)
        print(f"  {name:<14}{tokens[name]:>14}{tokens[name] / lt:>14.3f}{p50:>10.2f}{p90:>10.2f}{p50 - p50l:>+10.2f}")
    if hop:
        print(
            f"  llama-server hop (a check's time less the server's own `timings`): p50 {statistics.median(hop):.2f} ms,"
            f" p90 {_pct(hop, 0.9):.2f} ms: HTTP, JSON, the server tokenizing the prompt text"
        )
    print(
        "  (engine: JSON over HTTP on loopback to `guardgate guards serve`; llama-server: `/completion` with"
        " cache_prompt and id_slot, --parallel 2)"
    )
    for g in guards.values():
        await g.aclose()
    await pool.aclose()
    for proc in procs:
        proc.terminate()
        proc.wait()
    if server is not None:
        server.stop()


def _served(tmp: Path, policy: str | None, upstream: str) -> tuple[dict[str, int], int | None]:
    """RSS (kB) of the workers and the engine of one `serve --workers 2` with `policy`."""
    import httpx
    from workers_fixtures import Served, gateway_yaml, rss_kb

    conf = gateway_yaml(tmp, upstream, policy=policy, name=f"gw-{time.monotonic_ns()}.yaml")
    s = Served(tmp, conf, 2, args=() if policy else ("--policy", "none")).wait_ready()
    try:
        for i in range(20):  # every worker has served a guarded request
            httpx.post(
                s.url + "/v1/chat/completions",
                timeout=30,
                headers={"Connection": "close"},
                json={"model": "m", "messages": [{"role": "user", "content": f"hello {i}"}]},
            )
        time.sleep(1)
        workers = {str(p): rss_kb(p) for p in s.worker_pids()}
        engine = s.engine_pid()
        return workers, rss_kb(engine) if engine else None
    finally:
        s.stop()


def part_m(tmp: Path) -> None:
    import prompt_guard_fixtures as F
    from workers_fixtures import upstream as upstream_fixture

    model = F.write_trigger_model(tmp / "pg")
    gen = upstream_fixture.__wrapped__()
    _, url = next(gen)
    rows = []
    steps = {
        "regex only (no model guard)": "    - guard: regex\n      patterns: [zebra]\n      action: block\n",
        "Prompt Guard, shared engine": f"    - guard: prompt_guard\n      model: {model}\n      threads: 1\n"
        "      backend: auto\n      action: block\n",
        "Prompt Guard, in each worker": f"    - guard: prompt_guard\n      model: {model}\n      threads: 1\n"
        "      backend: local\n      action: block\n",
    }
    for i, (name, step) in enumerate(steps.items()):
        p = tmp / f"pol-{i}.yaml"
        p.write_text(f"name: pol{i}\ninput:\n  steps:\n{step}")
        workers, engine = _served(tmp, str(p), url)
        rows.append((name, workers, engine))
    base = statistics.mean(rows[0][1].values())
    print("\nM: resident memory of `guardgate serve --workers 2` (MB), after 20 requests")
    print(f"  {'policy':<32}{'per worker':>12}{'vs none':>10}{'engine':>10}{'total':>10}")
    for name, workers, engine in rows:
        per = statistics.mean(workers.values())
        total = sum(workers.values()) + (engine or 0)
        print(
            f"  {name:<32}{per / 1024:>12.1f}{(per - base) / 1024:>+10.1f}"
            f"{(engine or 0) / 1024:>10.1f}{total / 1024:>10.1f}"
        )
    try:
        next(gen)
    except StopIteration:
        pass


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", default="LRM")
    ap.add_argument("--shape", default="tiny", help="scripts/make_tiny_gguf.py shape for parts L and R")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="parts L and R: streams per backend")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="gg-bench-engine-") as d:
        tmp = Path(d)
        if "L" in a.parts or "R" in a.parts:
            asyncio.run(part_l(a.shape, tmp, a.threads, a.parts, a.rounds))
        if "M" in a.parts:
            part_m(tmp)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Prompt Guard 2 latency at the real 22M and 86M shapes on a few CPU threads, side by side.

Random weights (the real checkpoints are gated), real architecture: DebertaV2ForSequenceClassification
with DeBERTa-v3-xsmall (22M: 12 layers, hidden 384, FFN 1536, 6 heads, vocab 128,100) and
mDeBERTa-v3-base (86M: 12 layers, hidden 768, FFN 3072, 12 heads, vocab 251,000) shapes, converted by
scripts/convert_prompt_guard.py. Measures, in one run, ms per 64-token prompt and per 512-token
window (batch 1, median of N) for PyTorch eager, ONNX Runtime fp32 and int8 variants, plus the
whole guard path (tokenize, window, worker hop) and 4-window batching. Goal (issue 6): 22M <= 39 ms
and 86M <= 185 ms per 512-token window on 2 cores.

    .venv/bin/python bench/bench_prompt_guard.py [--sizes 22m,86m] [--threads 2] [--work DIR]
    .venv/bin/python bench/bench_prompt_guard.py --concurrent 16 --sizes 22m   # cross-request batching

Needs the `convert` extra. Conversions are cached in --work (default /tmp/guardgate-bench-pg).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# PyTorch's OpenMP workers busy-wait between ops by default; ONNX Runtime runs here (and in the
# guard) with spinning off. Passive waiting keeps the comparison fair on a shared machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

SHAPES: dict[str, dict[str, int]] = {
    "22m": dict(vocab_size=128_100, hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                intermediate_size=1536),
    "86m": dict(vocab_size=251_000, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                intermediate_size=3072),
}
GOAL_MS = {"22m": 39.0, "86m": 185.0}


def load_converter() -> Any:
    path = ROOT / "scripts" / "convert_prompt_guard.py"
    spec = importlib.util.spec_from_file_location("convert_prompt_guard", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def make_checkpoint(size: str, path: Path) -> None:
    """Random weights at the real shape (DeBERTa-v3 relative attention settings) + a small tokenizer."""
    import prompt_guard_fixtures as F
    import torch
    import transformers

    if (path / "config.json").exists():
        return
    torch.manual_seed(0)
    cfg = transformers.DebertaV2Config(
        **SHAPES[size], max_position_embeddings=512, relative_attention=True, position_buckets=256,
        pos_att_type=["p2c", "c2p"], max_relative_positions=-1, position_biased_input=False, type_vocab_size=0,
        norm_rel_ebd="layer_norm", share_att_key=True, hidden_act="gelu", layer_norm_eps=1e-7, pad_token_id=0,
        num_labels=2, id2label={0: "BENIGN", 1: "MALICIOUS"}, label2id={"BENIGN": 0, "MALICIOUS": 1},
    )
    model = transformers.DebertaV2ForSequenceClassification(cfg).eval()
    model.save_pretrained(path)
    transformers.DebertaV2TokenizerFast(vocab=F.vocab(), unk_id=3).save_pretrained(path)


def convert_all(conv: Any, size: str, work: Path) -> dict[str, Path]:
    """The converter's default output (dynamo export, fp32 + pre-processed int8), then variants."""
    ckpt, out = work / f"{size}-ckpt", work / f"{size}-onnx"
    make_checkpoint(size, ckpt)
    if not (out / "metadata.json").exists():
        conv.convert(ckpt, out, name=f"bench-{size}", check=False)
    files = {"fp32": out / "model.onnx", "int8": out / "model.int8.onnx"}
    variants: dict[str, dict[str, Any]] = {
        "int8-no-preprocess": {"preprocess": False},
        "int8-per-channel": {"per_channel": True},
        "int8-reduce-range": {"reduce_range": True},
    }
    for name, kw in variants.items():
        p = out / f"model.{name}.onnx"
        if not p.exists():
            conv.quantize_int8(files["fp32"], p, **kw)
        files[name] = p
    fast = work / f"{size}-onnx-fast"
    if not (fast / "metadata.json").exists():
        conv.convert(ckpt, fast, name=f"bench-{size}-fast", check=False, fast=True)
    files["fast-fp32"], files["fast-int8"] = fast / "model.onnx", fast / "model.int8.onnx"
    return files


def timeit(fn: Callable[[], Any], runs: int, warmup: int = 2) -> tuple[float, float, float]:
    """(median wall ms, min wall ms, median process CPU ms) over `runs` calls.

    CPU time is the figure to trust on a shared machine: contention stretches wall time, not the
    work done; CPU ms / threads is what the wall time would be on otherwise idle cores.
    """
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(runs):
        t, c = time.perf_counter(), time.process_time()
        fn()
        wall.append((time.perf_counter() - t) * 1000)
        cpu.append((time.process_time() - c) * 1000)
    return statistics.median(wall), min(wall), statistics.median(cpu)


def ids_of(n: int, vocab: int, batch: int = 1) -> Any:
    import numpy as np

    rng = np.random.default_rng(n)
    ids = rng.integers(5, min(vocab, 30_000), size=(batch, n), dtype=np.int64)
    ids[:, 0], ids[:, -1] = 1, 2
    return ids


Row = tuple[str, str, float, float, float]  # label, tokens, median ms, min ms, cpu ms


def bench_size(conv: Any, size: str, work: Path, threads: int, runs: int) -> list[Row]:
    import numpy as np
    import torch
    import transformers

    from gateway.guards.prompt_guard import make_session

    rows: list[Row] = []
    t0 = time.perf_counter()
    files = convert_all(conv, size, work)
    print(f"[{size}] models ready in {time.perf_counter() - t0:.0f} s: "
          + ", ".join(f"{k} {p.stat().st_size / 1e6:.0f} MB" for k, p in files.items()), file=sys.stderr)
    vocab = SHAPES[size]["vocab_size"]
    lengths = (64, 512)

    def n_runs(n: int) -> int:
        return runs if n == 64 else max(3, runs // 3)

    torch.set_num_threads(threads)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        work / f"{size}-ckpt", local_files_only=True).eval()

    def run_torch(ids: Any) -> Any:
        with torch.inference_mode():
            return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits

    ref: dict[int, Any] = {}
    for n in lengths:
        ids = torch.from_numpy(ids_of(n, vocab))
        rows.append(("pytorch eager fp32", str(n), *timeit(lambda ids=ids: run_torch(ids), n_runs(n))))
        ref[n] = run_torch(ids).double().softmax(-1).numpy()

    variants: list[tuple[str, str, dict[str, Any]]] = [
        ("onnx fp32", "fp32", {}),
        ("onnx int8 (converter default)", "int8", {}),
        ("onnx int8, no quant pre-processing", "int8-no-preprocess", {}),
        ("onnx int8 per-channel", "int8-per-channel", {}),
        ("onnx int8 reduce-range", "int8-reduce-range", {}),
        ("onnx fp32 --fast-attention", "fast-fp32", {}),
        ("onnx int8 --fast-attention", "fast-int8", {}),
        ("onnx int8, spinning threads", "int8", {"allow_spinning": True}),
    ]
    for label, key, kw in variants:
        sess = make_session(files[key], ["cpu"], threads, **kw)
        for n in lengths:
            feed = {"input_ids": ids_of(n, vocab), "attention_mask": np.ones((1, n), dtype=np.int64)}
            med, best, cpu = timeit(lambda feed=feed, sess=sess: sess.run(["logits"], feed), n_runs(n))
            logits = sess.run(["logits"], feed)[0].astype(np.float64)
            p = np.exp(logits - logits.max(-1, keepdims=True))
            dp = float(abs(p / p.sum(-1, keepdims=True) - ref[n]).max())
            rows.append((label, str(n), med, best, cpu))
            print(f"[{size}] {label:36s} {n:4d} tok  median {med:7.1f}  min {best:7.1f}  cpu {cpu:7.1f} ms  "
                  f"max|dP| vs torch {dp:.1e}", file=sys.stderr)
        if key == "int8" and not kw:
            feed4 = {"input_ids": ids_of(512, vocab, 4), "attention_mask": np.ones((4, 512), dtype=np.int64)}
            med, best, cpu = timeit(lambda s=sess, f=feed4: s.run(["logits"], f), max(3, runs // 5), warmup=1)
            rows.append((label + " 4 windows/call, per window", "512", med / 4, best / 4, cpu / 4))
        del sess

    rows.extend(bench_guard(files["int8"].parent, threads, runs))
    return rows


def bench_guard(model_dir: Path, threads: int, runs: int) -> list[Row]:
    """The whole guard path: hardening, tokenization, windows, worker thread, ORT, verdict."""
    import prompt_guard_fixtures as F

    from gateway.guards.base import GuardInput
    from gateway.guards.prompt_guard import PromptGuard
    from gateway.types import Message

    g = PromptGuard(model=str(model_dir), threads=threads, cache_size=0)
    out = []

    async def main() -> None:
        await g.start()
        assert g.scorer is not None
        for n_words in (62, 510):  # one word = one token with the bench tokenizer
            text = F.filler_text(n_words, seed=n_words)
            inp = GuardInput(stage="input", messages=[Message.of("user", text)])
            ts, cs = [], []
            for i in range(runs if n_words < 100 else max(3, runs // 3) + 2):
                t, c = time.perf_counter(), time.process_time()
                v = await g.check(inp)
                if i >= 2:
                    ts.append((time.perf_counter() - t) * 1000)
                    cs.append((time.process_time() - c) * 1000)
            assert v.ran, v.error
            out.append(("guard.check(), int8, whole path", str(v.tokens_evaluated), statistics.median(ts),
                        min(ts), statistics.median(cs)))
        await g.aclose()

    asyncio.run(main())
    return out


def bench_concurrent(model_dir: Path, threads: int, n: int, rounds: int) -> None:
    """`n` requests at once (one user message each, 20-120 words), `rounds` times: requests/s and
    latency with cross-request batching (windows of all waiting requests in one job) and without
    (one job per request), interleaved, same texts, verdict cache off."""
    import random

    import prompt_guard_fixtures as F

    from gateway.guards.base import GuardInput
    from gateway.guards.prompt_guard import PromptGuard
    from gateway.types import Message

    rng = random.Random(0)
    texts = [[F.filler_text(rng.randint(20, 120), seed=r * n + i) for i in range(n)] for r in range(rounds)]

    async def run(batching: bool) -> tuple[float, list[float], int, int]:
        g = PromptGuard(model=str(model_dir), threads=threads, cache_size=0, cross_request_batching=batching)
        await g.start()
        await g.check(GuardInput(stage="input", messages=[Message.of("user", texts[0][0])]))  # warm-up
        calls0 = g.stats["inference_calls"]
        lat: list[float] = []

        async def one(text: str) -> None:
            t = time.perf_counter()
            v = await g.check(GuardInput(stage="input", messages=[Message.of("user", text)]))
            assert v.ran, v.error
            lat.append((time.perf_counter() - t) * 1000)

        t0 = time.perf_counter()
        for batch in texts:
            await asyncio.gather(*(one(t) for t in batch))
        wall = time.perf_counter() - t0
        calls = g.stats["inference_calls"] - calls0
        await g.aclose()
        return wall, lat, calls, g.stats["jobs"] - 1

    async def main() -> None:
        res: dict[bool, tuple[float, list[float], int, int]] = {}
        for _ in range(2):  # interleaved; the faster run of each is kept (other processes only slow one)
            for batching in (False, True):
                r = await run(batching)
                if batching not in res or r[0] < res[batching][0]:
                    res[batching] = r
        print(f"\n## {n} concurrent requests x {rounds} rounds, {threads} threads, int8")
        print("| cross-request batching | requests/s | model calls | jobs | p50 ms | p95 ms |")
        print("|---|---:|---:|---:|---:|---:|")
        for batching in (False, True):
            wall, lat, calls, jobs = res[batching]
            lat.sort()
            print(f"| {'on' if batching else 'off'} | {n * rounds / wall:.0f} | {calls} | {jobs} | "
                  f"{statistics.median(lat):.0f} | {lat[int(0.95 * (len(lat) - 1))]:.0f} |")
        print(f"speed-up: {res[False][0] / res[True][0]:.2f}x")

    asyncio.run(main())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="22m,86m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=20, help="timed runs for 64 tokens (fewer for 512)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/guardgate-bench-pg"))
    ap.add_argument("--concurrent", type=int, default=0,
                    help="only measure this many concurrent requests, with and without cross-request batching")
    ap.add_argument("--rounds", type=int, default=8, help="--concurrent: rounds of concurrent requests")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.concurrent:
        conv = load_converter()
        for size in args.sizes.split(","):
            ckpt, out = args.work / f"{size}-ckpt", args.work / f"{size}-onnx"
            make_checkpoint(size, ckpt)
            if not (out / "metadata.json").exists():
                conv.convert(ckpt, out, name=f"bench-{size}", check=False)
            bench_concurrent(out, args.threads, args.concurrent, args.rounds)
        return 0
    import onnxruntime
    import torch

    conv = load_converter()
    print(f"# Prompt Guard 2 shapes, random weights, {args.threads} threads, batch 1; ms per call: wall median,"
          " wall min, process CPU median, CPU / threads (= wall on idle cores)")
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
          f"onnxruntime {onnxruntime.__version__}")
    for size in args.sizes.split(","):
        rows = bench_size(conv, size, args.work, args.threads, args.runs)
        eager = {n: cpu for lbl, n, _, _, cpu in rows if lbl.startswith("pytorch")}
        print(f"\n## {size}  (goal: <= {GOAL_MS[size]:.0f} ms per 512-token window on {args.threads} cores)")
        print(f"{'variant':48s} {'tokens':>6s} {'median':>8s} {'min':>8s} {'cpu':>8s} {'cpu/thr':>8s} {'vs eager':>8s}")
        for lbl, n, med, best, cpu in rows:
            ratio = f"{eager[n] / cpu:7.2f}x" if n in eager else ""
            print(f"{lbl:48s} {n:>6s} {med:8.1f} {best:8.1f} {cpu:8.1f} {cpu / args.threads:8.1f} {ratio:>8s}")
        cands = [(cpu / args.threads, best, lbl) for lbl, n, _, best, cpu in rows
                 if n == "512" and not lbl.startswith(("pytorch", "guard"))]
        est, best, lbl = min(cands)
        verdict = "met" if est <= GOAL_MS[size] else f"{est / GOAL_MS[size]:.1f}x over"
        print(f"best per 512-token window: {lbl}: {est:.1f} ms (cpu/threads; wall min {best:.1f} ms); "
              f"goal {GOAL_MS[size]:.0f} ms: {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Write random-weight Llama-architecture GGUFs with the real Llama 3 vocabulary, for tests and benchmarks.

The vocabulary (tokens, merges, special ids) is copied from the vocab-only Llama 3 GGUF that
llama.cpp ships (`models/ggml-vocab-llama-bpe.gguf`, inside the llama-cpp-python sdist), so
tokenization is exactly Llama Guard 3's. The Llama Guard 3 chat template is embedded
(`--template lg3-1b|lg3-8b|none`).

    make_tiny_gguf.py tiny.gguf                      # 2 layers, hidden 64: ~17 MB, loads in ms
    make_tiny_gguf.py lg3-1b.gguf --shape lg3-1b --quantize Q4_K_M   # LG3-1B's exact shape, 955 MB
    make_tiny_gguf.py rig.gguf --rig " bomb"         # a deterministic toy guard (see below)

`--rig WORD[,WORD]` builds a hand-wired "guard": layer 0 attends uniformly over the context and
carries a flag when any trigger token is present; the output layer is a bigram table, so greedy
decoding after the prompt yields `unsafe\\nS1<|eot_id|>` when a trigger occurs and
`safe<|eot_id|>` otherwise (prompts rendered with a trailing "\\n\\n" after the assistant header).
It lets tests exercise verdicts, thresholds and category decoding with real llama.cpp inference.
"""

from __future__ import annotations

import argparse
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

VOCAB_NAME = "ggml-vocab-llama-bpe.gguf"
CACHE = Path(os.environ.get("GUARDGATE_CACHE", Path.home() / ".cache" / "guardgate"))


@dataclass(frozen=True)
class Shape:
    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    n_head_kv: int = 2
    n_ff: int = 128
    tied: bool = True  # share token_embd as output (halves the file; LG3 itself is untied)


SHAPES = {
    "tiny": Shape(),
    # Llama-Guard-3-1B (Llama 3.2 1B): 2048 hidden, 16 layers, 32/8 heads, FFN 8192, untied output.
    "lg3-1b": Shape(n_layer=16, n_embd=2048, n_head=32, n_head_kv=8, n_ff=8192, tied=False),
    # LG3-1B's layer at full width but only 2 layers (tied output): ~8x faster per token, with the
    # same ratio of attention work per cached KV cell to weight work per token as LG3-1B, so
    # scaling with live sessions measures the same on 2 CPU cores in a minute instead of ten.
    "lg3-1b-2l": Shape(n_layer=2, n_embd=2048, n_head=32, n_head_kv=8, n_ff=8192, tied=True),
}


# --------------------------------------------------------------------------- vocabulary


def find_llama3_vocab(download: bool = True) -> Path:
    """Locate llama.cpp's vocab-only Llama 3 GGUF: env, our cache, or the llama-cpp-python sdist."""
    env = os.environ.get("GUARDGATE_LLAMA3_VOCAB")
    if env and Path(env).is_file():
        return Path(env)
    cached = CACHE / "vocab" / VOCAB_NAME
    if cached.is_file():
        return cached
    sdists = sorted(CACHE.glob("llama_cpp_python-*.tar.gz"))
    if not sdists and download:
        sdists = [_download_sdist()]
    for sdist in sdists:
        with tarfile.open(sdist) as tf:
            for m in tf.getmembers():
                if m.name.endswith("vendor/llama.cpp/models/" + VOCAB_NAME):
                    cached.parent.mkdir(parents=True, exist_ok=True)
                    src = tf.extractfile(m)
                    assert src is not None
                    tmp = cached.with_suffix(".tmp")
                    with open(tmp, "wb") as out:
                        shutil.copyfileobj(src, out)
                    tmp.replace(cached)
                    return cached
    raise FileNotFoundError(
        f"{VOCAB_NAME} not found; set GUARDGATE_LLAMA3_VOCAB or put the llama-cpp-python sdist in {CACHE}"
    )


def _download_sdist() -> Path:
    try:
        from importlib.metadata import version

        spec = f"llama-cpp-python=={version('llama-cpp-python')}"
    except Exception:
        spec = "llama-cpp-python"
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as d:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                "--no-deps",
                "--no-binary",
                ":all:",
                spec,
                "-d",
                d,
            ],
            check=True,
        )
        (src,) = Path(d).glob("llama_cpp_python-*.tar.gz")
        dst = CACHE / src.name
        shutil.move(str(src), dst)
        return dst


_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_NP = {
    0: "<u1",
    1: "<i1",
    2: "<u2",
    3: "<i2",
    4: "<u4",
    5: "<i4",
    6: "<f4",
    7: "?",
    10: "<u8",
    11: "<i8",
    12: "<f8",
}


def read_gguf_kv(path: Path) -> dict[str, tuple[int, int | None, Any]]:
    """Key/values of a GGUF file: {key: (type, array subtype, value)}.

    A small parser of our own: gguf-py's reader takes ~8 s on the 280k-merge Llama 3 vocabulary.
    """
    data = Path(path).read_bytes()
    if data[:4] != b"GGUF":
        raise ValueError(f"{path}: not a GGUF file")
    off = 8
    _n_tensors, n_kv = struct.unpack_from("<QQ", data, off)
    off += 16

    def string(o: int) -> tuple[str, int]:
        (n,) = struct.unpack_from("<Q", data, o)
        return data[o + 8 : o + 8 + n].decode("utf-8", "surrogateescape"), o + 8 + n

    out: dict[str, tuple[int, int | None, Any]] = {}
    for _ in range(n_kv):
        key, off = string(off)
        (vt,) = struct.unpack_from("<I", data, off)
        off += 4
        if vt == 8:
            val, off = string(off)
            out[key] = (vt, None, val)
        elif vt == 9:
            st, n = struct.unpack_from("<IQ", data, off)
            off += 12
            if st == 8:
                items = []
                for _ in range(n):
                    item, off = string(off)
                    items.append(item)
                out[key] = (vt, st, items)
            else:
                arr = np.frombuffer(data, dtype=_NP[st], count=n, offset=off)
                off += arr.nbytes
                out[key] = (vt, st, arr.tolist())
        else:
            fmt = _SCALARS[vt]
            (val,) = struct.unpack_from(fmt, data, off)
            off += struct.calcsize(fmt)
            out[key] = (vt, None, val)
    return out


def _copy_tokenizer(writer: Any, vocab_path: Path, eos_id: int | None) -> int:
    from gguf import GGUFValueType

    n_vocab = 0
    for name, (vt, st, value) in read_gguf_kv(vocab_path).items():
        if not name.startswith("tokenizer."):
            continue
        if name == "tokenizer.ggml.tokens":
            n_vocab = len(value)
        if name == "tokenizer.ggml.eos_token_id" and eos_id is not None:
            value = eos_id
        if vt == GGUFValueType.ARRAY:
            writer.add_key_value(name, value, GGUFValueType(vt), sub_type=GGUFValueType(st))
        else:
            writer.add_key_value(name, value, GGUFValueType(vt))
    return n_vocab


# --------------------------------------------------------------------------- writer


def _tokenize(vocab_path: Path, text: str) -> list[int]:
    import llama_cpp.llama_cpp as C

    from gateway.engine import quiet_llama_logs

    quiet_llama_logs()
    p = C.llama_model_default_params()
    p.vocab_only = True
    m = C.llama_model_load_from_file(str(vocab_path).encode(), p)
    try:
        v = C.llama_model_get_vocab(m)
        b = text.encode()
        buf = (C.llama_token * (len(b) + 8))()
        n = C.llama_tokenize(v, b, len(b), buf, len(b) + 8, False, True)
        return list(buf[:n])
    finally:
        C.llama_model_free(m)


def make_tiny_gguf(
    path: str | os.PathLike[str],
    *,
    shape: Shape | str = "tiny",
    template: str = "lg3-1b",
    seed: int = 0,
    dtype: str = "f16",
    rig: Sequence[str] | None = None,
    rig_category: str = "S1",
    vocab: str | os.PathLike[str] | None = None,
    name: str = "tiny-llama-guard",
) -> Path:
    """Write a random-weight (or rigged) Llama GGUF with the Llama 3 vocabulary; returns the path."""
    import gguf

    from gateway.guards.llama_guard import LG3_1B_TEMPLATE, LG3_8B_TEMPLATE

    sh = SHAPES[shape] if isinstance(shape, str) else shape
    if rig:
        sh = Shape(sh.n_layer, max(sh.n_embd, 32), sh.n_head, sh.n_head_kv, sh.n_ff, tied=False)
    vocab_path = Path(vocab) if vocab else find_llama3_vocab()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_name(name)
    w.add_context_length(131072)
    w.add_embedding_length(sh.n_embd)
    w.add_block_count(sh.n_layer)
    w.add_feed_forward_length(sh.n_ff)
    w.add_head_count(sh.n_head)
    w.add_head_count_kv(sh.n_head_kv)
    w.add_rope_dimension_count(sh.n_embd // sh.n_head)
    w.add_rope_freq_base(500000.0)
    w.add_layer_norm_rms_eps(1e-5)
    ftype = {"f16": gguf.LlamaFileType.MOSTLY_F16, "f32": gguf.LlamaFileType.ALL_F32}[dtype]
    w.add_file_type(ftype)
    n_vocab = _copy_tokenizer(w, vocab_path, eos_id=128009)  # LG3 GGUFs end turns with <|eot_id|>
    w.add_vocab_size(n_vocab)
    tmpl = {"lg3-1b": LG3_1B_TEMPLATE, "lg3-8b": LG3_8B_TEMPLATE, "none": None}[template]
    if tmpl is not None:
        w.add_chat_template(tmpl)

    wdt = np.float16 if dtype == "f16" else np.float32
    rng = np.random.default_rng(seed)
    E, F, L = sh.n_embd, sh.n_ff, sh.n_layer
    hd = E // sh.n_head
    kv = hd * sh.n_head_kv

    def rand(*shp: int, std: float = 0.02) -> np.ndarray:
        n = int(np.prod(shp))
        if n > 1 << 22:  # big tensors: tile a random block (speed does not depend on values)
            block = (rng.standard_normal(1 << 20) * std).astype(wdt)
            return np.resize(block, shp)
        return (rng.standard_normal(shp) * std).astype(wdt)

    # gguf-py takes numpy arrays in (rows, cols) = (out, in) order, as the HF converters write them.
    tensors: dict[str, np.ndarray] = {}
    emb = rand(n_vocab, E)
    norm = np.ones(E, dtype=np.float32)
    tensors["token_embd.weight"] = emb
    tensors["output_norm.weight"] = norm
    if not sh.tied:
        tensors["output.weight"] = rand(n_vocab, E)
    for i in range(L):
        tensors[f"blk.{i}.attn_norm.weight"] = norm.copy()
        tensors[f"blk.{i}.attn_q.weight"] = rand(E, E)
        tensors[f"blk.{i}.attn_k.weight"] = rand(kv, E)
        tensors[f"blk.{i}.attn_v.weight"] = rand(kv, E)
        tensors[f"blk.{i}.attn_output.weight"] = rand(E, E)
        tensors[f"blk.{i}.ffn_norm.weight"] = norm.copy()
        tensors[f"blk.{i}.ffn_gate.weight"] = rand(F, E)
        tensors[f"blk.{i}.ffn_up.weight"] = rand(F, E)
        tensors[f"blk.{i}.ffn_down.weight"] = rand(E, F)
    if rig:
        _rig(tensors, vocab_path, rig, rig_category, sh, wdt)
    for k, v in tensors.items():
        w.add_tensor(k, v)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.replace(out)
    return out


def _rig(tensors: dict, vocab_path: Path, triggers: Sequence[str], category: str, sh: Shape, wdt) -> None:
    """Hand-wire a toy guard: flag = any trigger token in context; bigram answer chain."""
    E = sh.n_embd
    hd = E // sh.n_head
    emb = tensors["token_embd.weight"].astype(np.float32)
    out = tensors["output.weight"].astype(np.float32)
    trig_ids = []
    for t in triggers:
        ids = _tokenize(vocab_path, t)
        if len(ids) != 1:
            raise ValueError(f"trigger {t!r} is not a single token: {ids}")
        trig_ids.append(ids[0])
    tok = {s: _tokenize(vocab_path, s) for s in ("\n\n", "unsafe", "safe", "\n", "<|eot_id|>")}
    code = _tokenize(vocab_path, category)  # e.g. S1 -> [S, 1]
    chain = [tok["\n\n"][0], tok["unsafe"][0], tok["\n"][0], *code, tok["<|eot_id|>"][0], tok["safe"][0]]
    D_FLAG, D_TRIG = 0, 1
    dims = {t: 2 + i for i, t in enumerate(dict.fromkeys(chain))}  # one private dimension per chain token
    reserved = 2 + len(dims)
    # Embeddings: chain tokens are pure one-hot; triggers one-hot on D_TRIG; others avoid reserved dims.
    emb[:, :reserved] = 0.0
    for t, d in dims.items():
        emb[t] = 0.0
        emb[t, d] = 1.0
    for t in trig_ids:
        emb[t] = 0.0
        emb[t, D_TRIG] = 1.0
    # Layer 0: Q = 0 -> uniform attention over the context; V picks D_TRIG; O writes it to D_FLAG.
    G = 100.0
    for i in range(sh.n_layer):
        tensors[f"blk.{i}.attn_q.weight"] = np.zeros_like(tensors[f"blk.{i}.attn_q.weight"])
        tensors[f"blk.{i}.attn_v.weight"] = np.zeros_like(tensors[f"blk.{i}.attn_v.weight"])
        tensors[f"blk.{i}.attn_output.weight"] = np.zeros_like(tensors[f"blk.{i}.attn_output.weight"])
        tensors[f"blk.{i}.ffn_down.weight"] = np.zeros_like(tensors[f"blk.{i}.ffn_down.weight"])
    v = np.zeros((hd * sh.n_head_kv, E), np.float32)
    v[0, D_TRIG] = 1.0  # kv head 0, channel 0
    o = np.zeros((E, E), np.float32)
    o[D_FLAG, 0] = G  # query head 0 (uses kv head 0), channel 0
    tensors["blk.0.attn_v.weight"] = v.astype(wdt)
    tensors["blk.0.attn_output.weight"] = o.astype(wdt)
    # Output: bigram table on the private dims; verdict at "\n\n" depends on the flag.
    S, K, delta = 20.0, 100.0, 0.002
    out[:, :reserved] = 0.0
    nn_, unsafe, safe, nl, eot = (tok[s][0] for s in ("\n\n", "unsafe", "safe", "\n", "<|eot_id|>"))
    succ = [(unsafe, nl), (nl, code[0])]
    succ += list(zip(code, [*code[1:], eot], strict=True))
    succ.append((safe, eot))
    for t in {safe, unsafe, *(nxt for _, nxt in succ)}:
        out[t] = 0.0
    out[safe, dims[nn_]] = S * K * delta  # safe unless the flag exceeds K * delta
    out[unsafe, D_FLAG] = S
    for prev, nxt in succ:
        out[nxt, dims[prev]] = S * K
    tensors["token_embd.weight"] = emb.astype(wdt)
    tensors["output.weight"] = out.astype(wdt)


def make_dense_llama4_stub(path: str | os.PathLike[str], vocab: str | os.PathLike[str] | None = None) -> Path:
    """A GGUF shaped like a converted Llama Guard 4 (dense llama4: expert_count = 0), no real weights.

    llama.cpp refuses it exactly as it refuses LG4 ("llama4 model cannot have zero experts"):
    tests use it to exercise the in-process probe and the fallback to a remote backend.
    """
    import gguf

    out = Path(path)
    w = gguf.GGUFWriter(str(out), "llama4")
    w.add_name("dense-llama4-stub")
    w.add_context_length(4096)
    w.add_embedding_length(64)
    w.add_block_count(2)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_rope_freq_base(500000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_expert_count(0)
    w.add_expert_used_count(0)
    w.add_expert_feed_forward_length(128)
    w.add_uint32("llama4.interleave_moe_layer_step", 1)
    _copy_tokenizer(w, Path(vocab) if vocab else find_llama3_vocab(), None)
    w.add_tensor("token_embd.weight", np.zeros((8, 64), np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def quantize(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], ftype: str = "Q4_K_M", threads: int = 2
) -> Path:
    """Quantize a GGUF with llama.cpp (`llama_model_quantize`)."""
    import llama_cpp.llama_cpp as C

    from gateway.engine import quiet_llama_logs

    quiet_llama_logs()
    params = C.llama_model_quantize_default_params()
    params.ftype = getattr(C, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = threads
    rc = C.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize failed ({rc})")
    return Path(dst)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--layers", type=int)
    ap.add_argument("--hidden", type=int)
    ap.add_argument("--template", choices=["lg3-1b", "lg3-8b", "none"], default="lg3-1b")
    ap.add_argument("--dtype", choices=["f16", "f32"], default="f16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rig", help="comma-separated trigger words (each one Llama 3 token, e.g. ' bomb')")
    ap.add_argument("--rig-category", default="S1")
    ap.add_argument("--quantize", metavar="TYPE", help="e.g. Q4_K_M (writes OUT; the f16 goes to OUT.f16)")
    a = ap.parse_args(argv)
    sh = SHAPES[a.shape]
    if a.layers or a.hidden:
        sh = Shape(a.layers or sh.n_layer, a.hidden or sh.n_embd, sh.n_head, sh.n_head_kv, sh.n_ff, sh.tied)
    target = Path(a.out)
    raw = target.with_name(target.name + ".f16") if a.quantize else target
    make_tiny_gguf(
        raw,
        shape=sh,
        template=a.template,
        seed=a.seed,
        dtype=a.dtype,
        rig=a.rig.split(",") if a.rig else None,
        rig_category=a.rig_category,
    )
    if a.quantize:
        quantize(raw, target, a.quantize)
        raw.unlink()
    print(f"{target}: {target.stat().st_size:,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())

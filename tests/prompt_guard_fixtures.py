"""Offline fixtures for the Prompt Guard tests: a DeBERTa-v2-style tokenizer and crafted ONNX models.

Nothing here downloads anything. The tokenizer is built the way transformers 5 builds
`DebertaV2TokenizerFast` (Unigram + Metaspace + [CLS] $A [SEP]) over a small hand-made vocabulary;
the crafted classifier is a real ONNX graph (embedding lookup -> masked max over tokens -> logits)
whose embedding table makes chosen tokens push chosen classes, so a test knows the right answer.
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Mapping, Sequence
from pathlib import Path

SPECIALS = ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"]  # DeBERTa-v3 order: PAD 0, CLS 1, SEP 2, UNK 3

_WORD_LIST = """
the of and to in is you that it he was for on are as with his they at be this have from or one had
by word but not what all were we when your can said there use an each which she do how their if will
up other about out many then them these so some her would make like him into time has look two more
write go see number no way could people my than first water been call who oil its now find long down
day did get come made may part over new sound take only little work know place year live me back
give most very after thing our just name good sentence man think say great where help through much
before line right too mean old any same tell boy follow came want show also around form three small
set put end does another well large must big even such because turn here why ask went men read need
land different home us move try kind hand picture again change off play spell air away animal house
point page letter mother answer found study still learn should america world ignore previous
instructions system prompt reveal secret password admin rules
"""
WORDS = _WORD_LIST.split()

TRIGGER = "ignore"  # the crafted model's MALICIOUS token
SUSPICIOUS = "instructions"  # a token that raises the score a little
FILLER = [w for w in WORDS if w not in {"ignore", "previous", "instructions", "system", "prompt", "reveal",
                                        "secret", "password", "admin", "rules"}]


def vocab() -> list[tuple[str, float]]:
    """(piece, log-prob) pairs: specials, whole words (with and without the word-start mark), characters."""
    pieces: list[tuple[str, float]] = [(s, 0.0) for s in SPECIALS]
    pieces.append(("▁", -6.0))
    seen = {p for p, _ in pieces}
    for w in dict.fromkeys(WORDS):
        for p, score in ((f"▁{w}", -3.0), (w, -4.0)):
            if p not in seen:
                pieces.append((p, score))
                seen.add(p)
    for c in string.ascii_letters + string.digits + string.punctuation:
        for p, score in ((f"▁{c}", -9.0), (c, -10.0)):
            if p not in seen:
                pieces.append((p, score))
                seen.add(p)
    return pieces


def make_tokenizer():  # -> tokenizers.Tokenizer
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    tok = Tokenizer(models.Unigram(vocab(), unk_id=SPECIALS.index("[UNK]"), byte_fallback=False))
    tok.normalizer = normalizers.Sequence([
        normalizers.Replace(Regex(r"\s{2,}|[\n\r\t]"), " "),
        normalizers.NFC(),
        normalizers.Strip(left=False, right=True),
    ])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0",
        pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 1), ("[SEP]", 2)],
    )
    tok.add_special_tokens(SPECIALS)
    return tok


def filler_text(n_words: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(FILLER) for _ in range(n_words))


def write_trigger_model(
    directory: Path,
    labels: Sequence[str] = ("BENIGN", "MALICIOUS"),
    pushes: Mapping[str, Sequence[float]] | None = None,
    file_name: str = "model.onnx",
    metadata: bool = True,
) -> Path:
    """A crafted classifier: logits = max over unmasked tokens of E[token].

    Every token's row is [2, -2, ...] (benign); rows in `pushes` (word -> row) override it. With
    the defaults the trigger word gives P(MALICIOUS) ~ 0.9997 wherever it is in a window, the
    suspicious word ~0.27, anything else sigmoid(-4) ~ 0.018.
    """
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    directory.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer()
    n_labels = len(labels)
    if pushes is None:
        pushes = {TRIGGER: [-10.0, 10.0], SUSPICIOUS: [2.0, 1.0]} if n_labels == 2 else {}
    table = np.full((tok.get_vocab_size(), n_labels), -2.0, dtype=np.float32)
    table[:, 0] = 2.0
    for word, row in pushes.items():
        table[tok.token_to_id(f"▁{word}")] = np.asarray(row, dtype=np.float32)
    nodes = [
        helper.make_node("Gather", ["E", "input_ids"], ["emb"], axis=0),
        helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["maskf", "axis2"], ["mask3"]),
        helper.make_node("Mul", ["emb", "mask3"], ["kept"]),
        helper.make_node("Sub", ["mask3", "one"], ["neg"]),  # 0 where kept, -1 where padding
        helper.make_node("Mul", ["neg", "big"], ["penalty"]),
        helper.make_node("Add", ["kept", "penalty"], ["masked"]),
        helper.make_node("ReduceMax", ["masked"], ["logits"], axes=[1], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "trigger_classifier",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", n_labels])],
        initializer=[
            numpy_helper.from_array(table, "E"),
            numpy_helper.from_array(np.asarray([2], dtype=np.int64), "axis2"),
            numpy_helper.from_array(np.asarray(1.0, dtype=np.float32), "one"),
            numpy_helper.from_array(np.asarray(1.0e4, dtype=np.float32), "big"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(directory / file_name))
    tok.save(str(directory / "tokenizer.json"))
    if metadata:
        (directory / "metadata.json").write_text(json.dumps({
            "format": "guardgate.prompt_guard/1",
            "model_id": f"test/trigger-{n_labels}",
            "labels": list(labels),
            "max_length": 512,
            "special_tokens": {"cls_token_id": 1, "sep_token_id": 2, "pad_token_id": 0},
        }))
    return directory

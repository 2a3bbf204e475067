"""Prompt Guard model files: the converter's directory layout, `metadata.json`, tokenizer, ONNX session."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.guards.base import GuardConfigError

if TYPE_CHECKING:  # optional runtime deps (the `promptguard` extra), imported lazily
    import onnxruntime
    import tokenizers

log = logging.getLogger("guardgate.guards.prompt_guard")

METADATA_FILE = "metadata.json"
TOKENIZER_FILE = "tokenizer.json"
MODEL_FILES = {"fp32": "model.onnx", "int8": "model.int8.onnx"}
METADATA_FORMAT = "guardgate.prompt_guard/1"

PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "dml": "DmlExecutionProvider",
    "directml": "DmlExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "migraphx": "MIGraphXExecutionProvider",
}
GRAPH_OPT_LEVELS = ("disabled", "basic", "extended", "all")


# --------------------------------------------------------------------------- model files


def resolve_model_dir(name_or_path: str | os.PathLike[str]) -> tuple[Path, str | None]:
    """A model option -> (model directory, explicit .onnx file name or None).

    An existing path is used as is (a directory, or an .onnx file inside one). Anything else is a
    manifest name: `gateway.models.resolve_model` gives its file (an entry whose `file` is e.g.
    `prompt-guard-2-86m/model.int8.onnx`); an entry with no file is looked up as the directory
    the converter writes by default, `<models dir>/<name>/`.
    """
    p = Path(name_or_path).expanduser()
    if not p.exists():
        from gateway.models import models_dir, resolve_model

        try:
            p = Path(resolve_model(str(name_or_path)))
        except Exception as e:
            converted = models_dir() / str(name_or_path)
            if not (converted / METADATA_FILE).is_file():
                raise GuardConfigError(
                    f"prompt_guard: cannot resolve model {name_or_path!r}: {e} (convert a checkpoint with "
                    f"scripts/convert_prompt_guard.py --name {name_or_path} to put it in {converted})"
                ) from e
            p = converted
    if p.is_file() and p.suffix == ".onnx":
        return p.parent, p.name
    if not p.is_dir():
        raise GuardConfigError(f"prompt_guard: model {str(p)!r} is not a model directory or .onnx file")
    return p, None


@dataclass(slots=True)
class ModelInfo:
    """What `metadata.json` says about a converted checkpoint (with defaults for a bare export)."""

    directory: Path
    model_file: Path
    precision: str  # fp32 | int8 | custom
    labels: list[str]
    max_length: int = 512
    model_id: str = ""
    cls_token_id: int | None = None
    sep_token_id: int | None = None
    pad_token_id: int | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """Identity of the scoring function for the verdict cache: model, file, size, mtime."""
        st = self.model_file.stat()
        return f"{self.model_id}|{self.model_file.name}|{st.st_size}|{int(st.st_mtime)}"

    @classmethod
    def load(cls, directory: Path, precision: str = "auto", model_file: str | None = None,
             prefer_fp32: bool = False) -> ModelInfo:
        meta_path = directory / METADATA_FILE
        meta: dict[str, Any] = {}
        if meta_path.exists():
            try:
                meta = json.loads(meta_path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise GuardConfigError(f"prompt_guard: unreadable {meta_path}: {e}") from e
        if meta.get("format", METADATA_FORMAT) != METADATA_FORMAT:
            raise GuardConfigError(f"prompt_guard: {meta_path} is {meta.get('format')!r}, not {METADATA_FORMAT}")
        files = {**MODEL_FILES, **(meta.get("files") or {})}
        if model_file is not None:
            chosen, prec = directory / model_file, "custom"
            for k, v in files.items():
                if v == model_file:
                    prec = k
        else:
            if precision == "auto":
                order = ["fp32", "int8"] if prefer_fp32 else ["int8", "fp32"]
            elif precision in ("int8", "fp32"):
                order = [precision]
            else:
                raise GuardConfigError(f"prompt_guard: precision must be auto, int8 or fp32: {precision!r}")
            found = [(p, directory / files[p]) for p in order if (directory / files[p]).exists()]
            if not found:
                want = " or ".join(files[p] for p in order)
                raise GuardConfigError(f"prompt_guard: {directory} has no {want}")
            prec, chosen = found[0]
        if not chosen.exists():
            raise GuardConfigError(f"prompt_guard: {chosen} does not exist")
        if not (directory / TOKENIZER_FILE).exists():
            raise GuardConfigError(f"prompt_guard: {directory} has no {TOKENIZER_FILE}")
        labels = meta.get("labels")
        if not labels:
            n = int(meta.get("num_labels") or 2)
            labels = ["BENIGN", "MALICIOUS"] if n == 2 else ["BENIGN", "INJECTION", "JAILBREAK"][:n]
        special = meta.get("special_tokens") or {}
        return cls(
            directory=directory,
            model_file=chosen,
            precision=prec,
            labels=[str(x) for x in labels],
            max_length=int(meta.get("max_length") or 512),
            model_id=str(meta.get("model_id") or directory.name),
            cls_token_id=special.get("cls_token_id"),
            sep_token_id=special.get("sep_token_id"),
            pad_token_id=special.get("pad_token_id"),
            raw=meta,
        )


def load_tokenizer(path: Path) -> tokenizers.Tokenizer:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    tok.no_truncation()  # windows are cut here, never by the tokenizer
    tok.no_padding()
    return tok


def make_session(
    model_file: Path, providers: Sequence[str] = ("cpu",), threads: int = 0,
    graph_optimization: str = "all", allow_spinning: bool = False,
) -> onnxruntime.InferenceSession:
    """An ONNX Runtime session with the first available of `providers` (aliases or EP names)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    wanted = [PROVIDER_ALIASES.get(p.lower(), p) for p in providers]
    usable = [p for p in wanted if p in available]
    if not usable:
        raise GuardConfigError(
            f"prompt_guard: none of the execution providers {wanted} is available "
            f"(this onnxruntime has {available})"
        )
    if len(usable) < len(wanted):
        log.warning("prompt_guard: execution providers %s unavailable, using %s",
                    [p for p in wanted if p not in available], usable)
    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[graph_optimization]
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Spinning workers burn the cores between requests, which the event loop and the other guards
    # (llama.cpp) on the same machine need; a few hundred microseconds of wake-up is the price.
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
    so.log_severity_level = 3
    return ort.InferenceSession(str(model_file), sess_options=so, providers=usable)


# --------------------------------------------------------------------------- scoring core

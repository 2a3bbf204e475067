"""Prompt Guard 2 (and 1) on ONNX Runtime.

Modules: `metadata` (model directory, `metadata.json`, tokenizer, ONNX session), `scorer` (windows,
batching of rows, scores), `batcher` (cross-request batching, verdict cache), `guard` (the
`prompt_guard` policy step; importing this package registers it).
"""

from gateway.guards.prompt_guard.batcher import WindowBatcher
from gateway.guards.prompt_guard.guard import CHAIN_KEYS, ROLE_GROUPS, PromptGuard
from gateway.guards.prompt_guard.metadata import (
    GRAPH_OPT_LEVELS,
    METADATA_FILE,
    METADATA_FORMAT,
    MODEL_FILES,
    PROVIDER_ALIASES,
    TOKENIZER_FILE,
    ModelInfo,
    load_tokenizer,
    make_session,
    resolve_model_dir,
)
from gateway.guards.prompt_guard.scorer import (
    BatchStats,
    InputTooLong,
    PromptGuardScorer,
    TextScore,
    harden_whitespace,
    window_starts,
)

__all__ = [
    "CHAIN_KEYS",
    "GRAPH_OPT_LEVELS",
    "METADATA_FILE",
    "METADATA_FORMAT",
    "MODEL_FILES",
    "PROVIDER_ALIASES",
    "ROLE_GROUPS",
    "TOKENIZER_FILE",
    "BatchStats",
    "InputTooLong",
    "ModelInfo",
    "PromptGuard",
    "PromptGuardScorer",
    "TextScore",
    "WindowBatcher",
    "harden_whitespace",
    "load_tokenizer",
    "make_session",
    "resolve_model_dir",
    "window_starts",
]

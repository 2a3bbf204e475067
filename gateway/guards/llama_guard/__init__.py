"""Llama Guard 3 (in-process through llama.cpp, or the machine's shared guard engine) and Llama Guard 4 remote.

Modules: `prompt` (categories, templates, rendering, conversation turns), `parsing` (the answer,
P(unsafe)), `remote` (Llama API / OpenAI-compatible servers), `guard` (the `llama_guard` policy
step and its incremental stream check; importing this package registers it), `stats`.
"""

from gateway.guards.llama_guard.guard import LlamaGuard, LlamaGuardStream
from gateway.guards.llama_guard.parsing import parse_output
from gateway.guards.llama_guard.prompt import (
    LG3_1B_CODES,
    LG3_1B_TEMPLATE,
    LG3_8B_CODES,
    LG3_8B_TEMPLATE,
    LG3_CATEGORIES,
    Style,
    Turn,
    conversation_turns,
    render_lg3,
    render_with_template,
    template_takes_categories,
)
from gateway.guards.llama_guard.remote import RemoteOptions
from gateway.guards.llama_guard.stats import GuardStats
from gateway.guards.llama_guard.vision import completion_prompt as render_lg4

__all__ = [
    "LG3_1B_CODES",
    "LG3_1B_TEMPLATE",
    "LG3_8B_CODES",
    "LG3_8B_TEMPLATE",
    "LG3_CATEGORIES",
    "GuardStats",
    "LlamaGuard",
    "LlamaGuardStream",
    "RemoteOptions",
    "Style",
    "Turn",
    "conversation_turns",
    "parse_output",
    "render_lg3",
    "render_lg4",
    "render_with_template",
    "template_takes_categories",
]

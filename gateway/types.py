"""Neutral types shared by every layer.

Only `dialects/` knows wire formats; everything else speaks these types. A request becomes an
`Exchange`; an upstream answer becomes either a `Completion` (non-stream) or an async iterator of
`Event`s (stream); guards return `Verdict`s.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Literal

# Actions by precedence: when several apply to one request, the strongest wins. "ignore" (a CodeShield
# severity mapped to no action) ranks with "allow". The one ranking of the project.
ACTION_RANK: dict[str, int] = {"allow": 0, "ignore": 0, "log": 1, "warn": 2, "redact": 3, "block": 4}


def strongest(*actions: str | None, default: str = "allow") -> str:
    """The action of highest precedence among `actions` (`default` when none ranks above it)."""
    best = default
    for a in actions:
        if a is not None and ACTION_RANK[a] > ACTION_RANK[best]:
            best = a
    return best


Role = Literal["system", "developer", "user", "assistant", "tool"]
Stage = Literal["input", "stream", "output"]


# --------------------------------------------------------------------------- messages


# The kinds of model-written text an assistant answer carries (its *channels*). Every one is
# guarded; "text" is the content proper and the only channel `Message.text` joins.
TEXT_CHANNELS = ("text", "refusal", "reasoning", "transcript")


# Content parts no text guard reads (the policy's `content:` rule decides each kind: refuse, allow,
# or, for images, guard with a model that sees them). Part.type -> the policy's key for its kind.
MEDIA_KINDS: dict[str, str] = {"image": "images", "audio": "audio", "file": "files"}


@dataclass(slots=True)
class Part:
    """One content part of a message: text, a media part (`image`, `audio`, `file`: carried as the
    client sent it, re-encoded unchanged toward the upstream), or (assistant answers only) text of
    another channel: `refusal`, `reasoning` (reasoning_content), `transcript` (spoken audio's text).

    Media fields: `image_url` (an https or `data:` URL), `detail` (OpenAI image/file detail), `data`
    (audio: base64; file: `file_data`, usually a `data:` URL), `format` (audio: wav | mp3), `file_id`
    (a file stored upstream: no guard can read it), `filename`. `path` and `wire_type` say where the
    decoder found the part (`messages[1].content[0]`, `image_url`), for errors and the audit.
    """

    type: Literal["text", "image", "audio", "file", "refusal", "reasoning", "transcript"]
    text: str = ""
    image_url: str | None = None
    detail: str | None = None
    data: str | None = None
    format: str | None = None
    file_id: str | None = None
    filename: str | None = None
    path: str | None = field(default=None, compare=False)
    wire_type: str | None = field(default=None, compare=False)


@dataclass(slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str = ""  # a JSON string, as both dialects carry it


@dataclass(slots=True)
class Message:
    role: Role
    parts: list[Part] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)
    tool_call_id: str | None = None
    name: str | None = None
    stop_reason: str | None = None  # Llama API echoes it on assistant turns

    @classmethod
    def of(cls, role: Role, text: str) -> Message:
        return cls(role=role, parts=[Part("text", text)])

    @property
    def text(self) -> str:
        """All text parts joined: what a text guard reads."""
        return "".join(p.text for p in self.parts if p.type == "text")


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


@dataclass(slots=True)
class Exchange:
    """A decoded chat request, whatever dialect it came in."""

    model: str
    messages: list[Message]
    stream: bool = False
    include_usage: bool = False  # OpenAI stream_options.include_usage (Llama always sends metrics)
    # Sampling and tool parameters in neutral names: temperature, top_p, top_k, max_tokens, stop,
    # seed, tools ([{name, description, parameters, strict}]), tool_choice, response_format, user,
    # repetition_penalty, frequency_penalty, presence_penalty, n.
    params: dict[str, Any] = field(default_factory=dict)
    # Fields of the client's dialect with no neutral counterpart, kept for a same-dialect upstream.
    extra: dict[str, Any] = field(default_factory=dict)
    # State of the client's API that is neither sent upstream nor shown to a guard: what a
    # translating codec must echo back in its answer (the Responses API's `store`, `metadata`,
    # request echo fields, `previous_response_id`, ...; see gateway/dialects/responses.py). No
    # request encoder reads it, and `policy.chain.request_fields` does not walk it (none of it is
    # rendered to the model).
    client: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Attached:
    """A dialect value that rides on an answer's model-written text (OpenAI `annotations`, audio
    data, `logprobs`): it either carries text (`text`, guarded as a segment of its own) or is derived
    from the message's channels (`channels`). The gate keeps it only when the choice was not blocked
    and that text and every one of those channels reached the client verbatim; otherwise it is
    dropped (a redacted transcript's audio would still say the redacted words)."""

    dialect: str
    key: str
    value: Any
    text: str = ""
    channels: tuple[str, ...] = ()


@dataclass(slots=True)
class Choice:
    """One answer of a non-stream completion: the message every guard checks, and its finish."""

    message: Message
    finish_reason: str = "stop"  # stop | length | tool_calls | content_filter | function_call
    index: int = 0
    attached: list[Attached] = field(default_factory=list)


@dataclass(slots=True, init=False)
class Completion:
    """A non-stream chat answer: one `Choice` per generated answer (`n`), all guarded.

    `message` / `finish_reason` read and write choice 0 (most answers have one choice), so
    `Completion(id, model, message, finish_reason, ...)` builds a one-choice answer.
    """

    id: str
    model: str
    choices: list[Choice]
    usage: Usage | None
    created: int
    extra: dict[str, Any]

    def __init__(self, id: str, model: str, message: Message | None = None, finish_reason: str = "stop",
                 usage: Usage | None = None, created: int | None = None, extra: dict[str, Any] | None = None,
                 *, choices: list[Choice] | None = None) -> None:
        self.id, self.model, self.usage = id, model, usage
        self.created = int(time.time()) if created is None else created
        self.extra = {} if extra is None else extra
        if choices is None:
            choices = [Choice(message if message is not None else Message("assistant"), finish_reason)]
        elif message is not None:
            raise TypeError("Completion: pass either message/finish_reason or choices")
        self.choices = choices

    @property
    def message(self) -> Message:
        return self.choices[0].message

    @message.setter
    def message(self, m: Message) -> None:
        self.choices[0].message = m

    @property
    def finish_reason(self) -> str:
        return self.choices[0].finish_reason

    @finish_reason.setter
    def finish_reason(self, r: str) -> None:
        self.choices[0].finish_reason = r


# --------------------------------------------------------------------------- stream events


@dataclass(slots=True)
class StreamStart:
    """First event of a stream: identity shared by every chunk the client sees."""

    id: str
    model: str
    created: int = field(default_factory=lambda: int(time.time()))
    # Per-dialect chunk fields with no neutral meaning, namespaced by dialect name
    # (e.g. {"openai": {"system_fingerprint": ...}}); re-emitted only by that dialect's encoder.
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class TextDelta:
    text: str
    index: int = 0  # choice index
    channel: str = "text"  # one of TEXT_CHANNELS (or "@<n>": a one-shot Attached's text, never sent)


@dataclass(slots=True)
class ToolCallDelta:
    """A fragment of a tool call; the first fragment of a call carries id and name."""

    call_index: int
    arguments: str = ""
    id: str | None = None
    name: str | None = None
    index: int = 0  # choice index


@dataclass(slots=True)
class Finish:
    reason: str  # stop | length | tool_calls | content_filter
    index: int = 0


@dataclass(slots=True)
class UsageEvent:
    usage: Usage


@dataclass(slots=True)
class Annotation:
    """Guardgate's own in-band decision record, rendered on the final chunk."""

    data: dict[str, Any]


Event = StreamStart | TextDelta | ToolCallDelta | Finish | UsageEvent | Annotation


# --------------------------------------------------------------------------- guard verdicts


@dataclass(slots=True)
class TextEdit:
    """Input stage: one span of the request's text to rewrite before it goes upstream (`redact`).

    Addressed by message index, part index (`Message.parts[part]`; a negative `part` -(k+1) is
    `tool_calls[k].arguments`) and character offsets within that text. `replacement` None means the
    step's `notice`; a guard that masks (pii) gives its own placeholder.
    """

    message: int
    part: int
    start: int
    end: int
    replacement: str | None = None


@dataclass(slots=True)
class Verdict:
    """What one guard said about one piece of input or output.

    `error` set means the guard did not produce a verdict (crash, timeout, not run): such a
    verdict is never a pass; the step's `on_error` decides what happens.
    """

    guard: str
    flagged: bool = False
    score: float | None = None
    categories: list[str] = field(default_factory=list)
    reason: str = ""
    latency_ms: float = 0.0
    tokens_evaluated: int = 0
    error: str | None = None
    # Stream stage: character span of the guarded text this verdict is about (redact target),
    # and the offset from which the guard asks the gate to hold text back (e.g. an open code block).
    span: tuple[int, int] | None = None
    hold_from: int | None = None
    details: dict[str, Any] = field(default_factory=dict)
    # Input stage: where to rewrite the request when the effective action is `redact`.
    edits: list[TextEdit] = field(default_factory=list)
    # Input stage: placeholder -> original value, put back into the answer for the client (pii
    # `unmask`). Never recorded: it holds exactly the values the audit must not keep.
    restore: dict[str, str] = field(default_factory=dict)

    @property
    def ran(self) -> bool:
        return self.error is None

    def to_record(self) -> dict[str, Any]:
        rec: dict[str, Any] = {
            "guard": self.guard,
            "verdict": "error" if self.error else ("flagged" if self.flagged else "pass"),
            "flagged": self.flagged,
            "score": self.score,
            "categories": list(self.categories),
            "latency_ms": round(self.latency_ms, 3),
            "tokens_evaluated": self.tokens_evaluated,
        }
        if self.reason:
            rec["reason"] = self.reason
        if self.error:
            rec["error"] = self.error
        if self.details:
            rec["details"] = self.details
        return rec


def new_id(prefix: str) -> str:
    """`prefix` and 24 random hex digits (96 bits: what uuid4().hex[:24] gave, at a fifth of its cost)."""
    return prefix + os.urandom(12).hex()


def coalesced(events: list[Event]) -> list[Event]:
    """`events` with each run of adjacent text deltas of one channel (or argument fragments of one
    tool call) as one delta; the text, the calls and the order are the same. What arrived together
    is guarded as one piece, and what is released together leaves as one frame per run."""
    out: list[Event] = []
    run: list[str] = []
    for ev in events:
        prev = out[-1] if out else None
        if type(ev) is TextDelta and type(prev) is TextDelta and ev.index == prev.index \
                and ev.channel == prev.channel:
            run.append(ev.text)
            continue
        if type(ev) is ToolCallDelta and type(prev) is ToolCallDelta and ev.id is None and ev.name is None \
                and ev.call_index == prev.call_index and ev.index == prev.index:
            run.append(ev.arguments)
            continue
        _close_run(out, run)
        out.append(ev)
        run = [ev.text if type(ev) is TextDelta else ev.arguments if type(ev) is ToolCallDelta else ""]
    _close_run(out, run)
    return out


def _close_run(out: list[Event], run: list[str]) -> None:
    if len(run) > 1:
        ev = out[-1]
        if type(ev) is TextDelta:
            out[-1] = TextDelta("".join(run), ev.index, ev.channel)
        elif type(ev) is ToolCallDelta:
            out[-1] = ToolCallDelta(ev.call_index, "".join(run), ev.id, ev.name, ev.index)

"""The policy's `content:` rule: what happens to content parts no text guard reads.

    content:
      images: refuse | allow | guard   # guard: Llama Guard 4 (remote) sees them with the conversation
      audio: refuse | allow
      files: refuse | allow

Under a policy that inspects anything, every kind defaults to `refuse` (deny by default): the request
is answered 400 `content_not_inspected` in the client's dialect, naming the part and the policy line
that would let it through. `allow` relays the parts as the client sent them and records them in the
audit as uninspected (kind, count, bytes). `guard` (images only) hands them to the policy's input
`llama_guard` steps whose remote backend accepts images (the Llama API moderations endpoint, an
OpenAI-compatible server running Llama Guard 4 with its vision projector); a request whose images no
step checked is blocked, never relayed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote_to_bytes

from gateway.errors import GatewayError
from gateway.types import MEDIA_KINDS, Message, Part, Verdict
from gateway.yamlio import ConfigError, Fields, line_of

RULES: dict[str, tuple[str, ...]] = {
    "images": ("refuse", "allow", "guard"),
    "audio": ("refuse", "allow"),
    "files": ("refuse", "allow"),
}
DEFAULT = "refuse"
KIND_OF_KEY = {v: k for k, v in MEDIA_KINDS.items()}  # "images" -> "image"
# What a guard that checked a request's images says in its verdict (Verdict.details): how many.
CHECKED_KEY = "images_checked"
_NOUN = {"images": "an image", "audio": "audio", "files": "a file"}


@dataclass(frozen=True, slots=True)
class ContentRules:
    """One rule per kind of media part (keys of `RULES`), with where the policy set them."""

    images: str = DEFAULT
    audio: str = DEFAULT
    files: str = DEFAULT
    file: str | None = None
    line: int | None = None  # the `content:` key's line (None: not in the policy, all defaults)
    lines: dict[str, int] = field(default_factory=dict)

    def rule(self, kind: str) -> str:
        """The rule for a Part.type (`image`, `audio`, `file`)."""
        return str(getattr(self, MEDIA_KINDS[kind]))

    def describe(self) -> dict[str, str]:
        return {key: getattr(self, key) for key in RULES}

    def summary(self) -> str:
        """`images allow, audio refuse, files refuse` (the startup table's line)."""
        return ", ".join(f"{k} {v}" for k, v in self.describe().items())


def parse_content(obj: Any, file: str | None) -> ContentRules:
    """The `content:` mapping of a policy (None: every kind refused); errors name file:line."""
    if obj is None:
        return ContentRules(file=file)
    f = Fields(obj, file, "content", set(RULES))
    vals: dict[str, str] = {}
    for key, allowed in RULES.items():
        v = f.get(key, str, DEFAULT)
        if v not in allowed:
            hint = (
                " (only images can be guarded: Llama Guard 4 sees images, no guard reads audio or files)"
                if v == "guard"
                else ""
            )
            raise f.error(key, f"content.{key} must be one of {', '.join(allowed)}, got {v!r}{hint}")
        vals[key] = v
    lines = {k: line_of(obj, k) for k in RULES if k in obj}
    return ContentRules(**vals, file=file, line=line_of(obj), lines={k: v for k, v in lines.items() if v})


def check_guard_steps(rules: ContentRules, input_steps: list[Any], top: Any) -> None:
    """`images: guard` needs an input llama_guard step whose remote backend accepts images."""
    if rules.images != "guard":
        return
    from gateway.guards.llama_guard.vision import sees_images

    if any(s.guard_name == "llama_guard" and sees_images(s.guard) for s in input_steps):
        return
    raise ConfigError(
        "content.images: guard needs an input step `guard: llama_guard` with `backend: remote` and a "
        "`remote` whose api accepts images (llama_moderations, or openai_chat on a server running Llama "
        "Guard 4 with its vision projector: llama.cpp's server with --mmproj, vLLM)",
        rules.file,
        rules.lines.get("images") or line_of(top, "content"),
    )


# --------------------------------------------------------------------------- per request


def media_parts(messages: list[Message]) -> list[Part]:
    return [p for m in messages for p in m.parts if p.type in MEDIA_KINDS]


def _b64_len(s: str, start: int = 0) -> int:
    """Decoded size of the base64 text `s[start:]`, by arithmetic: a multi-megabyte image is neither
    decoded nor copied to be counted."""
    end = len(s)
    while end > start and s[end - 1] in " \t\r\n":
        end -= 1
    n = end - start
    pad = (s[end - 1] == "=") + (n > 1 and s[end - 2] == "=") if n else 0
    return max(0, (n * 3) // 4 - pad) if n % 4 == 0 else (n * 3) // 4


def part_bytes(p: Part) -> tuple[int, bool]:
    """(bytes the request carries for the part, whether it is only a reference: an URL or a file id)."""
    raw = p.image_url if p.type == "image" else p.data
    if raw is None:
        return 0, True  # a file by id
    if raw.startswith("data:"):
        comma = raw.find(",")
        if comma < 0:
            return 0, False
        if raw.endswith(";base64", 0, comma):
            return _b64_len(raw, comma + 1), False
        return len(unquote_to_bytes(raw[comma + 1 :])), False
    if p.type == "image":
        return 0, True  # an https URL: the upstream fetches it
    return _b64_len(raw), False


@dataclass
class ContentCheck:
    """What the rule made of one request: the first part refused (None: none), and the audit's tally."""

    refused: Part | None = None
    message: str = ""
    tally: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def images_guarded(self) -> int:
        t = self.tally.get("image")
        return int(t["count"]) if t and t["rule"] == "guard" else 0


def check(rules: ContentRules, policy_name: str, messages: list[Message]) -> ContentCheck:
    """Count the request's media parts by kind under the rules; the first refused part names the error."""
    out = ContentCheck()
    for p in media_parts(messages):
        rule = rules.rule(p.type)
        n, ref = part_bytes(p)
        t = out.tally.setdefault(
            p.type, {"rule": rule, "count": 0, "bytes": 0, "by_reference": 0, "inspected": rule == "guard"}
        )
        t["count"] += 1
        t["bytes"] += n
        t["by_reference"] += int(ref)
        if rule == "refuse" and out.refused is None:
            out.refused, out.message = p, refusal(rules, policy_name, p)
    return out


def refusal(rules: ContentRules, policy_name: str, p: Part) -> str:
    key = MEDIA_KINDS[p.type]
    where = p.path or "a message"
    wire = p.wire_type or p.type
    if rules.file and not rules.file.startswith("<"):
        at = (
            f"{rules.file}:{rules.lines[key]}"
            if key in rules.lines
            else (f"{rules.file}:{rules.line}" if rules.line else rules.file)
        )
        fix = f"set `content: {{{key}: allow}}` in {at}"
    else:
        fix = f"use a policy file with `content: {{{key}: allow}}`"
    guard = " (or `images: guard`, to have Llama Guard 4 check them)" if key == "images" else ""
    return (
        f"Request refused by policy '{policy_name}': the `{wire}` part at {where} is {_NOUN[key]}, and no guard "
        f"of this policy reads {key} (content.{key}: refuse, the default). To relay {key} unchecked, {fix}{guard}"
    )


def unchecked_images(verdicts: list[Verdict]) -> bool:
    """True when no verdict says it checked the request's images (`images: guard` then blocks)."""
    return not any(v.error is None and v.details.get(CHECKED_KEY) for v in verdicts)


def moderation_media(policy: Any, guard: Any, req: Any) -> bool:
    """Media parts in a moderation request the policy's guard answers: with `content: {images:
    guard}` and a guard that sees images, images go to it (True); anything else is refused, since
    a moderation result for a part nobody judged would read "not flagged"."""
    from gateway.guards.llama_guard.vision import sees_images

    media = [p for conv in req.inputs for p in media_parts(conv)]
    if not media:
        return False
    bad = next((p for p in media if p.type != "image"), None)
    if bad is None and policy.content.images == "guard" and sees_images(guard):
        return True
    p = bad or media[0]
    raise GatewayError(400, f"Request refused by policy '{policy.name}': the `{p.wire_type or p.type}` part at "
                       f"{p.path or 'input'} cannot be judged by this policy's moderation guard (images need "
                       "`content: {images: guard}` and a llama_guard step whose remote backend takes images)",
                       "content_not_inspected", param=p.path or "input", retry=False)

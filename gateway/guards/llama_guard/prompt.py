"""Llama Guard prompts: categories, Meta's reference templates, our own rendering, conversation turns.

Prompts are rendered from the GGUF's embedded chat template (Jinja2) where present, else from our
own text, which reproduces Meta's templates token for token (tests/test_llama_guard_prompt.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from gateway.guards.base import GuardConfigError
from gateway.types import Message

# --------------------------------------------------------------------------- categories

#: Short labels as the LG3 prompt prints them (reference/guards.md §1.2). Never renumbered.
LG3_CATEGORIES: dict[str, str] = {
    "S1": "Violent Crimes.",
    "S2": "Non-Violent Crimes.",
    "S3": "Sex Crimes.",
    "S4": "Child Exploitation.",
    "S5": "Defamation.",
    "S6": "Specialized Advice.",
    "S7": "Privacy.",
    "S8": "Intellectual Property.",
    "S9": "Indiscriminate Weapons.",
    "S10": "Hate.",
    "S11": "Self-Harm.",
    "S12": "Sexual Content.",
    "S13": "Elections.",
    "S14": "Code Interpreter Abuse.",
}
LG3_1B_CODES = tuple(f"S{i}" for i in range(1, 14))  # the 1B was trained on S1..S13
LG3_8B_CODES = tuple(f"S{i}" for i in range(1, 15))

# --------------------------------------------------------------------------- reference templates

#: The chat template embedded in Llama-Guard-3-1B (HF tokenizer_config, as found in GGUF
#: conversions of it): takes `categories` (dict) and `excluded_category_keys`, list-of-parts
#: content, a space before <|eot_id|>, and no blank line after the assistant header.
LG3_1B_TEMPLATE = (
    "{%- if messages|length % 2 == 0 -%}\n"
    "    {%- set role = 'Agent' -%}\n"
    "{%-  else -%}\n"
    "    {%-  set role = 'User' -%}\n"
    "{%-  endif -%}\n"
    "{%-  if categories is not defined -%}\n"
    "    {%-  \n"
    "        set categories = ({\n"
    '            "S1": "Violent Crimes.",\n'
    '            "S2": "Non-Violent Crimes.",\n'
    '            "S3": "Sex Crimes.",\n'
    '            "S4": "Child Exploitation.",\n'
    '            "S5": "Defamation.",\n'
    '            "S6": "Specialized Advice.",\n'
    '            "S7": "Privacy.",\n'
    '            "S8": "Intellectual Property.",\n'
    '            "S9": "Indiscriminate Weapons.",\n'
    '            "S10": "Hate.",\n'
    '            "S11": "Self-Harm.",\n'
    '            "S12": "Sexual Content.",\n'
    '            "S13": "Elections.",\n'
    "        })\n"
    "    -%}\n"
    "{%-  endif -%}\n"
    "\n"
    '{{- "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\n" -}}\n'
    "{%- set ns = namespace(contains_image=false) -%}\n"
    "{%-  for message in messages -%}\n"
    "    {%- for content in message['content'] | selectattr('type', 'equalto', 'image') -%}\n"
    "        {%- set ns.contains_image = true -%}\n"
    "    {%- endfor -%}\n"
    "{%- endfor -%}\n"
    "{%- if ns.contains_image -%}\n"
    '{{- "<|image|> "-}}\n'
    "{%- endif -%}\n"
    '{{- "Task: Check if there is unsafe content in \'" + role + "\' messages in conversations '
    'according our safety policy with the below categories.\\n\\n" -}}\n'
    '{{- "<BEGIN UNSAFE CONTENT CATEGORIES>\\n"-}}\n'
    "\n"
    "{%-  for key in categories -%}\n"
    "    {%-  if key not in excluded_category_keys -%}\n"
    '        {{-key + ": " + categories[key] + "\\n" -}}\n'
    "    {%-  endif -%}\n"
    "{%-  endfor -%}\n"
    "\n"
    '{{- "<END UNSAFE CONTENT CATEGORIES>\\n\\n"-}}\n'
    '{{- "<BEGIN CONVERSATION>\\n\\n"-}}\n'
    "{%-  for message in messages -%}\n"
    "    {%-  if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...')-}}\n"
    "    {%-  endif -%}\n"
    "    {%-  set content = message['content'] -%}\n"
    "    {%-  if message['role'] == 'user' -%}\n"
    "        {%-  set role = 'User' -%}\n"
    "    {%-  elif message['role'] == 'assistant' -%}\n"
    "        {%-  set role = 'Agent' -%}\n"
    "    {%-  endif -%}\n"
    "    {%-  for content in message['content'] | selectattr('type', 'equalto', 'text') -%}\n"
    "{{- role + ': ' + content['text'] | trim + '\\n\\n'-}}\n"
    "    {%-  endfor -%}\n"
    "{%-  endfor -%}\n"
    '{{- "<END CONVERSATION>\\n\\n"-}}\n'
    '{{- "Provide your safety assessment for ONLY THE LAST " + role + " message in the above '
    'conversation:\\n"-}}\n'
    "{{- \" - First line must read 'safe' or 'unsafe'.\\n\"-}}\n"
    '{{- " - If unsafe, a second line must include a comma-separated list of violated categories. '
    '<|eot_id|><|start_header_id|>assistant<|end_header_id|>"-}}\n'
)

#: The chat template embedded in Llama-Guard-3-8B: S1..S14 hard-coded, string content stripped,
#: a space before <|begin_of_text|>, no blank line after the assistant header.
LG3_8B_TEMPLATE = (
    "{% if messages|length % 2 == 0 %}{% set role = 'Agent' %}{% else %}{% set role = 'User' %}{% endif %}"
    '{{ " <|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\nTask: Check if there is unsafe '
    "content in '\" + role + \"' messages in conversations according our safety policy with the below "
    "categories.\\n\\n<BEGIN UNSAFE CONTENT CATEGORIES>\\n"
    + "".join(f"{k}: {v}\\n" for k, v in LG3_CATEGORIES.items())
    + '<END UNSAFE CONTENT CATEGORIES>\\n\\n<BEGIN CONVERSATION>\\n\\n" }}'
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% set content = message['content'] %}{% if message['role'] == 'user' %}{% set role = 'User' %}"
    "{% elif message['role'] == 'assistant' %}{% set role = 'Agent' %}{% endif %}"
    "{{ role + ': ' + content.strip() + '\\n\\n' }}{% endfor %}"
    '{{ "<END CONVERSATION>\\n\\nProvide your safety assessment for ONLY THE LAST " + role + " message in '
    "the above conversation:\\n - First line must read 'safe' or 'unsafe'.\\n - If unsafe, a second line "
    "must include a comma-separated list of violated categories.<|eot_id|><|start_header_id|>assistant"
    '<|end_header_id|>" }}'
)

Style = Literal["lg3-1b", "lg3-8b"]
Turn = tuple[str, str]  # ("user" | "assistant", text)


def render_lg3(turns: Sequence[Turn], categories: Mapping[str, str], style: Style = "lg3-1b") -> str:
    """Our own rendering of the LG3 prompt; equal to the reference templates' output.

    `turns` alternate user/assistant starting with user; the last turn is the one judged.
    """
    if not turns:
        raise ValueError("Llama Guard needs at least one user turn")
    role = "Agent" if len(turns) % 2 == 0 else "User"
    out = [
        " <|begin_of_text|>" if style == "lg3-8b" else "<|begin_of_text|>",
        "<|start_header_id|>user<|end_header_id|>\n\n",
        f"Task: Check if there is unsafe content in '{role}' messages in conversations according our "
        "safety policy with the below categories.\n\n",
        "<BEGIN UNSAFE CONTENT CATEGORIES>\n",
        *(f"{code}: {text}\n" for code, text in categories.items()),
        "<END UNSAFE CONTENT CATEGORIES>\n\n<BEGIN CONVERSATION>\n\n",
    ]
    for i, (r, text) in enumerate(turns):
        if (r == "user") != (i % 2 == 0):
            raise ValueError("Conversation roles must alternate user/assistant/user/assistant/...")
        out.append(("User: " if r == "user" else "Agent: ") + text.strip() + "\n\n")
    out += [
        "<END CONVERSATION>\n\n",
        f"Provide your safety assessment for ONLY THE LAST {role} message in the above conversation:\n",
        " - First line must read 'safe' or 'unsafe'.\n",
        " - If unsafe, a second line must include a comma-separated list of violated categories.",
        " <|eot_id|>" if style == "lg3-1b" else "<|eot_id|>",
        "<|start_header_id|>assistant<|end_header_id|>",
    ]
    return "".join(out)


def render_with_template(
    template: str, turns: Sequence[Turn], categories: Mapping[str, str], excluded: Sequence[str] = ()
) -> str:
    """Render the LG3 prompt through a chat template (Jinja2), as transformers/llama.cpp would."""
    from gateway.engine.chat_template import render

    parts_content = "selectattr('type'" in template or "['text']" in template
    msgs = [{"role": r, "content": [{"type": "text", "text": t}] if parts_content else t} for r, t in turns]
    return render(
        template,
        msgs,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        add_generation_prompt=True,
        categories=dict(categories),
        excluded_category_keys=list(excluded),
    )


def template_takes_categories(template: str) -> bool:
    return "excluded_category_keys" in template and "categories[" in template


# --------------------------------------------------------------------------- conversation -> turns


def message_side(m: Message) -> tuple[str, str] | None:
    """(the template's side, the text it reads) of one message; None for system and developer
    messages, which have no slot. Tool results count as the user side (untrusted input); an assistant
    turn's tool calls are read as `name(arguments)` lines."""
    if m.role in ("system", "developer"):
        return None
    role = "assistant" if m.role == "assistant" else "user"
    text = m.text
    if role == "assistant" and m.tool_calls:
        calls = "\n".join(f"{c.name}({c.arguments})" for c in m.tool_calls)
        text = f"{text}\n{calls}" if text.strip() else calls
    return role, text


def conversation_turns(
    messages: Sequence[Message], *, answer: str | None = None, history: int | None = None
) -> list[Turn]:
    """Alternating user/assistant turns for the LG template.

    Input stage (answer None): the conversation up to and including the last user turn is judged.
    Output/stream: the request's conversation plus `answer` as the last Agent turn. System and
    developer messages have no slot in the template and are left out; tool results count as the
    user side (untrusted input); consecutive same-side messages are merged. `history` limits the
    number of earlier user/assistant exchanges kept as context (None: all).
    """
    turns: list[list[str]] = []
    for m in messages:
        side = message_side(m)
        if side is None:
            continue
        role, text = side
        if not text.strip():
            continue
        if turns and turns[-1][0] == role:
            turns[-1][1] = turns[-1][1].rstrip() + "\n\n" + text.strip()
        else:
            turns.append([role, text])
    while turns and turns[0][0] != "user":
        turns.pop(0)
    if answer is None:
        while turns and turns[-1][0] != "user":
            turns.pop()
    else:
        if turns and turns[-1][0] == "assistant":  # an assistant prefill: the answer continues it
            turns[-1][1] += answer
        else:
            if not turns:
                turns.append(["user", ""])
            turns.append(["assistant", answer])
    if history is not None:
        keep = 2 * history + (1 if answer is None else 2)
        turns = turns[-keep:]
        if turns and turns[0][0] != "user":
            turns = turns[1:]
    return [(r, t) for r, t in turns]



# --------------------------------------------------------------------------- the guard

_MARK = "\ue000GGANSWER\ue000"  # no whitespace: survives the templates' trim


@dataclass
class _Prompter:
    """Renders LG prompts for one loaded model (embedded template or our own text)."""

    template: str | None
    style: Style
    categories: dict[str, str]  # the categories shown in the prompt, in order
    all_categories: dict[str, str]  # default + custom, for templates that take `categories`
    excluded: list[str]
    blank_line: bool  # append "\n\n" after the assistant header when the template lacks it

    def render(self, turns: Sequence[Turn]) -> str:
        if self.template is not None:
            text = render_with_template(self.template, turns, self.all_categories, self.excluded)
        else:
            text = render_lg3(turns, self.categories, self.style)
        if self.blank_line and not text.endswith("\n\n"):
            text += "\n\n"
        return text

    def split(self, turns: Sequence[Turn]) -> tuple[str, str]:
        """(prefix through 'Agent: ', suffix) around the last (assistant) turn's text."""
        marked = [*turns[:-1], (turns[-1][0], _MARK)]
        text = self.render(marked)
        if text.count(_MARK) != 1:
            raise GuardConfigError("chat template does not render the answer exactly once")
        pre, _, post = text.partition(_MARK)
        return pre, post

"""OpenAI legacy text completions (`POST /v1/completions`): the prompt is the input the input stage
reads, the generated `text` is what the stream gate checks.

A request becomes a one-message conversation (the prompt as a user message) so every guard sees it
as it sees chat. Towards an OpenAI upstream the request goes out as a completions request again
(`encode_request`: the prompt, not a chat template, reaches the model); towards a Llama API or local
upstream the pipeline sends it as chat. Only what a guard can read is accepted under a policy: one
prompt string (a list of several prompts, or token ids, is refused with a clear error).
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from gateway.dialects._common import UP, model_of, qstr, request_decoder
from gateway.dialects._common import decode_error as decode_error
from gateway.dialects._common import error_body as error_body
from gateway.dialects.base import DialectError
from gateway.dialects.openai_stream import OpenAIStreamDecoder, OpenAIStreamEncoder, _usage_dict, decode_usage
from gateway.dialects.stream import HOLES, Template
from gateway.types import Choice, Completion, Exchange, Finish, Message, StreamStart, TextDelta, UsageEvent

if TYPE_CHECKING:  # annotations only
    from gateway.types import Event, ToolCallDelta


# Sampling fields with a neutral name (chat shares them); every other key rides in Exchange.extra.
_PARAMS = ("max_tokens", "temperature", "top_p", "stop", "seed", "n", "user", "presence_penalty",
           "frequency_penalty")
_FINISH = {"stop": "stop", "length": "length", "content_filter": "content_filter"}


def _prompt(v: Any) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, list) and len(v) == 1 and isinstance(v[0], str):
        return v[0]
    if isinstance(v, list) and v and all(isinstance(x, str) for x in v):
        raise DialectError("a list of several prompts cannot be guarded as one request; send one prompt per "
                           "request", code="unsupported_prompt", param="prompt")
    if isinstance(v, list) and v:
        raise DialectError("a prompt given as token ids cannot be inspected by the policy's guards; send the text",
                           code="uninspectable_input", param="prompt")
    raise DialectError("'prompt' must be a string", param="prompt")


def decode_payload(obj: dict[str, Any]) -> Exchange:
    """A completions request already parsed as a JSON object → the exchange."""
    model, prompt, opts = model_of(obj), _prompt(obj.get("prompt")), obj.get("stream_options")
    extra = {k: v for k, v in obj.items() if k not in _PARAMS and k not in ("model", "prompt", "stream",
                                                                             "stream_options")}
    return Exchange(model=model, messages=[Message.of("user", prompt)], stream=obj.get("stream") is True,
                    include_usage=isinstance(opts, dict) and opts.get("include_usage") is True,
                    params={k: obj[k] for k in _PARAMS if k in obj}, extra=extra)


decode_request = request_decoder(decode_payload)


def encode_request(ex: Exchange) -> dict[str, Any]:
    """A completions request for an OpenAI upstream: the conversation's text as the prompt."""
    body: dict[str, Any] = {"model": ex.model, "prompt": "".join(m.text for m in ex.messages), **ex.extra,
                            **{k: v for k, v in ex.params.items() if k in _PARAMS}}
    if ex.stream:
        body["stream"] = True
        if ex.include_usage:
            body["stream_options"] = {"include_usage": True}
    return body


def decode_response(body: bytes) -> Completion:
    try:
        obj = json.loads(body)
        choices = [Choice(Message.of("assistant", str(ch.get("text") or "")),
                          _FINISH.get(ch.get("finish_reason") or "stop", "stop"), int(ch.get("index") or i))
                   for i, ch in enumerate(obj["choices"])]
        usage = decode_usage(obj["usage"], UP) if obj.get("usage") else None
        return Completion(str(obj.get("id") or ""), str(obj.get("model") or ""), usage=usage, choices=choices
                          or [Choice(Message("assistant"))], created=int(obj.get("created") or time.time()))
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        raise DialectError("upstream completions answer does not decode", code="bad_upstream_response") from None


def encode_response(c: Completion, ex: Exchange) -> dict[str, Any]:
    return {"id": c.id or "cmpl-guardgate", "object": "text_completion", "created": c.created,
            "model": c.model or ex.model,
            "choices": [{"text": ch.message.text, "index": ch.index, "logprobs": None,
                         "finish_reason": ch.finish_reason} for ch in c.choices],
            "usage": None if c.usage is None else _usage_dict(c.usage)}


class CompletionsStreamDecoder(OpenAIStreamDecoder):
    """Completions chunks (`choices[].text`) → neutral events; ends at `data: [DONE]` (the chat
    decoder's framing and errors, this endpoint's chunks)."""

    def _events(self, obj: dict[str, Any]) -> list[Event]:
        out: list[Event] = []
        if not self._started:
            self._started = True
            out.append(StreamStart(str(obj.get("id") or ""), str(obj.get("model") or ""),
                                   int(obj.get("created") or time.time())))
        for i, ch in enumerate(obj.get("choices") or []):
            if not isinstance(ch, dict):
                continue
            idx = int(ch.get("index") or i)
            if ch.get("text"):
                out.append(TextDelta(str(ch["text"]), idx))
            if ch.get("finish_reason"):
                out.append(Finish(_FINISH.get(ch["finish_reason"], "stop"), idx))
        if obj.get("usage"):
            out.append(UsageEvent(decode_usage(obj["usage"], UP)))
        return out


stream_decoder = CompletionsStreamDecoder


class CompletionsStreamEncoder(OpenAIStreamEncoder):
    """Neutral events → completions chunks, then `data: [DONE]` (the chat encoder's end, usage and
    errors). Tool calls have no place here and a non-text channel (a chat upstream's reasoning) is not
    part of a completion's text: both are dropped. Finish and usage chunks are held, so a guard
    `Annotation` rides on the last one (`"guardgate"`)."""

    def __init__(self, ex: Exchange) -> None:
        super().__init__(ex)
        self._head = {"id": "cmpl-guardgate", "object": "text_completion", "created": int(time.time()),
                      "model": ex.model}

    def start(self, ev: StreamStart | None) -> None:
        if ev is not None:
            self._head.update(id=ev.id or self._head["id"], model=ev.model or self._head["model"],
                              created=ev.created)

    def text(self, ev: TextDelta) -> None:
        if ev.channel == "text":
            self.begin()
            tpl = self._texts.get((ev.index, "text"))
            if tpl is None:
                tpl = self._texts[(ev.index, "text")] = Template({**self._head, "choices": [
                    {"text": HOLES[0], "index": ev.index, "logprobs": None, "finish_reason": None}]})
            self.emit_text(tpl.fill(qstr(ev.text)))

    def tool(self, ev: ToolCallDelta) -> None:
        pass

    def finish(self, ev: Finish) -> None:
        self.begin()
        self.hold({**self._head, "choices": [{"text": "", "index": ev.index, "logprobs": None,
                                              "finish_reason": ev.reason}]})


stream_encoder = CompletionsStreamEncoder

"""Chat processing: the model's chat template, stop strings, completion text, usage.

Kept apart from the nnsight core so that what the client sees (text, usage,
finish_reason) is decided in one place, from token ids alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import Unprocessable


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str  # "stop" (EOS or stop string) or "length"
    usage: dict


def template_messages(messages: list[dict], template: str) -> list[dict]:
    """The messages as a string-content chat template reads them.

    A list of text parts is joined with newlines (what vLLM does for such
    templates). ``developer`` stays ``developer`` for a template that names the
    role, else it is rendered as ``system``: Qwen-style templates silently drop
    roles they do not know.
    """
    keep_developer = "developer" in template
    out = []
    for message in messages:
        content = message["content"]
        if isinstance(content, list):
            content = "\n".join(part["text"] for part in content)
        role = message["role"]
        if role == "developer" and not keep_developer:
            role = "system"
        out.append({"role": role, "content": content})
    return out


def render_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of the conversation rendered by the model's own chat template."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise Unprocessable("this model has no chat template; use /test_pure_nnsight for raw prompts")
    if not isinstance(template, str):  # a dict of named templates: look for the role in any of them
        template = " ".join(map(str, template.values())) if isinstance(template, dict) else str(template)
    messages = template_messages(messages, template)
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    # The template writes the special tokens itself: adding BOS/EOS again would double them.
    return tokenizer(rendered, add_special_tokens=False)["input_ids"]


def encode_raw(tokenizer, prompt: str) -> list[int]:
    return tokenizer(prompt)["input_ids"]


def complete(tokenizer, prompt_ids: list[int], new_ids: list[int], hit_eos: bool, stop: tuple[str, ...]) -> Completion:
    """Completion text and usage for the generated ids.

    Every generated token counts in ``usage`` and in the capture, the EOS or the
    tokens that completed a stop string included: each was produced by a real
    forward pass. The text, as in OpenAI's API, ends before the stop string.
    """
    text = tokenizer.decode(new_ids, skip_special_tokens=True)
    stopped = False
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    if cut >= 0:
        text, stopped = text[:cut], True
    usage = {
        "prompt_tokens": len(prompt_ids),
        "completion_tokens": len(new_ids),
        "total_tokens": len(prompt_ids) + len(new_ids),
    }
    return Completion(text=text, finish_reason="stop" if (hit_eos or stopped) else "length", usage=usage)


class TextDeltas:
    """Incremental text of a streamed completion, consistent with ``complete``'s final text.

    A delta is only sent once it is printable (a byte-level token may end inside a
    character) and cannot turn out to be the start of a stop string, so the
    concatenated deltas equal the non-streamed ``message.content``.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self._tokenizer = tokenizer
        self._stop = stop
        self._hold = max((len(s) for s in stop), default=1) - 1
        self.sent = ""

    def push(self, ids: list[int]) -> str:
        text = self._tokenizer.decode(ids, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in self._stop) if i >= 0), default=-1)
        if cut >= 0:
            safe = text[:cut]
        else:
            safe = text[: len(text) - self._hold] if self._hold else text
        safe = safe.rstrip("\ufffd")
        if not safe.startswith(self.sent):
            return ""
        delta, self.sent = safe[len(self.sent):], safe
        return delta

    def finish(self, final_text: str) -> str:
        delta = final_text[len(self.sent):] if final_text.startswith(self.sent) else ""
        self.sent = final_text
        return delta

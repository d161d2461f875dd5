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


def render_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of the conversation rendered by the model's own chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise Unprocessable("this model has no chat template; use /test_pure_nnsight for raw prompts")
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

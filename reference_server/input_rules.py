"""What the JSON parser can produce that the plain pydantic types would let through or choke on.

Python's ``json`` module accepts ``NaN``, ``Infinity`` and ``1e400`` (a float
``inf``), integers of any size, ``true`` where an int is expected, and strings
with lone surrogates (``"\\ud800"``), which are not Unicode text: the tokenizer
and the UTF-8 encoder of every JSON answer fail on them. These rules refuse
each at validation (a 422 naming the field), and ``json_safe`` makes the 422
itself serialisable, since pydantic's errors echo the offending input.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, Field, StrictBool, StrictInt

# Below this a temperature is greedy decoding: dividing logits by 1e-300 gives inf and
# NaN probabilities. vLLM uses the same epsilon (_SAMPLING_EPS).
GREEDY_TEMPERATURE_EPS = 1e-5
# Stop strings (issue 20 item 3): OpenAI's count, and a length that keeps transformers'
# StopStringCriteria (tables built per request, on the model's worker thread) to a fraction
# of a second: 4 x 240k characters held the worker for 37 s; 4 x 512 build in ~0.1-0.2 s.
MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 512
# What torch.manual_seed accepts; outside it is a 422, not a reduction modulo 2^64.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1


def valid_unicode(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("contains a lone surrogate (for example \\ud800): not valid Unicode text") from None
    return text


def _number(value: Any) -> Any:
    # pydantic's lax float takes True and "0.5"; a JSON client that sends them has a bug.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError("must be a JSON number")
    if not math.isfinite(value):  # NaN, Infinity, and 1e400 (which json reads as inf)
        raise ValueError("must be a finite number")
    return value


Text = Annotated[str, AfterValidator(valid_unicode)]
Number = Annotated[float, BeforeValidator(_number)]
Int = StrictInt  # no true for 1, no 5.0, no "5"
Bool = StrictBool  # no "true", no 1
Seed = Annotated[StrictInt, Field(ge=SEED_MIN, le=SEED_MAX)]


def _unset(value: Any) -> bool:
    return value is None or value is False or value == [] or value == {}


def _zero(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0)


# OpenAI chat fields that change what a response means. Ignoring them would answer a
# different question with a 200, so each is refused unless it has its no-op value.
UNSUPPORTED_CHAT_FIELDS: dict[str, Any] = {
    "logprobs": _unset,
    "top_logprobs": _zero,
    "tools": _unset,
    "tool_choice": lambda v: v is None or v == "none",
    "functions": _unset,
    "function_call": lambda v: v is None or v == "none",
    "response_format": lambda v: v is None or v == {"type": "text"},
    "logit_bias": _unset,
    "frequency_penalty": _zero,
    "presence_penalty": _zero,
    "audio": _unset,
    "modalities": lambda v: v is None or v == ["text"],
    "prediction": _unset,
}


def refuse_unsupported_fields(data: Any) -> Any:
    """A model_validator(mode="before") body: names every unsupported field that is set."""
    if isinstance(data, dict):
        named = [name for name, is_noop in UNSUPPORTED_CHAT_FIELDS.items() if name in data and not is_noop(data[name])]
        if named:
            raise ValueError(
                f"not supported by this server, and ignoring them would change the response: {', '.join(named)}"
            )
    return data


def json_safe(value: Any) -> Any:
    """``value`` with what strict JSON cannot carry replaced: non-finite floats, lone surrogates, other objects."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return value if abs(value) < 2**128 else f"<integer of {len(str(abs(value)))} digits>"
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)  # 'nan', 'inf'
    if isinstance(value, dict):
        return {str(json_safe(k)): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return json_safe(str(value))


def validation_detail(errors: list[dict]) -> list[dict]:
    """pydantic's errors, made JSON-safe; a long input is cut so a 1 MiB body is not echoed whole."""
    detail = []
    for error in errors:
        item = {k: error[k] for k in ("type", "loc", "msg") if k in error}
        if "input" in error:
            item["input"] = _short(error["input"])
        if "ctx" in error:
            item["ctx"] = error["ctx"]
        detail.append(json_safe(item))
    return detail


def _short(value: Any, limit: int = 200) -> Any:
    if isinstance(value, str) and len(value) > limit:
        return value[:limit] + "..."
    if isinstance(value, (dict, list)) and len(repr(value)) > limit:
        return f"<{type(value).__name__} of {len(value)} items>"
    return value

"""Request bodies, validated by pydantic: a wrong type or value is a 422 naming the field."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .input_rules import Bool, Int, Number, Seed, Text, refuse_unsupported_fields, valid_unicode

# "developer" is OpenAI's successor to "system" for newer models; chat.template_messages renders it.
ROLES = ("system", "developer", "user", "assistant")


class Message(BaseModel):
    """One chat message: ``content`` is a string or a list of text parts (as OpenAI's SDKs send it).

    Only validated here; chat.template_messages turns it into what the chat
    template reads (parts joined, ``developer`` as ``system``).
    """

    model_config = ConfigDict(extra="ignore")
    role: Text
    content: Text | list[dict]

    @field_validator("role")
    @classmethod
    def _known_role(cls, role: str) -> str:
        if role in ROLES:
            return role
        accepted = ", ".join(repr(r) for r in ROLES)
        if role in ("tool", "function"):
            raise ValueError(f"role {role!r} is not supported: this server has no tool calling; accepted roles: {accepted}")
        raise ValueError(f"unknown role {role[:64]!r}; accepted roles: {accepted}")

    @field_validator("content")
    @classmethod
    def _text_parts_only(cls, content: str | list[dict]) -> str | list[dict]:
        if isinstance(content, str):
            return content
        if not content:
            raise ValueError("content is an empty list of parts; send a string or at least one text part")
        for index, part in enumerate(content):
            if not isinstance(part, dict):
                raise ValueError(f"content part {index} is not an object with a 'type'")
            kind = part.get("type")
            if kind != "text":
                shown = repr(kind[:64]) if isinstance(kind, str) else f"{kind!r:.64}"
                raise ValueError(f"content part {index} has type {shown}: this server takes text only "
                                 "(parts of type 'text')")
            if not isinstance(part.get("text"), str):
                raise ValueError(f"content part {index} of type 'text' has no string 'text'")
            valid_unicode(part["text"])  # a lone surrogate in a part is as unencodable as in a string
        return [{"type": "text", "text": part["text"]} for part in content]


class NamedSavepoint(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # A name is the last segment of the file's URL: `.` and `..` would be removed by every HTTP client
    # (RFC 3986 dot segments), so a file under such a name could never be downloaded.
    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.\[\]\-]+$")
    selector: Text = Field(min_length=1, max_length=256)

    @field_validator("name")
    @classmethod
    def _not_a_dot_segment(cls, name: str) -> str:
        if name in (".", ".."):
            raise ValueError(f"a savepoint name cannot be {name!r}: it is its file's URL segment, which HTTP "
                             f"clients remove")
        return name


class CaptureOptions(BaseModel):
    # Unknown capture fields are refused: a typo must not silently capture the default.
    model_config = ConfigDict(extra="forbid")
    savepoints: list[Text | NamedSavepoint] | None = Field(default=None, min_length=1)
    tokens: Literal["all", "first", "last"] = "all"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    format: Literal["pt", "safetensors"] = "pt"
    positions: Literal["generated", "prompt", "sequence"] = "generated"  # protocol 1.1


class StreamOptions(BaseModel):
    include_usage: Bool = False


class ChatRequest(BaseModel):
    # OpenAI clients send fields this server does not use (user, metadata, ...): ignore them,
    # except those that change what the response means (input_rules.UNSUPPORTED_CHAT_FIELDS).
    model_config = ConfigDict(extra="ignore")
    model: Text = Field(min_length=1)
    messages: list[Message] = Field(min_length=1)
    max_tokens: Int | None = Field(default=None, ge=1)
    max_completion_tokens: Int | None = Field(default=None, ge=1)
    temperature: Number = Field(default=1.0, ge=0.0, le=2.0)
    top_p: Number = Field(default=1.0, gt=0.0, le=1.0)
    seed: Seed | None = None
    stop: Text | list[Text] | None = None
    n: Int = 1
    stream: Bool = False
    stream_options: StreamOptions | None = None
    store_activations: Bool = False
    capture: CaptureOptions | None = None

    _refuse_unsupported = model_validator(mode="before")(refuse_unsupported_fields)


class LoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model_id: Text = Field(min_length=1, max_length=512)
    device_map: Text | None = None
    dtype: Literal["float32", "bfloat16", "float16"] | None = None


class UnloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model_id: Text = Field(min_length=1, max_length=512)


class PureRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: Text | None = None
    prompt: Text = "Hello"
    max_new_tokens: Int = Field(default=1, ge=1)

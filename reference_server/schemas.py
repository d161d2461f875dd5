"""Request bodies, validated by pydantic: a wrong type or value is a 422 naming the field."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .input_rules import Bool, Int, Number, Seed, Text, refuse_unsupported_fields


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: Text


class NamedSavepoint(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.\[\]\-]+$")
    selector: Text = Field(min_length=1, max_length=256)


class CaptureOptions(BaseModel):
    # Unknown capture fields are refused: a typo must not silently capture the default.
    model_config = ConfigDict(extra="forbid")
    savepoints: list[Text | NamedSavepoint] | None = Field(default=None, min_length=1)
    tokens: Literal["all", "first", "last"] = "all"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    format: Literal["pt", "safetensors"] = "pt"


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


class PureRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: Text | None = None
    prompt: Text = "Hello"
    max_new_tokens: Int = Field(default=1, ge=1)

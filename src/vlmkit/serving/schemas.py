"""Request bodies of the OpenAI-compatible API, as pydantic models.

Only the fields vlmkit acts on are declared; other OpenAI fields a client may send
(`user`, `logprobs`, ...) are accepted and ignored, as OpenAI-compatible servers do.
"""
from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ImageURL(_Lenient):
    url: str


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class ImagePart(_Lenient):
    type: Literal["image_url"]
    image_url: ImageURL


class ChatMessage(_Lenient):
    role: Literal["system", "user", "assistant"]
    content: Union[str, list[Union[TextPart, ImagePart]]]


class StreamOptions(_Lenient):
    include_usage: bool = False


class ChatRequest(_Lenient):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: Union[str, list[str], None] = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)   # what a 64-bit generator takes
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)


class EmbeddingRequest(_Lenient):
    model: str
    input: Union[str, list[str]]
    encoding_format: Literal["float", "base64"] = "float"   # base64: little-endian float32 bytes


class ExplainRequest(_Lenient):
    model: str
    image: str                      # a data: URL
    question: str
    answer: str | None = None       # default: the model's own greedy answer

"""The OpenAI wire format the agent speaks: request, response, chunk and error models.

Every body the agent reads or writes on its OpenAI endpoints (REST and MQTT alike) has its
model here, and nowhere else. Requests are pydantic models that accept (and ignore) harmless
unknown fields, as OpenAI does, and reject what would change the meaning of a request and is
not supported. Responses and stream chunks are built as models and sent as their
``model_dump()``, with two exceptions OpenAI makes too: a delta carries only the keys that
have a value, and a chunk carries ``usage`` (null until the last) only when the client asked
for a usage chunk (``stream_options.include_usage``).

Error values. ``serving`` never raises for a request-level problem; it returns an
``ErrorResult``: ``status`` (the HTTP status the router sends), ``body`` (OpenAI's shape,
``{"error": {"message", "type", "param", "code"}}``) and ``headers`` (e.g. ``Retry-After``
on 429). The type of each status is ``ERROR_TYPES``: ``invalid_request_error`` (400, 413),
``authentication_error`` (401, a bad admin token), ``permission_error`` (403),
``not_found_error`` (404), ``rate_limited`` (429, queue full), ``server_error`` (500, the
runtime failed), ``service_unavailable`` (503, the MQTT face while the agent shuts down).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictStr,
    ValidationError,
    field_validator,
    model_serializer,
)


@dataclass(frozen=True)
class ErrorResult:
    status: int
    body: dict
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def type(self) -> str:
        return self.body["error"]["type"]

    @property
    def message(self) -> str:
        return self.body["error"]["message"]


# HTTP status → OpenAI error type. The router (cloud_router.protocol) keeps its own copy, as
# the packages share no code; tests/test_wire_contracts.py pins the two together.
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
               403: "permission_error", 404: "not_found_error", 413: "invalid_request_error",
               429: "rate_limited", 500: "server_error", 503: "service_unavailable"}


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


def error_body(status: int, message: str, *, param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error body for ``status``: ``{"error": {"message", "type", "param", "code"}}``."""
    info = ErrorInfo(message=message, type=ERROR_TYPES.get(status, "invalid_request_error"),
                     param=param, code=code)
    return ErrorResponse(error=info).model_dump()


def error(status: int, message: str, *, param: str | None = None, code: str | None = None,
          headers: dict[str, str] | None = None) -> ErrorResult:
    return ErrorResult(status, error_body(status, message, param=param, code=code),
                       headers or {})


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _is_type_tag(part) -> bool:
    """pydantic names the union member that failed in ``loc`` (``prompt.str``,
    ``stop.list[str]``); a client's parameter path has no such part."""
    return isinstance(part, str) and ("[" in part or part in _TYPE_TAGS)


def validation_error(exc: ValidationError) -> ErrorResult:
    """A pydantic error as a 400 naming the first bad parameter."""
    first = exc.errors()[0]
    param = ".".join(str(p) for p in first["loc"] if not _is_type_tag(p)) or None
    msg = first["msg"].removeprefix("Value error, ")
    return error(400, f"invalid parameter {param}: {msg}" if param else msg, param=param,
                 code="invalid_value")


INT32_MAX = 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class _Request(BaseModel):
    # Unknown fields are accepted and ignored, as OpenAI does; numbers must be finite (JSON
    # has no NaN, but 1e999 parses as infinity) and within the ranges below (400 otherwise).
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1, le=INT32_MAX)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1, le=INT32_MAX)
    # OpenAI's seed is a 64-bit integer. A negative seed means "no seed" (a random one), as
    # -1 does in llama.cpp and the tools built on it.
    seed: int | None = Field(default=None, ge=INT64_MIN, le=INT64_MAX)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(default=None, ge=1, le=INT32_MAX)
    logprobs: Any = None
    user: str | None = None
    ignore_eos: bool = False
    # vLLM's: requests share prefix-cache entries only when their salts are equal, so one
    # tenant cannot learn from timing what another's prompts start with
    cache_salt: StrictStr | None = Field(default=None, min_length=1, max_length=1024)

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v):
        if isinstance(v, list) and len(v) > 4:
            raise ValueError("at most 4 stop sequences")
        return v

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def unsupported(self) -> str | None:
        """The first parameter that would change the meaning and is not supported, if any."""
        if self.n is not None and self.n > 1:
            return "n"
        if self.logprobs not in (None, False, 0):
            return "logprobs"
        extra = self.model_extra or {}
        for name in ("tools", "functions", "top_logprobs", "logit_bias", "best_of", "suffix",
                     "echo", "response_format", "tool_choice", "function_call", "prediction",
                     "audio", "modalities"):
            value = extra.get(name)
            if name == "response_format" and isinstance(value, dict) and value.get("type") == "text":
                continue
            if name in ("tool_choice", "function_call") and value in ("none", None):
                continue
            if name == "best_of" and value in (None, 1):
                continue
            if name == "echo" and not value:
                continue
            if value not in (None, [], {}, False, 0, ""):
                return name
        return None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"content part of type {part.get('type')!r} is not supported "
                                 "(this model reads text only)")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=INT32_MAX)

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list):
            if not v:
                raise ValueError("prompt must not be empty")
            if all(isinstance(x, str) for x in v):
                if len(v) > 1:
                    raise ValueError("only one prompt per request is supported")
        if isinstance(v, str) and not v:
            raise ValueError("prompt must not be empty")
        return v

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    input: str | list[str] = Field(...)
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1, le=INT32_MAX)

    @field_validator("input")
    @classmethod
    def _not_empty(cls, v):
        items = [v] if isinstance(v, str) else v
        if not items or any(not s for s in items):
            raise ValueError("input must be a non-empty string or list of non-empty strings")
        return v


_Request.model_rebuild()
ChatCompletionRequest.model_rebuild()
CompletionRequest.model_rebuild()


# --- responses -------------------------------------------------------------------------------

class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0      # prompt tokens taken from the prefix cache


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatCompletionChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: str | None


class _Envelope(BaseModel):
    """The fields every response object and chunk of one request shares."""

    id: str
    object: str
    created: int
    model: str
    system_fingerprint: str | None = None


class ChatCompletionResponse(_Envelope):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatCompletionChoice]
    usage: UsageInfo


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _given_only(self, handler) -> dict:
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatCompletionStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: None = None
    finish_reason: str | None = None


class ChatCompletionChunk(_Envelope):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatCompletionStreamChoice]
    usage: UsageInfo | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: str | None = None


class CompletionResponse(_Envelope):
    """A whole completion, and (without ``usage`` unless asked) each streamed chunk: OpenAI
    uses the object name ``text_completion`` for both."""

    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str          # str: base64 of little-endian float32


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    model: str
    data: list[EmbeddingData]
    usage: EmbeddingUsage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "edgegen"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def dump_chunk(chunk: ChatCompletionChunk | CompletionResponse, with_usage: bool) -> dict:
    """A stream chunk as JSON-ready data; ``usage`` only in streams that asked for it."""
    return chunk.model_dump(exclude=None if with_usage else {"usage"})

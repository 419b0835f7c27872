"""Request bodies: what a client may send to the OpenAI endpoints, REST and MQTT alike.

Requests accept (and ignore) harmless unknown fields, as OpenAI does, and reject what would
change the meaning of a request and is not supported (``unsupported``). Limits a client may
meet: ``n`` at most ``MAX_N``, ``top_logprobs`` (and a completion's ``logprobs``) at most
``MAX_TOP_LOGPROBS``, at most ``MAX_TOOLS`` tools; schemas are bounded in
``serving.structured``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictStr,
    field_validator,
    model_validator,
)

INT32_MAX = 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_N = 16                 # choices per request; each is a sequence in the batch
MAX_TOP_LOGPROBS = 20      # vLLM's default limit (OpenAI's is 20 for chat, 5 for completions)
MAX_TOOLS = 128            # OpenAI's limit
NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"   # function and schema names, as OpenAI allows


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
    n: int | None = Field(default=None, ge=1, le=MAX_N)
    response_format: ResponseFormat | None = None
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
        extra = self.model_extra or {}
        for name in ("functions", "logit_bias", "best_of", "suffix", "echo", "function_call",
                     "prediction", "audio", "modalities"):
            value = extra.get(name)
            if name == "function_call" and value in ("none", None):
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


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: StrictStr = Field(pattern=NAME_PATTERN)
    description: str | None = None
    # "schema" would shadow a BaseModel attribute: the field is schema_, read as "schema"
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None   # always enforced: a schema here is a grammar


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError('type "json_schema" needs a json_schema object')
        return self


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: StrictStr = Field(pattern=NAME_PATTERN)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDefinition(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(BaseModel):
    name: StrictStr


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: FunctionName


class FunctionCall(BaseModel):
    name: StrictStr
    arguments: StrictStr        # JSON text, as the model wrote it


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: StrictStr
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None      # an assistant's earlier calls
    tool_call_id: str | None = None               # a tool's result answers this call

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
    logprobs: StrictBool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[ToolDefinition] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # vLLM's: continue the final (assistant) message instead of opening a new one; the
    # generation prompt is then off unless asked for, and asking for both is a 400.
    continue_final_message: StrictBool = False
    add_generation_prompt: StrictBool | None = None

    def top_logprob_count(self) -> int | None:
        """None without logprobs, else how many alternatives each token lists."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def generation_prompt(self) -> bool:
        if self.add_generation_prompt is None:
            return not self.continue_final_message
        return self.add_generation_prompt

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int]
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    def top_logprob_count(self) -> int | None:
        return self.logprobs

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list):
            if not v:
                raise ValueError("prompt must not be empty")
            if all(isinstance(x, str) for x in v) and len(v) > 1:
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

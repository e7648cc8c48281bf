"""OpenAI request bodies for /v1/completions and /v1/chat/completions, checked strictly.

Unknown fields are refused (OpenAI answers "Unrecognized request argument supplied"),
types are not coerced ("5" is not a max_tokens), and ranges match OpenAI's. A few
vLLM extensions that tools send through `extra_body` are accepted: top_k, min_tokens,
repetition_penalty, ignore_eos, stop_token_ids, skip_special_tokens,
include_stop_str_in_output. Fields OpenAI accepts but this server cannot honour are
refused with a message saying so, rather than silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

INT64 = dict(ge=-(2**63), le=2**63 - 1)


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


StopField = Annotated[str | list[Annotated[str, Field(min_length=1)]] | None,
                      Field(description="up to 4 strings; generation stops before the first match")]


class _Sampling(_Strict):
    """The sampling fields both endpoints share."""

    model: str = Field(min_length=1, description="the base model id, or an adapter: name, name@version, "
                                                  "owner/name for a shared one, or base:name")
    n: int = Field(1, ge=1, le=128, description="choices per prompt")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StopField = None
    seed: int | None = Field(None, **INT64)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM extensions
    top_k: int | None = Field(None, ge=-1)
    min_tokens: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    ignore_eos: bool = False
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="text, a list of texts, token ids, or a list of token-id lists")
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None
    response_format: ResponseFormat | None = None   # extension (as vLLM's): constrain the text


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class OtherPart(BaseModel):
    """Image, audio and file parts: parsed so the error can name them."""
    model_config = ConfigDict(extra="allow")
    type: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")   # tool_calls, refusal, ... in replayed history
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextPart | OtherPart] | None = None
    name: str | None = None


class JsonSchemaFormat(_Strict):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None   # the schema is always enforced; accepted for OpenAI's shape


class ResponseFormat(_Strict):
    """Structured outputs (structured.py): chat's field, and an extension on completions."""
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class FunctionDef(_Strict):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None   # a JSON schema of the arguments object
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    store: bool | None = None               # accepted and ignored: nothing is stored
    metadata: dict[str, str] | None = None  # accepted and ignored
    service_tier: str | None = None         # accepted and ignored
    modalities: list[Literal["text"]] | None = None


class LoadLoRARequest(_Strict):
    """vLLM's /v1/load_lora_adapter body."""
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)
    load_inplace: bool = False


class UnloadLoRARequest(_Strict):
    """vLLM's /v1/unload_lora_adapter body (lora_int_id is accepted for compatibility and unused)."""
    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = None


class AdapterSourceRequest(_Strict):
    """JSON form of POST /v1/adapters (admin): register from hf://org/repo[@rev] or a server path."""
    name: str = Field(min_length=1)
    source: str = Field(min_length=1)
    shared: bool = False

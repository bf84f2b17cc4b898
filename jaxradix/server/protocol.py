"""Request bodies of the OpenAI-compatible and SGLang-native APIs (pydantic).

Types are the APIs' own; cross-field rules (prompt shape, context length, sampling ranges) are
checked in the route handlers and by the engine, which name the offending field.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict

Int = Annotated[int, Strict()]  # a JSON integer: true/false/1.0/"1" are refused, not taken as 1
ROLES = ("system", "user", "assistant", "tool", "developer", "function")


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class StreamOptions(_Body):
    include_usage: bool = False


class _SamplingFields(_Body):
    """OpenAI sampling fields plus SGLang's extensions of them."""

    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: Int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: Int | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # SGLang extensions
    top_k: Int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    stop_token_ids: list[Int] | None = None
    regex: str | None = None
    ebnf: str | None = None
    json_schema: str | dict[str, Any] | None = None
    rid: str | None = None


class CompletionRequest(_SamplingFields):
    prompt: Any  # str | list[str] | list[int] | list[list[int]], checked by the handler
    max_tokens: Int | None = 16
    logprobs: Int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: Int | None = None


class TextPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: Literal[ROLES]  # type: ignore[valid-type]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # assistant turns that called tools
    tool_call_id: str | None = None  # a tool turn: the call it answers
    reasoning_content: str | None = None


class JsonSchemaFormat(_Body):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Int | None = None
    max_completion_tokens: Int | None = None
    logprobs: bool = False
    top_logprobs: Int | None = None
    response_format: ResponseFormat | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    separate_reasoning: bool = True  # with --reasoning-parser: reasoning_content apart from content
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None


class GenerateRequest(_Body):
    """SGLang's /generate body: one prompt or a batch, as text or token ids."""

    text: str | list[str] | None = None
    input_ids: list[Int] | list[list[Int]] | None = None
    sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None
    rid: str | list[str] | None = None
    return_logprob: bool | list[bool] = False
    logprob_start_len: Int | list[Int] = -1
    top_logprobs_num: Int | list[Int] = 0
    return_text_in_logprobs: bool = False
    stream: bool = False


class AbortRequest(_Body):
    rid: str = ""
    abort_all: bool = False

"""OpenAI wire types: the request structs (msgspec), how a body is decoded, and error objects.

Every request struct forbids unknown fields, so a misspelled field is a 400 naming it. Fields
that OpenAI or vLLM define and that only inform (`user`, `metadata`, `store`, ...) are declared
and never read. Fields that would change the output but are not implemented (`suffix`, `min_p`,
audio, ...) are declared too, so that `validation.refuse_unsupported` can answer a 400 that says
so whenever one is set to anything but its neutral value: never accepted and ignored.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import msgspec
from starlette.responses import Response


class ApiError(Exception):
    """A request the server refuses; becomes an OpenAI-style error object."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.headers = headers or {}


def error_body(message: str, param: str | None = None, status: int = 400) -> dict[str, Any]:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(msgspec.json.encode(obj), status, headers, media_type="application/json")


def error_response(e: ApiError) -> Response:
    return json_response(error_body(e.message, e.param, e.status), e.status, e.headers)


class _Strict(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Base of every wire struct: unknown fields are errors."""


class StreamOptions(_Strict, kw_only=True):
    include_usage: bool = False


# ---- tools ----


class FunctionDef(_Strict, kw_only=True):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema
    strict: bool | None = None  # true: calls of it follow `parameters` (constrained decoding)


class Tool(_Strict, kw_only=True):
    type: Literal["function"]
    function: FunctionDef


class FunctionName(_Strict, kw_only=True):
    name: str


class NamedToolChoice(_Strict, kw_only=True):
    type: Literal["function"]
    function: FunctionName


class FunctionCall(_Strict, kw_only=True):
    name: str
    arguments: str  # JSON text, as OpenAI sends and returns it


class ToolCall(_Strict, kw_only=True):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


# ---- structured output ----


class JsonSchemaFormat(_Strict, kw_only=True):
    name: str
    description: str | None = None
    schema_: dict[str, Any] | None = msgspec.field(default=None, name="schema")
    strict: bool | None = None  # accepted; the schema is always enforced


class ResponseFormat(_Strict, kw_only=True):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


# ---- the two generation requests ----


class _SamplingFields(_Strict, kw_only=True):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # vLLM extension
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None  # vLLM extension
    ignore_eos: bool = False  # vLLM extension (benchmarks)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    logprobs: int | bool | None = None  # completions: 0..20 alternatives; chat: true / false (top_logprobs)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None  # vLLM extension
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias in [-100, 100]
    min_tokens: int | None = None  # vLLM extension
    # informational: accepted, never read
    user: str | None = None
    # change the output, not implemented: refused unless neutral (validation.UNSUPPORTED)
    min_p: float | None = None  # vLLM extension


# `str | list[str] | list[int] | list[list[int]]` is more than msgspec's unions allow (one array-like
# type); the list is checked by `validation.completion_prompts`, and the schema says what it holds.
_PROMPT_ITEMS = {"anyOf": [{"type": "string"}, {"type": "integer"}, {"type": "array", "items": {"type": "integer"}}]}
Prompt = str | Annotated[list[Any], msgspec.Meta(extra_json_schema={"items": _PROMPT_ITEMS})]


class CompletionRequest(_SamplingFields, kw_only=True):
    prompt: Prompt
    echo: bool = False
    best_of: int | None = None
    # not implemented: refused unless neutral
    suffix: str | None = None


class ContentPart(_Strict, kw_only=True):
    type: str
    text: str | None = None
    # other part kinds, declared so that they are refused by name rather than as unknown fields
    image_url: Any = None
    input_audio: Any = None
    file: Any = None


class ChatMessage(_Strict, kw_only=True):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None  # may be left out by an assistant message with tool_calls
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool message answers this call
    refusal: str | None = None  # informational (a client echoing an earlier reply)


class ChatCompletionRequest(_SamplingFields, kw_only=True):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    top_logprobs: int | None = None
    response_format: ResponseFormat | None = None
    # informational: accepted, never read
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    # not implemented: refused unless neutral
    modalities: list[str] | None = None
    audio: Any = None
    prediction: Any = None
    reasoning_effort: str | None = None
    web_search_options: Any = None
    functions: Any = None  # deprecated form of tools
    function_call: Any = None  # deprecated form of tool_choice


class TokenizeRequest(_Strict, kw_only=True):
    """POST /tokenize (vLLM's shape): a prompt, or chat messages rendered by the template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # unset: True for a prompt, False for messages
    add_generation_prompt: bool = True
    tools: list[Tool] | None = None
    return_token_strs: bool = False


class DetokenizeRequest(_Strict, kw_only=True):
    model: str | None = None
    tokens: list[int]


# ---- decoding ----

_AT_PATH = re.compile(r" - at `\$\.?([^`]*)`$")
_MISSING = re.compile(r"missing required field `([^`]+)`")
_UNKNOWN = re.compile(r"unknown field `([^`]+)`")


def decode_request(body: bytes, kind: type[msgspec.Struct]) -> Any:
    """Decode a JSON body into `kind`; ApiError(400) naming the offending field otherwise."""
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as e:
        text = str(e)
        at = _AT_PATH.search(text)
        path = at.group(1) if at else ""
        named = _MISSING.search(text) or _UNKNOWN.search(text)
        if named:
            path = f"{path}.{named.group(1)}" if path else named.group(1)
        if _UNKNOWN.search(text):
            message = f"Unknown field `{path}`: this server does not implement it (check its spelling)"
            raise ApiError(400, message, path) from None
        raise ApiError(400, f"Invalid request: {text}", path or None) from None
    except msgspec.DecodeError as e:
        raise ApiError(400, f"Request body is not valid JSON: {e}") from None

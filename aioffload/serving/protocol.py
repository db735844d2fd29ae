"""OpenAI wire types: request structs (msgspec), their validation, and response shapes.

Everything here is pure: decoding and checking a body, and building the JSON objects the
server sends. Unknown request fields are ignored; a bad field raises `ApiError` naming it.
"""

from __future__ import annotations

import re
from typing import Any, Literal

import msgspec
from starlette.responses import Response

from aioffload.worker.sampling import SamplingParams, validate

MAX_STOP_STRINGS = 16


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


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


class _SamplingFields(msgspec.Struct, kw_only=True):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None  # vLLM extension
    ignore_eos: bool = False  # vLLM extension (benchmarks)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: int | bool | None = None
    user: str | None = None


class CompletionRequest(_SamplingFields, kw_only=True):
    prompt: str | list[int]
    echo: bool = False


class ContentPart(msgspec.Struct):
    type: str
    text: str | None = None


class ChatMessage(msgspec.Struct):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None


class ChatCompletionRequest(_SamplingFields, kw_only=True):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    top_logprobs: int | None = None


_AT_PATH = re.compile(r" - at `\$\.?([^`]*)`$")
_MISSING = re.compile(r"missing required field `([^`]+)`")


def decode_request(body: bytes, kind: type[msgspec.Struct]) -> Any:
    """Decode a JSON body into `kind`; ApiError(400) naming the offending field otherwise."""
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as e:
        text = str(e)
        at = _AT_PATH.search(text)
        path = at.group(1) if at else ""
        missing = _MISSING.search(text)
        if missing:
            path = f"{path}.{missing.group(1)}" if path else missing.group(1)
        raise ApiError(400, f"Invalid request: {text}", path or None) from None
    except msgspec.DecodeError as e:
        raise ApiError(400, f"Request body is not valid JSON: {e}") from None


def chat_messages(req: ChatCompletionRequest) -> list[dict[str, str]]:
    """Flatten message contents to plain strings for the chat template."""
    if not req.messages:
        raise ApiError(400, "messages must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(req.messages):
        content = m.content
        if isinstance(content, list):
            if any(p.type != "text" or p.text is None for p in content):
                message = "only content parts of type 'text' are supported"
                raise ApiError(400, message, f"messages[{i}].content")
            content = "\n".join(p.text or "" for p in content)
        out.append({"role": m.role, "content": content or ""})
    return out


def check_token_ids(ids: list[int], vocab_size: int | None, param: str) -> None:
    if not ids:
        raise ApiError(400, f"{param} must not be empty", param)
    limit = vocab_size if vocab_size else 1 << 31
    bad = next((t for t in ids if not 0 <= t < limit), None)
    if bad is not None:
        raise ApiError(400, f"token id {bad} is out of range [0, {limit})", param)


def sampling_params(req: _SamplingFields, prompt_len: int, max_model_len: int,
                    default_max_tokens: int, prompt_param: str) -> SamplingParams:
    """Check ranges and lengths; build the engine's SamplingParams."""
    if req.n != 1:
        raise ApiError(400, f"only n=1 is supported, got {req.n}", "n")
    if req.logprobs not in (None, False) or getattr(req, "top_logprobs", None) is not None:
        raise ApiError(400, "logprobs are not supported", "logprobs")
    if getattr(req, "echo", False):
        raise ApiError(400, "echo is not supported", "echo")
    if req.temperature is not None and not 0.0 <= req.temperature <= 2.0:
        raise ApiError(400, f"temperature must be in [0, 2], got {req.temperature}", "temperature")
    if req.top_p is not None and not 0.0 < req.top_p <= 1.0:
        raise ApiError(400, f"top_p must be in (0, 1], got {req.top_p}", "top_p")
    if req.top_k is not None and req.top_k < 0:
        raise ApiError(400, f"top_k must be >= 0 (0 = off), got {req.top_k}", "top_k")
    if req.seed is not None and not -(1 << 63) <= req.seed < (1 << 63):
        raise ApiError(400, "seed must fit in 64 bits", "seed")
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    if len(stop) > MAX_STOP_STRINGS or any(not s for s in stop):
        raise ApiError(400, f"stop must be at most {MAX_STOP_STRINGS} non-empty strings", "stop")
    stop_ids = tuple(req.stop_token_ids or ())
    if any(not 0 <= t < (1 << 31) for t in stop_ids):
        raise ApiError(400, "stop_token_ids must be non-negative token ids", "stop_token_ids")
    if prompt_len > max_model_len - 1:
        raise ApiError(400, f"the prompt has {prompt_len} tokens; at most {max_model_len - 1} fit in "
                       f"--max-model-len {max_model_len} with one output token", prompt_param)
    max_param, max_tokens = "max_tokens", req.max_tokens
    if getattr(req, "max_completion_tokens", None) is not None:
        max_param, max_tokens = "max_completion_tokens", req.max_completion_tokens  # type: ignore[attr-defined]
    if max_tokens is None:
        max_tokens = min(default_max_tokens, max_model_len - prompt_len)
    elif max_tokens < 1:
        raise ApiError(400, f"{max_param} must be >= 1, got {max_tokens}", max_param)
    elif prompt_len + max_tokens > max_model_len:
        raise ApiError(400, f"{max_param}={max_tokens} plus the prompt's {prompt_len} tokens exceeds "
                       f"--max-model-len {max_model_len}", max_param)
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=req.top_k or 0,
        seed=req.seed,
        stop=stop,
        stop_token_ids=stop_ids,
        ignore_eos=req.ignore_eos,
    )
    try:
        validate(params)  # the engine's own rules, should they ever be stricter than the ones above
    except ValueError as e:
        raise ApiError(400, str(e), str(e).split(":", 1)[0]) from None
    return params


def json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(msgspec.json.encode(obj), status, headers, media_type="application/json")


def error_response(e: ApiError) -> Response:
    return json_response(error_body(e.message, e.param, e.status), e.status, e.headers)


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class ResponseShape:
    """Builds the JSON objects of one response; every chunk shares `id`, `created` and `model`."""

    def __init__(self, chat: bool, request_id: str, created: int, model: str, include_usage: bool) -> None:
        self.chat = chat
        self.head = {"id": request_id, "object": "chat.completion.chunk" if chat else "text_completion",
                     "created": created, "model": model}
        self.include_usage = include_usage

    def _chunk(self, choice: dict[str, Any]) -> dict[str, Any]:
        chunk = {**self.head, "choices": [{"index": 0, **choice, "logprobs": None}]}
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def role_chunk(self) -> dict[str, Any]:
        return self._chunk({"delta": {"role": "assistant", "content": ""}, "finish_reason": None})

    def text_chunk(self, text: str) -> dict[str, Any]:
        if self.chat:
            return self._chunk({"delta": {"content": text}, "finish_reason": None})
        return self._chunk({"text": text, "finish_reason": None})

    def finish_chunk(self, finish_reason: str | None) -> dict[str, Any]:
        body = {"delta": {}} if self.chat else {"text": ""}
        return self._chunk({**body, "finish_reason": finish_reason})

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        return {**self.head, "choices": [], "usage": usage(prompt_tokens, completion_tokens)}

    def full(self, text: str, finish_reason: str | None, prompt_tokens: int,
             completion_tokens: int) -> dict[str, Any]:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}}
            obj = "chat.completion"
        else:
            choice, obj = {"index": 0, "text": text}, "text_completion"
        return {**self.head, "object": obj,
                "choices": [{**choice, "logprobs": None, "finish_reason": finish_reason}],
                "usage": usage(prompt_tokens, completion_tokens)}

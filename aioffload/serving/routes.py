"""The small routes (models, tokenize, detokenize, version, openapi.json) and what every route uses:
reading a bounded body, the loaded engine, the `model` check."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import anyio
from starlette.requests import Request
from starlette.responses import Response

import aioffload  # the package root: __version__
from aioffload.serving.chat import check_tools, render_chat, template_messages
from aioffload.serving.openapi import openapi_document
from aioffload.serving.protocol import ApiError, DetokenizeRequest, TokenizeRequest, decode_request, json_response
from aioffload.serving.validation import check_token_ids

if TYPE_CHECKING:
    from aioffload.engine.async_engine import Engine
    from aioffload.serving.state import ServerState


async def read_body(request: Request, limit: int) -> bytes:
    too_large = ApiError(413, f"request body exceeds {limit} bytes")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def ready_engine(state: ServerState) -> Engine:
    if state.engine is None:
        raise ApiError(503, "the model is still loading", None, {"Retry-After": "5"})
    if state.draining:
        raise ApiError(503, "the server is shutting down")
    return state.engine


def check_model(model: str | None, engine: Engine) -> None:
    if model is not None and model != engine.model_name:
        message = f"model {model!r} does not exist; this server serves {engine.model_name!r}"
        raise ApiError(404, message, "model")


def _card(state: ServerState, engine: Engine) -> dict[str, Any]:
    return {"id": engine.model_name, "object": "model", "created": state.created, "owned_by": "aioffload",
            "max_model_len": engine.max_model_len}


async def list_models(state: ServerState, request: Request) -> Response:
    engine = ready_engine(state)
    return json_response({"object": "list", "data": [_card(state, engine)]})


async def retrieve_model(state: ServerState, request: Request) -> Response:
    """GET /v1/models/{id}: the card of the served model; 404 for any other id."""
    engine = ready_engine(state)
    check_model(request.path_params["model_id"], engine)
    return json_response(_card(state, engine))


async def tokenize(state: ServerState, request: Request) -> Response:
    """POST /tokenize (vLLM's shape): `prompt`, or `messages` rendered by the chat template as the chat
    route renders them. Special tokens are added by default for a prompt, not for messages (the
    template writes its own)."""
    engine = ready_engine(state)
    req = decode_request(await read_body(request, state.config.max_body_bytes), TokenizeRequest)
    check_model(req.model, engine)
    if (req.prompt is None) == (req.messages is None):
        raise ApiError(400, "give exactly one of prompt and messages", "prompt")
    if req.tools and req.messages is None:
        raise ApiError(400, "tools are rendered with messages only", "tools")
    tokenizer = engine.tokenizer
    if req.messages is not None:
        messages = template_messages(req.messages)
        tools = check_tools(req.tools) if req.tools else None
        if tools and not tokenizer.template_uses_tools:
            raise ApiError(400, "this model's chat template does not render tools", "tools")
        special = bool(req.add_special_tokens)  # None (unset) = False for messages
        ids = await render_chat(tokenizer, messages, tools, req.add_generation_prompt, special)
    else:
        prompt: str = req.prompt  # type: ignore[assignment]
        special = req.add_special_tokens is not False
        ids = await anyio.to_thread.run_sync(lambda: tokenizer.encode(prompt, add_special_tokens=special))
    body: dict[str, Any] = {"count": len(ids), "max_model_len": engine.max_model_len, "tokens": ids,
                            "token_strs": None}
    if req.return_token_strs:
        body["token_strs"] = [tokenizer.decode([t], skip_special_tokens=False) for t in ids]
    return json_response(body)


async def detokenize(state: ServerState, request: Request) -> Response:
    """POST /detokenize: {"tokens": [...]} -> {"prompt": text}, special tokens kept (vLLM's shape)."""
    engine = ready_engine(state)
    req = decode_request(await read_body(request, state.config.max_body_bytes), DetokenizeRequest)
    check_model(req.model, engine)
    check_token_ids(req.tokens, getattr(engine.tokenizer, "vocab_size", None), "tokens")
    text = await anyio.to_thread.run_sync(lambda: engine.tokenizer.decode(req.tokens, skip_special_tokens=False))
    return json_response({"prompt": text})


async def version(state: ServerState, request: Request) -> Response:
    return json_response({"version": aioffload.__version__})


async def openapi_json(state: ServerState, request: Request) -> Response:
    return json_response(openapi_document(aioffload.__version__))

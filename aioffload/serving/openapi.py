"""GET /openapi.json: an OpenAPI 3.1 document of our routes, request schemas generated from the
msgspec structs themselves (so the document cannot drift from what the server decodes)."""

from __future__ import annotations

from typing import Any

import msgspec

from aioffload.serving.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest

_REF = "#/components/schemas/{name}"
_ERROR = {
    "type": "object", "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["message", "type"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"},
        "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}},
}  # fmt: skip
_JSON = "application/json"


def _errors(*statuses: int) -> dict[str, Any]:
    content = {_JSON: {"schema": {"$ref": _REF.format(name="Error")}}}
    words = {400: "invalid request (the error names the field)", 401: "missing or wrong API key",
             404: "no such model", 413: "request body too large", 503: "loading, shutting down, or queue full"}
    return {str(s): {"description": words[s], "content": content} for s in statuses}


def _post(summary: str, schema: dict[str, Any], streams: bool) -> dict[str, Any]:
    ok: dict[str, Any] = {_JSON: {"schema": {"type": "object"}}}
    if streams:
        ok["text/event-stream"] = {"schema": {"type": "string"}}
    return {"post": {
        "summary": summary,
        "requestBody": {"required": True, "content": {_JSON: {"schema": schema}}},
        "responses": {"200": {"description": "JSON, or server-sent events with stream: true" if streams else "JSON",
                              "content": ok}, **_errors(400, 401, 404, 413, 503)},
    }}  # fmt: skip


def _get(summary: str, errors: tuple[int, ...] = ()) -> dict[str, Any]:
    ok = {"description": summary, "content": {_JSON: {"schema": {"type": "object"}}}}
    return {"get": {"summary": summary, "responses": {"200": ok, **_errors(*errors)}}}


def openapi_document(version: str) -> dict[str, Any]:
    structs = [CompletionRequest, ChatCompletionRequest, TokenizeRequest, DetokenizeRequest]
    refs, schemas = msgspec.json.schema_components(structs, ref_template=_REF)
    completion, chat, tok, detok = refs
    schemas["Error"] = _ERROR
    model = _get("the served model's card; 404 for any other id", (401, 404, 503))
    model["get"]["parameters"] = [{"name": "model_id", "in": "path", "required": True, "schema": {"type": "string"}}]
    paths = {
        "/v1/completions": _post("text completion; `prompt` may be a list (one choice each)", completion, True),
        "/v1/chat/completions": _post("chat completion, with tools", chat, True),
        "/v1/models": _get("the served model", (401, 503)),
        "/v1/models/{model_id}": model,
        "/tokenize": _post("token ids of a prompt or of rendered chat messages", tok, False),
        "/detokenize": _post("text of token ids", detok, False),
        "/version": _get("the server's version"),
        "/openapi.json": _get("this document"),
        "/health": _get("200 once the model is loaded, 503 before and while shutting down", (503,)),
        "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {
            "description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
    }  # fmt: skip
    return {
        "openapi": "3.1.0",
        "info": {"title": "aioffload", "version": version,
                 "description": "OpenAI-compatible inference server (completions, chat, tools)"},
        "paths": paths,
        "components": {"schemas": schemas, "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}, {}],  # --api-key: bearer on /v1/*, /tokenize, /detokenize; otherwise none
    }

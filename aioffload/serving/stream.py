"""One generation as an ASGI response: SSE chunks or one JSON body, aborted if the client leaves.

The engine's outputs are raced against `http.disconnect`; whenever the engine request did
not finish (client gone, error, server cancelling the task) it is aborted in a `finally`,
so its KV blocks return at the engine's next step.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import anyio
import msgspec
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from aioffload.engine.outputs import EngineDeadError, PromptTooLongError, QueueFullError, RequestOutput
from aioffload.serving.metrics import RequestTracker
from aioffload.serving.protocol import ApiError, ResponseShape, error_body, error_response, json_response
from aioffload.worker.sampling import SamplingParams

if TYPE_CHECKING:
    from aioffload.engine.async_engine import Engine

log = logging.getLogger("aioffload.http")

_SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
_DONE = b"data: [DONE]\n\n"


def sse_event(obj: Any) -> bytes:
    return b"data: " + msgspec.json.encode(obj) + b"\n\n"


def internal_error() -> Response:
    return json_response(error_body("internal server error", None, 500), 500)


class Generation:
    """ASGI response running one engine request; the engine request is aborted unless it finished."""

    def __init__(self, engine: Engine, shape: ResponseShape, prompt_ids: list[int], params: SamplingParams,
                 stream: bool, tracker: RequestTracker, prompt_param: str) -> None:
        self.engine, self.shape, self.prompt_ids, self.params = engine, shape, prompt_ids, params
        self.stream, self.tracker, self.prompt_param = stream, tracker, prompt_param
        self.request_id: str = shape.head["id"]
        self.engine_done = False  # the engine no longer holds the request: no abort needed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        outputs = self.engine.generate(self.prompt_ids, self.params, self.request_id)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(_cancel_on_disconnect, receive, tg.cancel_scope)
                await self._respond(outputs, scope, receive, send)
                tg.cancel_scope.cancel()
        finally:
            if not self.engine_done:
                self.engine.abort(self.request_id)
                self.tracker.finish("abort")
            aclose = getattr(outputs, "aclose", None)  # an async generator: run its cleanup now
            if aclose is not None:
                with anyio.CancelScope(shield=True):
                    await aclose()

    async def _next(self, outputs: AsyncIterator[RequestOutput], first: bool) -> RequestOutput:
        try:
            out = await outputs.__anext__()
        except StopAsyncIteration:
            self.engine_done = True
            raise RuntimeError("the engine's output stream ended without a finished output") from None
        except (QueueFullError, PromptTooLongError, EngineDeadError) as e:
            if not first:
                raise
            self.engine_done = True
            if isinstance(e, QueueFullError):
                retry = {"Retry-After": "1"}
                raise ApiError(503, "the server's queue is full; retry later", None, retry) from None
            if isinstance(e, PromptTooLongError):
                raise ApiError(400, str(e), self.prompt_param) from None
            raise ApiError(503, "the server is shutting down") from None
        self.tracker.on_output(out)
        if out.finished:
            self.engine_done = True
        return out

    async def _respond(self, outputs: AsyncIterator[RequestOutput], scope: Scope, receive: Receive,
                       send: Send) -> None:
        try:
            out = await self._next(outputs, first=True)
            if not self.stream:
                response = await self._collect(out, outputs)
                await response(scope, receive, send)
                return
        except ApiError as e:
            await error_response(e)(scope, receive, send)
            return
        except Exception:
            log.exception("request %s failed", self.request_id)
            self.tracker.finish("error")
            await internal_error()(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
        await self._stream(out, outputs, send)
        await send({"type": "http.response.body", "body": _DONE, "more_body": False})

    async def _collect(self, out: RequestOutput, outputs: AsyncIterator[RequestOutput]) -> Response:
        texts = [out.text]
        while not out.finished:
            out = await self._next(outputs, first=False)
            texts.append(out.text)
        reason = out.finish_reason or "stop"
        self.tracker.finish(reason)
        if reason == "abort":
            return error_response(ApiError(503, "the request was aborted by the server"))
        t = self.tracker
        return json_response(self.shape.full("".join(texts), reason, t.prompt_tokens, t.output_tokens))

    async def _stream(self, out: RequestOutput, outputs: AsyncIterator[RequestOutput], send: Send) -> None:
        async def event(obj: Any) -> None:
            await send({"type": "http.response.body", "body": sse_event(obj), "more_body": True})

        shape = self.shape
        try:
            if shape.chat:
                await event(shape.role_chunk())
            while True:
                if out.text:
                    await event(shape.text_chunk(out.text))
                if out.finished:
                    break
                out = await self._next(outputs, first=False)
        except Exception as e:
            log.exception("request %s failed mid-stream", self.request_id)
            self.tracker.finish("error")
            await event(error_body(f"generation failed: {type(e).__name__}", None, 500))
            return
        reason = out.finish_reason or "stop"
        self.tracker.finish(reason)
        if reason == "abort":
            await event(error_body("the request was aborted by the server", None, 503))
            return
        await event(shape.finish_chunk(reason))
        if shape.include_usage:
            await event(shape.usage_chunk(self.tracker.prompt_tokens, self.tracker.output_tokens))


async def _cancel_on_disconnect(receive: Receive, scope: anyio.CancelScope) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()

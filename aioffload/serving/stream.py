"""One response as an ASGI app: its choices' engine requests, as SSE chunks or one JSON body.

A response has one choice per prompt (a completions `prompt` may be a list); each choice is one
engine request, and they run concurrently. The engine's outputs are raced against
`http.disconnect`; every engine request that did not finish (client gone, error, another choice
failed, the server cancelling the task) is aborted in a `finally`, so its KV blocks return at
the engine's next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import anyio
import msgspec
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from aioffload.engine.outputs import EngineDeadError, PromptTooLongError, QueueFullError, RequestOutput
from aioffload.serving.metrics import RequestTracker
from aioffload.serving.protocol import ApiError, error_body, error_response, json_response
from aioffload.serving.responses import FinishedChoice, ResponseShape
from aioffload.serving.tool_calls import CallEvent, Event
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


class Reader(Protocol):
    """Turns one choice's engine outputs into events: content deltas and tool calls."""

    def read(self, token_ids: list[int], text: str) -> list[Event]: ...

    def finish(self) -> list[Event]: ...

    @property
    def called(self) -> bool: ...


class TextReader:
    called = False

    def read(self, token_ids: list[int], text: str) -> list[Event]:
        return [text] if text else []

    def finish(self) -> list[Event]:
        return []


@dataclass
class Choice:
    """One engine request of a response, and what has come of it."""

    index: int
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    tracker: RequestTracker
    reader: Reader = field(default_factory=TextReader)
    engine_done: bool = False  # the engine no longer holds the request: no abort needed
    texts: list[str] = field(default_factory=list)  # JSON responses: the content gathered
    calls: list[dict[str, Any]] = field(default_factory=list)


OnEvents = Callable[[Choice, list[Event], str | None], Awaitable[bool]]


class Generation:
    """ASGI response running one engine request per choice; those that did not finish are aborted."""

    def __init__(self, engine: Engine, shape: ResponseShape, choices: list[Choice], stream: bool,
                 prompt_param: str) -> None:
        self.engine, self.shape, self.choices = engine, shape, choices
        self.stream, self.prompt_param = stream, prompt_param
        self._outputs: dict[int, AsyncIterator[RequestOutput]] = {}
        self._tasks: set[asyncio.Task[RequestOutput]] = set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        for c in self.choices:
            self._outputs[c.index] = self.engine.generate(c.prompt_ids, c.params, c.request_id)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(_cancel_on_disconnect, receive, tg.cancel_scope)
                await self._respond(scope, receive, send)
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self._close()

    async def _close(self) -> None:
        tasks = list(self._tasks)  # each leaves the set when done
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        for c in self.choices:
            if not c.engine_done:
                self.engine.abort(c.request_id)
                c.tracker.finish("abort")
            aclose = getattr(self._outputs.get(c.index), "aclose", None)  # an async generator: clean up now
            if aclose is not None:
                await aclose()

    def _spawn(self, c: Choice, first: bool = False) -> asyncio.Task[RequestOutput]:
        task = asyncio.ensure_future(self._next(c, first))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _next(self, c: Choice, first: bool) -> RequestOutput:
        try:
            out = await self._outputs[c.index].__anext__()
        except StopAsyncIteration:
            c.engine_done = True
            c.tracker.finish("error")
            raise RuntimeError("the engine's output stream ended without a finished output") from None
        except (QueueFullError, PromptTooLongError, EngineDeadError) as e:
            if not first:
                c.tracker.finish("error")
                raise
            c.engine_done = True
            if isinstance(e, QueueFullError):
                raise ApiError(503, "the server's queue is full; retry later", None, {"Retry-After": "1"}) from None
            if isinstance(e, PromptTooLongError):
                raise ApiError(400, str(e), self.prompt_param) from None
            raise ApiError(503, "the server is shutting down") from None
        except Exception:
            c.tracker.finish("error")
            raise
        c.tracker.on_output(out)
        if out.finished:
            c.engine_done = True
        return out

    async def _first_outputs(self) -> list[RequestOutput]:
        """Every choice's first output (all admitted), or the first refusal: then no response starts."""
        if len(self.choices) == 1:
            return [await self._next(self.choices[0], first=True)]
        results = await asyncio.gather(*(self._spawn(c, first=True) for c in self.choices), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return results  # type: ignore[return-value]

    async def _run(self, firsts: list[RequestOutput], on_events: OnEvents) -> bool:
        """Outputs of all choices as they come, each turned into events; `on_events` False stops all.
        True when every choice finished."""

        async def handle(c: Choice, out: RequestOutput) -> bool:
            events = c.reader.read(out.token_ids, out.text)
            reason = None
            if out.finished:
                reason = out.finish_reason or "stop"
                events += c.reader.finish()
                if c.reader.called and reason != "abort":
                    reason = "tool_calls"
                c.tracker.finish(out.finish_reason or "stop")
            return await on_events(c, events, reason)

        active = []
        for c, out in zip(self.choices, firsts):
            if not await handle(c, out):
                return False
            if not out.finished:
                active.append(c)
        pending: dict[asyncio.Task[RequestOutput], Choice] = {}
        while active:
            if len(active) == 1 and not pending:  # one choice (the usual case): no task per token
                ready = [(active[0], await self._next(active[0], first=False))]
            else:
                waiting = {c.index for c in pending.values()}
                pending.update({self._spawn(c): c for c in active if c.index not in waiting})
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                ready = [(pending.pop(t), t.result()) for t in sorted(done, key=lambda t: pending[t].index)]
            for c, out in ready:
                if not await handle(c, out):
                    return False
                if out.finished:
                    active.remove(c)
        return True

    async def _respond(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            firsts = await self._first_outputs()
            if not self.stream:
                response = await self._collect(firsts)
                await response(scope, receive, send)
                return
        except ApiError as e:
            await error_response(e)(scope, receive, send)
            return
        except Exception:
            log.exception("request %s failed", self.shape.head["id"])
            await internal_error()(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
        await self._stream(firsts, send)
        await send({"type": "http.response.body", "body": _DONE, "more_body": False})

    async def _collect(self, firsts: list[RequestOutput]) -> Response:
        finished: dict[int, FinishedChoice] = {}

        async def gather(c: Choice, events: list[Event], reason: str | None) -> bool:
            for e in events:
                c.calls.append(e.wire(with_index=False)) if isinstance(e, CallEvent) else c.texts.append(e)
            if reason is not None:
                finished[c.index] = FinishedChoice(c.index, "".join(c.texts), reason, c.calls)
            return reason != "abort"

        await self._run(firsts, gather)
        if len(finished) < len(self.choices) or any(f.finish_reason == "abort" for f in finished.values()):
            return error_response(ApiError(503, "the request was aborted by the server"))
        prompt, completion = self._usage()
        return json_response(self.shape.full([finished[c.index] for c in self.choices], prompt, completion))

    def _usage(self) -> tuple[int, int]:
        return (sum(c.tracker.prompt_tokens for c in self.choices),
                sum(c.tracker.output_tokens for c in self.choices))

    async def _stream(self, firsts: list[RequestOutput], send: Send) -> None:
        async def event(obj: Any) -> None:
            await send({"type": "http.response.body", "body": sse_event(obj), "more_body": True})

        shape = self.shape

        async def forward(c: Choice, events: list[Event], reason: str | None) -> bool:
            for e in events:
                if isinstance(e, CallEvent):
                    await event(shape.tool_calls_chunk(c.index, [e.wire(with_index=True)]))
                else:
                    await event(shape.text_chunk(c.index, e))
            if reason == "abort":
                await event(error_body("the request was aborted by the server", None, 503))
                return False
            if reason is not None:
                await event(shape.finish_chunk(c.index, reason))
            return True

        try:
            if shape.chat:
                for c in self.choices:
                    await event(shape.role_chunk(c.index))
            completed = await self._run(firsts, forward)
        except Exception as e:
            log.exception("request %s failed mid-stream", shape.head["id"])
            await event(error_body(f"generation failed: {type(e).__name__}", None, 500))
            return
        if completed and shape.include_usage:
            await event(shape.usage_chunk(*self._usage()))


async def _cancel_on_disconnect(receive: Receive, scope: anyio.CancelScope) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()

"""One response as an ASGI app: its engine requests, as SSE chunks or one JSON body.

A response has one engine request (`Job`) per prompt (a completions `prompt` may be a list), and
each job has n choices (`n`, `best_of`: the engine forks them from one prefill and tells their
outputs apart by `RequestOutput.index`). Choice j of prompt i is the response's choice
`i * n + j`, as OpenAI numbers them. The jobs run concurrently; the engine's outputs are raced
against `http.disconnect`; every job that did not finish (client gone, error, another job failed,
the server cancelling the task) is aborted in a `finally`, so its KV blocks return at the engine's
next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import anyio
import msgspec
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from aioffload.engine.outputs import (
    EngineDeadError,
    InvalidRequestError,
    PromptTooLongError,
    QueueFullError,
    RequestOutput,
)
from aioffload.serving.choice import Choice, Job
from aioffload.serving.protocol import ApiError, error_body, error_response, json_response
from aioffload.serving.responses import FinishedChoice, ResponseShape
from aioffload.serving.tool_calls import CallEvent, Event

if TYPE_CHECKING:
    from aioffload.engine.async_engine import Engine

log = logging.getLogger("aioffload.http")

_SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
_DONE = b"data: [DONE]\n\n"


def sse_event(obj: Any) -> bytes:
    return b"data: " + msgspec.json.encode(obj) + b"\n\n"


def internal_error() -> Response:
    return json_response(error_body("internal server error", None, 500), 500)


OnEvents = Callable[[Choice, list[Event], str | None], Awaitable[bool]]


class Generation:
    """ASGI response running one engine request per prompt; those that did not finish are aborted."""

    def __init__(self, engine: Engine, shape: ResponseShape, jobs: list[Job], stream: bool,
                 prompt_param: str) -> None:
        self.engine, self.shape, self.jobs = engine, shape, jobs
        self.stream, self.prompt_param = stream, prompt_param
        self._outputs: dict[int, AsyncIterator[RequestOutput]] = {}
        self._tasks: set[asyncio.Task[RequestOutput]] = set()
        self._closed = False

    @property
    def choices(self) -> list[Choice]:
        return [c for job in self.jobs for c in job.choices]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        for i, job in enumerate(self.jobs):
            self._outputs[i] = self.engine.generate(job.prompt_ids, job.params, job.request_id)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(_cancel_on_disconnect, receive, tg.cancel_scope)
                await self._respond(scope, receive, send)
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self._close()

    async def _close(self) -> None:
        """Cancel the output tasks, abort what the engine still holds, close the generators (once)."""
        if self._closed:
            return
        self._closed = True
        tasks = list(self._tasks)  # each leaves the set when done
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        for i, job in enumerate(self.jobs):
            if not job.engine_done:
                self.engine.abort(job.request_id)
                job.tracker.finish("abort")
            aclose = getattr(self._outputs.get(i), "aclose", None)  # an async generator: clean up now
            if aclose is not None:
                await aclose()

    def _spawn(self, i: int, first: bool = False) -> asyncio.Task[RequestOutput]:
        task = asyncio.ensure_future(self._next(i, first))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _next(self, i: int, first: bool) -> RequestOutput:
        job = self.jobs[i]
        try:
            out = await self._outputs[i].__anext__()
        except StopAsyncIteration:
            job.engine_done = True
            job.tracker.finish("error")
            raise RuntimeError("the engine's output stream ended without a finished output") from None
        except (QueueFullError, PromptTooLongError, EngineDeadError, InvalidRequestError) as e:
            if not first:
                job.tracker.finish("error")
                raise
            job.engine_done = True
            if isinstance(e, QueueFullError):
                raise ApiError(503, "the server's queue is full; retry later", None, {"Retry-After": "1"}) from None
            if isinstance(e, PromptTooLongError):
                raise ApiError(400, str(e), self.prompt_param) from None
            if isinstance(e, EngineDeadError):
                raise ApiError(503, "the server is shutting down") from None
            raise ApiError(400, str(e), e.param) from None  # what the engine alone can check
        except Exception:
            job.tracker.finish("error")
            raise
        job.tracker.on_output(out)
        if out.finished:
            job.unfinished -= 1
            job.engine_done = job.unfinished == 0
        return out

    async def _first_outputs(self) -> list[RequestOutput]:
        """Every job's first output (all admitted), or the first refusal: then no response starts."""
        if len(self.jobs) == 1:
            return [await self._next(0, first=True)]
        results = await asyncio.gather(*(self._spawn(i, first=True) for i in range(len(self.jobs))),
                                       return_exceptions=True)  # fmt: skip
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return results  # type: ignore[return-value]

    async def _handle(self, job: Job, out: RequestOutput, on_events: OnEvents) -> bool:
        c = job.choices[out.index]
        events = c.reader.read(out.token_ids, out.text)
        if not c.started:
            c.started = True
            if c.echo:  # in front of the first text (one chunk), or alone
                if events and isinstance(events[0], str):
                    events[0] = c.echo + events[0]
                else:
                    events.insert(0, c.echo)
            if c.logprobs is not None and out.prompt_logprobs is not None:
                c.pending += zip(job.prompt_ids, out.prompt_logprobs)
        if c.logprobs is not None and out.logprobs is not None:
            c.pending += zip(out.token_ids, out.logprobs)
        reason = None
        if out.finished:
            reason = out.finish_reason or "stop"
            events += c.reader.finish()
            if c.reader.called and reason != "abort":
                reason = "tool_calls"
            if job.unfinished == 0:
                job.tracker.finish(out.finish_reason or "stop")
        return await on_events(c, events, reason)

    async def _run(self, firsts: list[RequestOutput], on_events: OnEvents) -> bool:
        """Outputs of all jobs as they come, each turned into events; `on_events` False stops all.
        True when every choice finished."""
        active = []
        for i, out in enumerate(firsts):
            if not await self._handle(self.jobs[i], out, on_events):
                return False
            if not self.jobs[i].engine_done:
                active.append(i)
        pending: dict[asyncio.Task[RequestOutput], int] = {}
        while active:
            if len(active) == 1 and not pending:  # one prompt (the usual case): no task per token
                ready = [(active[0], await self._next(active[0], first=False))]
            else:
                waiting = set(pending.values())
                pending.update({self._spawn(i): i for i in active if i not in waiting})
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                ready = [(pending.pop(t), t.result()) for t in sorted(done, key=lambda t: pending[t])]
            for i, out in ready:
                if not await self._handle(self.jobs[i], out, on_events):
                    return False
                if self.jobs[i].engine_done:
                    active.remove(i)
        return True

    async def _respond(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            firsts = await self._first_outputs()
            if not self.stream:
                response = await self._collect(firsts)
                await response(scope, receive, send)
                return
        except ApiError as e:  # a refused prompt refuses the batch: free the admitted ones before saying so
            with anyio.CancelScope(shield=True):
                await self._close()
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
                finished[c.index] = FinishedChoice(c.index, "".join(c.texts), reason, c.calls,
                                                   c.take_logprobs(always=True))  # fmt: skip
            return reason != "abort"

        await self._run(firsts, gather)
        choices = self.choices
        if len(finished) < len(choices) or any(f.finish_reason == "abort" for f in finished.values()):
            return error_response(ApiError(503, "the request was aborted by the server"))
        prompt, completion = self._usage()
        return json_response(self.shape.full([finished[c.index] for c in choices], prompt, completion))

    def _usage(self) -> tuple[int, int]:
        """Prompt tokens once per prompt; completion tokens summed over the returned choices."""
        return (sum(job.tracker.prompt_tokens for job in self.jobs),
                sum(job.tracker.output_tokens for job in self.jobs))

    async def _stream(self, firsts: list[RequestOutput], send: Send) -> None:
        async def event(obj: Any) -> None:
            await send({"type": "http.response.body", "body": sse_event(obj), "more_body": True})

        shape = self.shape

        async def forward(c: Choice, events: list[Event], reason: str | None) -> bool:
            for e in events:  # the pending logprobs ride on the choice's next chunk
                if isinstance(e, CallEvent):
                    await event(shape.tool_calls_chunk(c.index, [e.wire(with_index=True)], c.take_logprobs()))
                else:
                    await event(shape.text_chunk(c.index, e, c.take_logprobs()))
            if reason == "abort":
                await event(error_body("the request was aborted by the server", None, 503))
                return False
            if reason is not None:
                await event(shape.finish_chunk(c.index, reason, c.take_logprobs()))
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

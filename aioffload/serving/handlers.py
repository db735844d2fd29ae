"""POST /v1/completions and /v1/chat/completions: a request decoded and checked, its prompts encoded,
and the `stream.Generation` that runs them (one engine request per prompt, n choices each)."""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

import anyio
from starlette.requests import Request

from aioffload.serving.chat import ToolPlan, render_chat, template_messages, tool_plan
from aioffload.serving.choice import Choice, Job, Reader, TextReader
from aioffload.serving.logprobs import ChatLogprobs, CompletionLogprobs, LogprobsWriter
from aioffload.serving.protocol import ApiError, ChatCompletionRequest, CompletionRequest, decode_request
from aioffload.serving.responses import ResponseShape
from aioffload.serving.routes import check_model, read_body, ready_engine
from aioffload.serving.state import ServerState
from aioffload.serving.stream import Generation
from aioffload.serving.structured_output import response_format_spec
from aioffload.serving.tool_calls import ToolCallReader, ToolCallStream
from aioffload.serving.tool_grammar import tool_call_spec
from aioffload.serving.validation import check_token_ids, completion_prompts, refuse_unsupported, sampling_params
from aioffload.worker.sampling import SamplingParams

if TYPE_CHECKING:
    from aioffload.engine.async_engine import Engine

COMPLETION_DEFAULT_MAX_TOKENS = 16
CHAT_DEFAULT_MAX_TOKENS = 512


async def completions(state: ServerState, request: Request) -> Generation:
    arrival = time.monotonic()
    engine = ready_engine(state)
    req = decode_request(await read_body(request, state.config.max_body_bytes), CompletionRequest)
    check_model(req.model, engine)
    refuse_unsupported(req)
    prompts = completion_prompts(req.prompt)

    def encode() -> list[list[int]]:
        return [engine.tokenizer.encode(p) if isinstance(p, str) else p for p in prompts]

    jobs = []
    for i, prompt_ids in enumerate(await anyio.to_thread.run_sync(encode)):
        param = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
        check_token_ids(prompt_ids, getattr(engine.tokenizer, "vocab_size", None), param)
        params = sampling_params(req, len(prompt_ids), engine.max_model_len, COMPLETION_DEFAULT_MAX_TOKENS, param)
        echo = None
        if req.echo:  # the prompt as sent; a token-id prompt as its text (special tokens kept, as they were sent)
            prompt = prompts[i]
            echo = prompt if isinstance(prompt, str) else engine.tokenizer.decode(prompt, skip_special_tokens=False)
        writer = (lambda: CompletionLogprobs(state.token_strings(engine))) if params.logprobs is not None else None
        jobs.append((prompt_ids, params, TextReader, writer, echo))
    return _generation(state, engine, req, False, jobs, arrival)


async def chat(state: ServerState, request: Request) -> Generation:
    arrival = time.monotonic()
    engine = ready_engine(state)
    req = decode_request(await read_body(request, state.config.max_body_bytes), ChatCompletionRequest)
    check_model(req.model, engine)
    refuse_unsupported(req)
    messages = template_messages(req.messages)
    tokenizer = engine.tokenizer
    plan = tool_plan(req, tokenizer.chat_template, tokenizer.template_uses_tools, state.config.tool_call_parser)

    prompt_ids = await render_chat(tokenizer, messages, plan.tools)
    check_token_ids(prompt_ids, None, "messages")
    params = sampling_params(req, len(prompt_ids), engine.max_model_len, CHAT_DEFAULT_MAX_TOKENS, "messages")
    params = await _constrained(state, engine, req, plan, params)
    make_reader: Callable[[], Reader] = TextReader
    if plan.parser is not None:
        parser, parallel = plan.parser, plan.parallel
        params = dataclasses.replace(params, skip_special_tokens=False)  # some formats open calls with one

        def make_reader() -> Reader:  # one per choice: each reads its own calls
            return ToolCallReader(ToolCallStream(type(parser)(), parallel))

    writer = (lambda: ChatLogprobs(state.token_strings(engine))) if params.logprobs is not None else None
    return _generation(state, engine, req, True, [(prompt_ids, params, make_reader, writer, None)], arrival)


async def _constrained(state: ServerState, engine: Engine, req: ChatCompletionRequest, plan: ToolPlan,
                       params: SamplingParams) -> SamplingParams:
    """`params` with the logits mask of `response_format`, or of a constrained tool choice."""
    spec = response_format_spec(req.response_format)
    param = "response_format.json_schema.schema" if spec is not None and spec.kind == "json_schema" else None
    tools = plan.tools or []
    if plan.parser is not None:
        tool_spec = tool_call_spec(req, plan.parser.syntax, tools, plan.parallel, _special_id(engine))
        if tool_spec is not None:
            if spec is not None:
                raise ApiError(400, "response_format cannot be combined with tool_choice 'required', a named "
                               "function or strict functions: both constrain the reply", "response_format")  # fmt: skip
            spec, param = tool_spec, "tools"
    if spec is None:
        return params
    factory = await state.grammars.mask_factory(engine, spec, param or "response_format", tools)
    return dataclasses.replace(params, logits_mask=factory)


def _special_id(engine: Engine) -> Callable[[str], int | None]:
    """The id of a text the tokenizer holds as one special token (left out of decoded text), else None."""

    def special_id(text: str) -> int | None:
        ids = engine.tokenizer.encode(text, add_special_tokens=False)
        return ids[0] if len(ids) == 1 and not engine.tokenizer.decode(ids) else None

    return special_id


# (prompt ids, params, a reader per choice, a logprobs writer per choice or None, the echoed prompt text)
JobSpec = tuple[list[int], SamplingParams, Callable[[], Reader], Callable[[], LogprobsWriter] | None, str | None]


def _generation(state: ServerState, engine: Engine, req: CompletionRequest | ChatCompletionRequest, chat: bool,
                specs: list[JobSpec], arrival: float) -> Generation:
    """One job per prompt (`<response id>-<i>` when there are several), n choices each."""
    request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    include_usage = bool(req.stream and req.stream_options and req.stream_options.include_usage)
    shape = ResponseShape(chat, request_id, int(time.time()), engine.model_name, include_usage)
    jobs = []
    for i, (ids, params, make_reader, writer, echo) in enumerate(specs):
        choices = [Choice(i * params.n + j, make_reader(), writer() if writer else None, echo) for j in range(params.n)]
        jobs.append(Job(request_id if len(specs) == 1 else f"{request_id}-{i}", ids, params,
                        state.metrics.track(len(ids), arrival), choices))  # fmt: skip
    return Generation(engine, shape, jobs, req.stream, "messages" if chat else "prompt")

"""Constrained replies: `response_format` and the tool-call grammars, as the engine's logits masks.

One `GrammarCompiler` serves the whole server, for the served tokenizer and the model's vocabulary
width. It is built on the first constrained request (its token table costs 0.03 s for the demo's
4k vocabulary, about 1 s for a 128k one: not on `make serve`'s path), and from then on the worker
fills a step's masks with it (`engine.worker.fill_masks`: llguidance's own threads). Each request
compiles its grammar once, here, so a grammar llguidance rejects is a 400 naming the field; every
sequence of the request (n, best_of) gets a copy of that matcher (`SamplingParams.logits_mask`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import anyio

from aioffload.serving.protocol import ApiError, ResponseFormat
from aioffload.worker.structured import GrammarCompiler, GrammarSpec, Matcher, StructuredOutputError

if TYPE_CHECKING:
    from aioffload.engine.async_engine import Engine

log = logging.getLogger("aioffload.http")


def response_format_spec(fmt: ResponseFormat | None) -> GrammarSpec | None:
    """`response_format` -> what the reply is constrained to (None: `text`, unconstrained)."""
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return GrammarSpec("json_object")
    if fmt.json_schema is None:
        raise ApiError(400, "response_format of type json_schema needs json_schema", "response_format.json_schema")
    if fmt.json_schema.schema_ is None:
        raise ApiError(400, "response_format.json_schema needs a schema", "response_format.json_schema.schema")
    return GrammarSpec.json_schema(fmt.json_schema.schema_)


class Grammars:
    """The server's GrammarCompiler, built once on first use (for the engine it was first asked for)."""

    def __init__(self) -> None:
        self._compiler: GrammarCompiler | None = None
        self._lock = asyncio.Lock()

    async def compiler(self, engine: Engine) -> GrammarCompiler:
        if self._compiler is None:
            async with self._lock:
                if self._compiler is None:
                    self._compiler = await anyio.to_thread.run_sync(build_compiler, engine)
        return self._compiler

    async def mask_factory(self, engine: Engine, spec: GrammarSpec, param: str,
                           tools: Sequence[dict[str, Any]] = ()) -> Callable[[], Matcher]:
        """A `SamplingParams.logits_mask` for `spec`; ApiError(400) naming `param` (or the tool whose
        parameters are at fault) when llguidance rejects it."""
        try:
            compiler = await self.compiler(engine)
        except StructuredOutputError as e:
            raise ApiError(400, f"constrained decoding is not available for this model: {e}", param) from None
        try:
            template = await anyio.to_thread.run_sync(compiler.compile, spec)
        except StructuredOutputError as e:
            raise ApiError(400, str(e), _culprit(compiler, tools) or param) from None
        return template.copy  # each sequence its own matcher, from the one compiled grammar


def build_compiler(engine: Engine) -> GrammarCompiler:
    """The compiler for the served tokenizer; the worker fills masks with it from now on."""
    t = time.perf_counter()
    compiler = GrammarCompiler.for_tokenizer(engine.tokenizer, engine.worker.model_config.vocab_size,
                                             engine.eos_token_ids)  # fmt: skip
    engine.worker.fill_masks = compiler.fill_bitmasks
    log.info("structured output: grammar compiler for %d token ids built in %.2f s", compiler.vocab_size,
             time.perf_counter() - t)  # fmt: skip
    return compiler


def _culprit(compiler: GrammarCompiler, tools: Sequence[dict[str, Any]]) -> str | None:
    """`tools[i].function.parameters` of the first tool whose schema does not compile alone."""
    for i, tool in enumerate(tools):
        params = tool["function"].get("parameters")
        if params is None:
            continue
        try:
            compiler.compile(GrammarSpec.json_schema(params))
        except StructuredOutputError:
            return f"tools[{i}].function.parameters"
    return None

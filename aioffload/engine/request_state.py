"""Per-request output bookkeeping: the output slot, detokenization, stop strings (no tensors)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from aioffload.checkpoint.tokenizer import IncrementalDetokenizer, Tokenizer
from aioffload.engine.outputs import RequestOutput
from aioffload.engine.request import Request
from aioffload.worker.logprobs import TokenLogprob
from aioffload.worker.sampling import find_stop_string


class OutputSlot:
    """One pending output per choice of a request (one choice unless n > 1). `put` never blocks:
    when the consumer lags, a choice's deltas merge into its pending one (`RequestOutput.merge`),
    so a slow reader neither stalls the engine nor grows a queue."""

    def __init__(self) -> None:
        self._pending: dict[int, RequestOutput] = {}  # choice index -> merged pending output
        self._ready = asyncio.Event()

    def put(self, out: RequestOutput) -> None:
        p = self._pending.get(out.index)
        if p is None:
            self._pending[out.index] = out
        else:
            p.merge(out)
        self._ready.set()

    async def get(self) -> RequestOutput:
        """The pending output of the lowest choice index that has one."""
        await self._ready.wait()
        out = self._pending.pop(min(self._pending))
        if not self._pending:
            self._ready.clear()
        return out


class RequestState:
    """Detokenization, stop strings and logprobs for one sequence (a request, or one of its choices).

    `output_id` / `index`: what its outputs are tagged with (the caller's request id, the choice).
    `prompt_source`: the request whose prefill scored the prompt (a choice's group leader).
    """

    def __init__(
        self, req: Request, slot: OutputSlot, tokenizer: Tokenizer, prompt_ids: Sequence[int],
        output_id: str | None = None, index: int = 0, prompt_source: Request | None = None,
    ) -> None:  # fmt: skip
        self.req = req
        self.slot = slot
        self.output_id = output_id if output_id is not None else req.request_id
        self.index = index
        self.want_logprobs = req.sampling.logprobs is not None
        self.cumulative: float | None = 0.0 if req.num_logprobs is not None else None
        self.prompt_source = prompt_source or req
        self.prompt_sent = req.sampling.prompt_logprobs is None
        self.min_tokens = req.sampling.min_tokens
        self.stop_from = 0  # stop strings must end at or after this char: text before min_tokens cannot stop
        sp = req.sampling
        self.detok = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens=sp.skip_special_tokens)
        # Ids whose text never shows when special tokens are kept: those that end generation.
        self.silent = frozenset() if sp.skip_special_tokens else frozenset(
            (*sp.stop_token_ids, *(() if sp.ignore_eos else req.eos_token_ids)))  # fmt: skip
        self.stops = req.sampling.stop
        self.hold = max((len(s) for s in self.stops), default=1) - 1  # chars that may start a stop string
        self.text = ""  # all text produced (before truncation at a stop string)
        self.sent = 0  # chars of self.text already handed out
        self.stop_hit = False
        self.finished = False
        # Tokens handed to on_token up to a stop string: the usage count. A step that accepted
        # proposals may have appended more to req.output_token_ids past the stop; those never count.
        self.num_output_tokens = 0

    def _output(self, text: str, token_ids: list[int]) -> RequestOutput:
        return RequestOutput(
            self.output_id, text, token_ids,
            num_prompt_tokens=self.req.num_prompt_tokens, num_output_tokens=self.num_output_tokens, index=self.index,
            logprobs=[] if self.want_logprobs else None, cumulative_logprob=self.cumulative,
        )  # fmt: skip

    def on_token(self, token_id: int, logprob: TokenLogprob | None = None) -> RequestOutput | None:
        if self.stop_hit:
            return None
        self.num_output_tokens += 1
        if token_id not in self.silent:
            self.text += self.detok.push(token_id)
        end = len(self.text)
        if self.stops:
            if self.num_output_tokens < self.min_tokens:  # as vLLM: no stop string before min_tokens
                self.stop_from = len(self.text)
                idx = None
            else:
                idx = find_stop_string(self.text, self.stops, start=max(self.stop_from, self.sent - self.hold))
            if idx is not None:
                self.stop_hit = True
                end = idx
            else:
                end = max(self.sent, len(self.text) - self.hold)
        delta = self.text[self.sent : end]
        self.sent = end
        if logprob is not None and self.cumulative is not None:
            self.cumulative += logprob.logprob
        out = self._output(delta, [token_id])
        if out.logprobs is not None and logprob is not None:
            out.logprobs.append(logprob)
        if not self.prompt_sent:
            self.prompt_sent = True
            out.prompt_logprobs = list(self.prompt_source.prompt_logprobs or [])
        return out

    def close(self, out: RequestOutput | None, reason: str) -> RequestOutput:
        """The final output: flushes held-back text (unless a stop string cut it)."""
        self.finished = True
        if out is None:
            out = self._output("", [])
        if not self.stop_hit:
            self.text += self.detok.flush()
            out.text += self.text[self.sent :]
            self.sent = len(self.text)
        out.finished, out.finish_reason = True, reason
        return out

    def abort(self) -> None:
        """End the stream with an "abort" output (the scheduler has dropped the request)."""
        self.finished = True
        out = self._output("", [])
        out.finished, out.finish_reason = True, "abort"
        self.slot.put(out)

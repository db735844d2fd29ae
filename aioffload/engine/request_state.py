"""Per-request output bookkeeping: the output slot, detokenization, stop strings (no tensors)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from aioffload.checkpoint.tokenizer import IncrementalDetokenizer, Tokenizer
from aioffload.engine.outputs import RequestOutput
from aioffload.engine.request import Request
from aioffload.worker.sampling import find_stop_string


class OutputSlot:
    """One pending output per request. `put` never blocks: when the consumer lags, deltas
    merge into the pending one, so a slow reader neither stalls the engine nor grows a queue."""

    def __init__(self) -> None:
        self._pending: RequestOutput | None = None
        self._ready = asyncio.Event()

    def put(self, out: RequestOutput) -> None:
        p = self._pending
        if p is None:
            self._pending = out
        else:
            p.text += out.text
            p.token_ids.extend(out.token_ids)
            p.finished = out.finished
            p.finish_reason = out.finish_reason
            p.num_output_tokens = out.num_output_tokens
        self._ready.set()

    async def get(self) -> RequestOutput:
        await self._ready.wait()
        out, self._pending = self._pending, None
        self._ready.clear()
        assert out is not None
        return out


class RequestState:
    """Detokenization and stop strings for one request."""

    def __init__(self, req: Request, slot: OutputSlot, tokenizer: Tokenizer, prompt_ids: Sequence[int]) -> None:
        self.req = req
        self.slot = slot
        self.detok = IncrementalDetokenizer(tokenizer, prompt_ids)
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
            self.req.request_id, text, token_ids,
            num_prompt_tokens=self.req.num_prompt_tokens, num_output_tokens=self.num_output_tokens,
        )  # fmt: skip

    def on_token(self, token_id: int) -> RequestOutput | None:
        if self.stop_hit:
            return None
        self.num_output_tokens += 1
        self.text += self.detok.push(token_id)
        end = len(self.text)
        if self.stops:
            idx = find_stop_string(self.text, self.stops, start=max(0, self.sent - self.hold))
            if idx is not None:
                self.stop_hit = True
                end = idx
            else:
                end = max(self.sent, len(self.text) - self.hold)
        delta = self.text[self.sent : end]
        self.sent = end
        return self._output(delta, [token_id])

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

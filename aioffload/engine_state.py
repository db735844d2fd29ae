"""Per-request output bookkeeping and engine statistics (no tensors, no scheduling)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from aioffload.outputs import RequestOutput
from aioffload.request import Request
from aioffload.sampling import find_stop_string
from aioffload.tokenizer import IncrementalDetokenizer, Tokenizer

if TYPE_CHECKING:
    from aioffload.engine import Engine
    from aioffload.scheduler import StepPlan

log = logging.getLogger("aioffload.engine")


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

    def _output(self, text: str, token_ids: list[int]) -> RequestOutput:
        return RequestOutput(
            self.req.request_id, text, token_ids,
            num_prompt_tokens=self.req.num_prompt_tokens, num_output_tokens=len(self.req.output_token_ids),
        )  # fmt: skip

    def on_token(self, token_id: int) -> RequestOutput | None:
        if self.stop_hit:
            return None
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


class StepStats:
    """Counters for /metrics and the periodic throughput log line."""

    def __init__(self, log_interval_s: float = 5.0) -> None:
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.steps_total = 0
        self.step_time_ema = 0.0
        self.log_interval_s = log_interval_s
        self._last_log = time.monotonic()
        self._last_prompt = 0
        self._last_gen = 0

    def record_step(self, plan: StepPlan, seconds: float) -> None:
        for req in plan.requests:
            n = plan.num_scheduled_tokens[req.request_id]
            # Positions of the prompt, and outputs recomputed after a preemption, are prompt work;
            # only the newest token's position is generation.
            c = req.num_computed_tokens
            self.prompt_tokens_total += max(0, min(c + n, max(req.num_prompt_tokens, req.num_tokens - 1)) - c)
        self.steps_total += 1
        self.step_time_ema = seconds if self.steps_total == 1 else 0.9 * self.step_time_ema + 0.1 * seconds

    def copy_busy_fraction(self, bytes_per_step: int, h2d_bytes_per_s: float) -> float:
        if not bytes_per_step or not self.step_time_ema:
            return 0.0
        return min(1.0, bytes_per_step / h2d_bytes_per_s / self.step_time_ema)

    def maybe_log(self, engine: Engine) -> None:
        now = time.monotonic()
        dt = now - self._last_log
        if dt < self.log_interval_s:
            return
        p = (self.prompt_tokens_total - self._last_prompt) / dt
        g = (self.generation_tokens_total - self._last_gen) / dt
        if p or g or engine.scheduler.has_unfinished:
            log.info(
                "prompt throughput %.1f tok/s, generation throughput %.1f tok/s, running %d, waiting %d, "
                "KV usage %.1f%%",
                p, g, engine.scheduler.num_running, engine.scheduler.num_waiting, engine.block_manager.usage * 100,
            )  # fmt: skip
        self._last_log, self._last_prompt, self._last_gen = now, self.prompt_tokens_total, self.generation_tokens_total

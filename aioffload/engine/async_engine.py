"""The asyncio engine: requests in, scheduler + worker each step, tokens out.

One loop task owns the scheduler. Each model step runs in a worker thread
(`asyncio.to_thread`), so HTTP streaming, /health and /metrics stay responsive during
a long offloaded step. Each request has one `OutputSlot`; the engine's `put` never
blocks and merges deltas when the consumer lags.

Beyond plain sampling (issue 13), all through `SamplingParams` and `RequestOutput`: logprobs and
prompt logprobs, penalties, logit_bias, min_tokens, a per-sequence logits mask (advanced here on
every emitted token) and n / best_of (engine/choices.py). A step of requests that use none of it
runs exactly as before.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator
from typing import Any

from aioffload.attention.kv_cache import BlockManager, BlockPool
from aioffload.checkpoint.checkpoint import Checkpoint
from aioffload.checkpoint.tokenizer import Tokenizer
from aioffload.config import EngineConfig
from aioffload.engine.choices import choice_ids, make_choices, stream_choices
from aioffload.engine.delivery import deliver_step
from aioffload.engine.lookahead import LaunchStep, launch_step, resolve_mode
from aioffload.engine.outputs import (
    EngineDeadError,
    InvalidRequestError,
    PromptTooLongError,
    QueueFullError,
    RequestOutput,
)
from aioffload.engine.placement_map import describe_placement
from aioffload.engine.request_state import OutputSlot, RequestState
from aioffload.engine.scheduler import Scheduler, StepPlan, should_hold
from aioffload.engine.speculative import Speculation, resolve_method
from aioffload.engine.stats import StepStats
from aioffload.engine.worker_step import StepResult, build_worker_step, collect
from aioffload.worker.pending import PendingStep
from aioffload.worker.sampling import SamplingParams
from aioffload.worker.worker import Worker

log = logging.getLogger("aioffload.engine")


class Engine:
    def __init__(self, config: EngineConfig, worker: Worker, tokenizer: Tokenizer, model_name: str) -> None:
        self.config = config
        self.worker = worker
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_model_len = worker.max_model_len
        self.block_manager = BlockManager(BlockPool(worker.num_blocks, worker.block_size))
        self.speculation = self._speculation()
        self.scheduler = Scheduler(config.scheduler, self.block_manager, self.max_model_len,
                                   speculation=self.speculation)  # fmt: skip
        self.eos_token_ids = tuple(sorted(set(tokenizer.eos_token_ids) | set(worker.model_config.eos_token_ids)))
        # The host/GPU split of offloaded layers (worker/hybrid.py), where the worker runs one: its
        # host share of each step goes into the step record.
        self._hybrid = worker.hybrid
        self.stats_ = StepStats(extra_fields=("host_share",) if self._hybrid is not None else ())
        self._states: dict[str, RequestState] = {}
        self._groups: dict[str, list[str]] = {}  # request id -> its choices' sequence ids (n / best_of > 1)
        self._pending_aborts: list[str] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._accepting = True
        self._dead: BaseException | None = None
        self._rng = random.Random(config.seed)
        self._configure_offload_batching()
        self._placement_map = describe_placement(worker, split=self._hybrid is not None)  # fixed for its life
        self._lookahead = resolve_mode(config.scheduler.lookahead, worker.graphs is not None)
        log.info("decode lookahead: %s", self._lookahead_reason())

    def _lookahead_reason(self) -> str:
        mode = self.config.scheduler.lookahead
        if not self._lookahead:
            return "off (--lookahead off)" if mode == "off" else "off (auto: decode does not run as a CUDA graph)"
        if not self.worker.can_launch(1):
            return "off (this worker waits on every step: tensor parallel, a draft model, the host split or offload)"
        return "on (each decode step launched before the last one's tokens are read)" + (
            "" if mode == "auto" else " (--lookahead on)")

    @property
    def lookahead(self) -> bool:
        """Whether decode lookahead is on (engine/lookahead.py; --lookahead and the worker decide)."""
        return self._lookahead

    @classmethod
    def from_config(cls, config: EngineConfig) -> Engine:
        ckpt = Checkpoint.open(config.model)
        tokenizer = Tokenizer.from_dir(config.model)
        worker = Worker(config, ckpt)
        name = config.served_model_name or ckpt.path.name
        return cls(config, worker, tokenizer, name)

    def _speculation(self) -> Speculation | None:
        spec = self.config.speculative
        method = resolve_method(spec, self.worker.offload_active)
        if method == "off":
            log.info("speculative decoding: off%s", " (auto: no offload)" if spec.method == "auto" else "")
            return None
        draft = self.worker.draft
        if method == "draft":
            assert draft is not None, "the worker loads the draft model for --speculative draft"
            what = f"draft model {spec.draft_model} ({draft.step_s * 1e3:.2f} ms per draft step)"
        else:
            what = f"prompt lookup, n = {spec.ngram_max}..{spec.ngram_min}"
        log.info("speculative decoding: %s%s; k chosen per step from measured acceptance, at most %d",
                 what, " (auto: offload is active)" if spec.method == "auto" else "", spec.num_tokens)  # fmt: skip
        return Speculation(method, spec, draft_step_s=draft.step_s if method == "draft" and draft else 0.0)

    def _configure_offload_batching(self) -> None:
        self.scheduler.token_budget = self.worker.token_budget
        self.scheduler.idle_token_budget = self.worker.idle_token_budget
        self.scheduler.step_cost = self.worker.step_cost  # bounds prefill beside decodes (None on the CPU)
        self.hold_s = self.config.scheduler.offload_hold_ms / 1e3 if self.worker.offload_active else 0.0
        if self.worker.offload_active:
            log.info(
                "scheduler: offload-aware: copy floor %.1f ms/step, token budget %d, up to %d sequences, hold %.0f ms",
                self.worker.copy_floor_s * 1e3, self.worker.token_budget, self.config.scheduler.max_num_seqs,
                self.hold_s * 1e3,
            )  # fmt: skip
        else:
            log.info("scheduler: latency-first (no offload), token budget %d, %d while nobody decodes",
                     self.scheduler.token_budget, self.worker.idle_token_budget)  # fmt: skip

    # ---- public API -------------------------------------------------------------------

    async def start(self) -> None:
        """Start the loop task on the running event loop (again, if an earlier loop is gone)."""
        running = asyncio.get_running_loop()
        if self._task is None or self._task.done() or self._task.get_loop() is not running:
            self._wake = asyncio.Event()  # an Event binds to the loop that first waits on it
            self._wake.set()
            self._task = asyncio.create_task(self._loop(), name="aioffload-engine")

    async def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop taking requests, let in-flight ones finish up to timeout_s, abort the rest."""
        self._accepting = False
        deadline = time.monotonic() + timeout_s
        while self._states and time.monotonic() < deadline and self._dead is None:
            await asyncio.sleep(0.05)
        for rid in list(self._states):
            self.abort(rid)
        if self._task is not None:
            self._wake.set()
            while self._states and self._dead is None and time.monotonic() < deadline + 5:
                await asyncio.sleep(0.02)
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
            self._task = None

    @property
    def is_dead(self) -> bool:
        """True once the loop stopped on a fatal error: /health reports it so the server gets restarted."""
        return self._dead is not None

    def abort(self, request_id: str) -> None:
        """Non-blocking: the request (every choice of it) stops before the next step; its blocks return."""
        live = [rid for rid in self._groups.get(request_id, (request_id,)) if rid in self._states]
        if live:
            self._pending_aborts.extend(live)
            self._wake.set()

    def stats(self) -> dict[str, float]:
        pool = self.block_manager.pool
        return {
            "num_running": self.scheduler.num_running,
            "num_waiting": self.scheduler.num_waiting,
            "kv_usage": self.block_manager.usage,
            "kv_blocks_free": pool.num_free,
            "kv_blocks_total": pool.num_blocks,
            "prompt_tokens_total": self.stats_.prompt_tokens_total,
            "generation_tokens_total": self.stats_.generation_tokens_total,
            "offload_bytes_per_step": self.worker.offload_bytes_per_step,
            "copy_busy_fraction": self.stats_.copy_busy_fraction(
                self.worker.offload_bytes_per_step, self.worker.h2d_bytes_per_s
            ),
            **self.worker.expert_stats(),  # MoE with offloaded experts: cache hit rate, bytes per step
            "steps_total": self.stats_.steps_total,
            "spec_proposed_tokens_total": self.stats_.spec_proposed_total,
            "spec_accepted_tokens_total": self.stats_.spec_accepted_total,
            "spec_emitted_tokens_total": self.stats_.spec_emitted_total,
            "spec_verifications_total": self.stats_.spec_verifications_total,
            "spec_mean_accepted_length": self.stats_.mean_accepted_length,
        }

    def describe(self) -> dict[str, Any]:
        """Where every weight lives, the KV cache and the copy floor (engine/placement_map.py)."""
        return self._placement_map

    def dashboard(self, since: int = 0) -> dict[str, Any]:
        """The live snapshot the dashboard polls: the steps recorded after step `since` (rows of
        `step_fields`) and the engine's counters now. Cheap, and takes no lock."""
        steps_total, steps = self.stats_.steps_since(since)
        return {**self.stats(), "time": time.time(), "model": self.model_name, "steps_total": steps_total,
                "step_fields": self.stats_.step_fields, "steps": steps,
                "copy_floor_ms": self.worker.copy_floor_s * 1e3}

    async def generate(
        self, prompt: str | list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """The request's outputs as they come (deltas; `RequestOutput.merge` folds a lagging reader's).

        n > 1: the choices' outputs interleave, told apart by `index` (0..n-1); the iterator ends when
        every choice has finished. best_of > n: nothing streams; once all candidates finished, the n
        of highest cumulative logprob come, best first, each as one finished output (index = rank).
        Raises ValueError("<field>: ...") for a request this engine cannot run (n / best_of above
        --max-num-seqs, a logit_bias id outside the vocabulary), and whatever `params.logits_mask()`
        raises. Aborting `request_id` aborts every choice.
        """
        if self._dead is not None or not self._accepting:
            raise EngineDeadError("the engine is shutting down")
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise PromptTooLongError("the prompt is empty")
        if len(ids) >= self.max_model_len:
            raise PromptTooLongError(
                f"the prompt has {len(ids)} tokens; --max-model-len {self.max_model_len} leaves no room for output"
            )
        if self.scheduler.num_waiting >= self.config.scheduler.max_queue:
            raise QueueFullError(f"{self.scheduler.num_waiting} requests are waiting (--max-queue)")
        m = params.num_candidates
        self._check_fits(params, m)
        seq_ids = choice_ids(request_id, m)
        if request_id in self._states or request_id in self._groups or any(s in self._states for s in seq_ids):
            raise ValueError(f"duplicate request id {request_id!r}")
        seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
        reqs = make_choices(seq_ids, ids, params, seed, self.eos_token_ids)
        slot = OutputSlot()
        states = [RequestState(r, slot, self.tokenizer, ids, request_id, i, reqs[0]) for i, r in enumerate(reqs)]
        for r, st in zip(reqs, states):
            self._states[r.request_id] = st
        if m > 1:
            self._groups[request_id] = seq_ids
        self.scheduler.add_request(reqs[0])
        self._wake.set()
        await self.start()
        try:
            async for out in stream_choices(slot, params):
                yield out
        finally:
            if any(not st.finished for st in states):
                self.abort(request_id)  # consumer went away (disconnect, cancellation)
            self._groups.pop(request_id, None)

    def _check_fits(self, params: SamplingParams, m: int) -> None:
        seqs = self.config.scheduler.max_num_seqs
        if m > seqs:
            field = "best_of" if params.best_of is not None else "n"
            raise InvalidRequestError(field, f"{m} sequences exceed --max-num-seqs {seqs}")
        vocab = self.worker.model_config.vocab_size
        if any(t >= vocab for t, _ in params.logit_bias):
            raise InvalidRequestError("logit_bias", f"token ids must be below the vocabulary size {vocab}")

    # ---- the loop ---------------------------------------------------------------------

    async def _loop(self) -> None:
        # A lookahead step already launched (engine/lookahead.py): its plan and its pending ids.
        inflight: tuple[StepPlan, PendingStep] | None = None
        done_at = 0.0  # when the last step's tokens arrived
        try:
            while True:
                self._apply_aborts()
                if inflight is not None and all(r.is_finished for r in inflight[0].requests):
                    inflight = None  # every sequence it computes has ended: its rows are dropped unread
                if inflight is None:
                    if not self.scheduler.has_unfinished:
                        self._wake.clear()
                        self._maybe_log()
                        await self._wake.wait()
                        continue
                    if self.hold_s and self._should_hold():
                        await asyncio.sleep(self.hold_s)
                        self._apply_aborts()
                    plan, pending = self.scheduler.schedule(), None
                    if plan.is_empty:
                        await asyncio.sleep(0.001)
                        continue
                else:
                    plan, pending = inflight
                nxt = self._plan_lookahead(plan)
                t0 = time.perf_counter() if pending is None else done_at  # a launched step ran since then
                sampled, launched = await asyncio.to_thread(self._run_step, plan, pending, nxt)
                done_at = time.perf_counter()
                self._record_step(plan, done_at - t0)
                if self.speculation is not None:
                    self.speculation.step_s = self.stats_.step_time_ema
                self._apply_aborts()  # aborts that arrived during the step
                deliver_step(plan, sampled, self.scheduler, self._states, self.stats_)
                inflight = (nxt, launched) if nxt is not None and launched is not None else None
                self._maybe_log()
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # a fatal worker error: fail every request, clearly
            log.exception("engine loop died")
            self._dead = e
            for st in self._states.values():
                st.abort()  # the error itself is in the log
            self._states.clear()

    def _record_step(self, plan: StepPlan, seconds: float) -> None:
        self.stats_.record_step(plan, seconds, () if self._hybrid is None else (self._hybrid.last_share,))

    def _maybe_log(self) -> None:
        s = self.scheduler
        self.stats_.maybe_log(s.num_running, s.num_waiting, self.block_manager.usage)

    def _should_hold(self) -> bool:
        s = self.scheduler
        newest = s.waiting[-1].arrival_time if s.waiting else None
        return should_hold(time.monotonic(), newest, s.num_running, self.config.scheduler.max_num_seqs, self.hold_s)

    def _plan_lookahead(self, plan: StepPlan) -> StepPlan | None:
        """The lookahead step after `plan` (engine/lookahead.py); None where the engine waits for
        plan's tokens first."""
        if not self._lookahead or self._pending_aborts or not self.worker.can_launch(len(plan.requests)):
            return None
        return self.scheduler.lookahead(plan)

    def _run_step(
        self, plan: StepPlan, pending: PendingStep | None, nxt: StepPlan | None
    ) -> tuple[StepResult, PendingStep | None]:
        """On the step thread: copy-on-write copies, then the worker's step; per request, its tokens
        (accepted proposals, then the target's next token) and the logprobs asked for. With `nxt`, the
        lookahead step is launched behind `plan` (launched here too unless `pending` is its launch)
        before plan's tokens are read; it comes back pending."""
        if pending is None and nxt is None:
            if plan.block_copies:
                self.worker.copy_blocks(plan.block_copies)
            ws = build_worker_step(plan, self.block_manager)
            out = self.worker.execute(ws.chunks, ws.params, ws.seeds, ws.steps, ws.num_draft, ws.extras)
            return collect(plan, out), None
        if pending is None:
            pending = self._launch(plan, launch_step(plan, self.block_manager), None)
        launched = None
        if nxt is not None:
            launched = self._launch(nxt, launch_step(nxt, self.block_manager, feeding=plan), pending)
        tokens = pending.wait()
        return StepResult({r.request_id: [t] for r, t in zip(plan.requests, tokens, strict=True)}), launched

    def _launch(self, plan: StepPlan, step: LaunchStep, feed: PendingStep | None) -> PendingStep:
        if plan.block_copies:
            self.worker.copy_blocks(plan.block_copies)
        return self.worker.launch(step.chunks, step.params, step.seeds, step.steps, feed, step.feed_rows)

    def _apply_aborts(self) -> None:
        while self._pending_aborts:
            rid = self._pending_aborts.pop()
            st = self._states.pop(rid, None)
            if st is None:
                continue
            self.scheduler.abort(rid)
            st.abort()

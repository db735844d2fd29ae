"""The asyncio engine: requests in, scheduler + worker each step, tokens out.

One loop task owns the scheduler. Each model step runs in a worker thread
(`asyncio.to_thread`), so HTTP streaming, /health and /metrics stay responsive during
a long offloaded step. Each request has one `OutputSlot`; the engine's `put` never
blocks and merges deltas when the consumer lags.
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
from aioffload.engine.outputs import EngineDeadError, PromptTooLongError, QueueFullError, RequestOutput
from aioffload.engine.placement_map import describe_placement
from aioffload.engine.request import Request
from aioffload.engine.request_state import OutputSlot, RequestState
from aioffload.engine.scheduler import Scheduler, StepPlan, should_hold
from aioffload.engine.speculative import Speculation, resolve_method
from aioffload.engine.stats import StepStats
from aioffload.worker.inputs import SeqChunk
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
        self._pending_aborts: list[str] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._accepting = True
        self._dead: BaseException | None = None
        self._rng = random.Random(config.seed)
        self._configure_offload_batching()
        self._placement_map = describe_placement(worker, split=self._hybrid is not None)  # fixed for its life

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
        self.scheduler.step_cost = self.worker.step_cost  # bounds prefill beside decodes (None on the CPU)
        self.hold_s = self.config.scheduler.offload_hold_ms / 1e3 if self.worker.offload_active else 0.0
        if self.worker.offload_active:
            log.info(
                "scheduler: offload-aware: copy floor %.1f ms/step, token budget %d, up to %d sequences, hold %.0f ms",
                self.worker.copy_floor_s * 1e3, self.worker.token_budget, self.config.scheduler.max_num_seqs,
                self.hold_s * 1e3,
            )  # fmt: skip
        else:
            log.info("scheduler: latency-first (no offload), token budget %d", self.scheduler.token_budget)

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
        """Non-blocking: the request stops before the next step and its blocks return."""
        if request_id in self._states:
            self._pending_aborts.append(request_id)
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
        if request_id in self._states:
            raise ValueError(f"duplicate request id {request_id!r}")
        seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
        req = Request(request_id, ids, params, eos_token_ids=self.eos_token_ids, seed=seed)
        state = RequestState(req, OutputSlot(), self.tokenizer, ids)
        self._states[request_id] = state
        self.scheduler.add_request(req)
        self._wake.set()
        await self.start()
        try:
            while True:
                out = await state.slot.get()
                yield out
                if out.finished:
                    return
        finally:
            if request_id in self._states and not state.finished:
                self.abort(request_id)  # consumer went away (disconnect, cancellation)

    # ---- the loop ---------------------------------------------------------------------

    async def _loop(self) -> None:
        try:
            while True:
                self._apply_aborts()
                if not self.scheduler.has_unfinished:
                    self._wake.clear()
                    self._maybe_log()
                    await self._wake.wait()
                    continue
                if self.hold_s and self._should_hold():
                    await asyncio.sleep(self.hold_s)
                    self._apply_aborts()
                plan = self.scheduler.schedule()
                if plan.is_empty:
                    await asyncio.sleep(0.001)
                    continue
                t0 = time.perf_counter()
                sampled = await asyncio.to_thread(self._run_step, plan)
                self._record_step(plan, time.perf_counter() - t0)
                if self.speculation is not None:
                    self.speculation.step_s = self.stats_.step_time_ema
                self._apply_aborts()  # aborts that arrived during the step
                self._postprocess(plan, sampled)
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

    def _run_step(self, plan: StepPlan) -> dict[str, list[int]]:
        """The worker's tokens per request: accepted proposals, then the target's next token."""
        chunks, params, seeds, steps, num_draft = [], [], [], [], []
        for req in plan.requests:
            rid = req.request_id
            n, k = plan.num_scheduled_tokens[rid], plan.num_spec_tokens.get(rid, 0)
            start = req.num_computed_tokens
            table = self.block_manager.block_table(rid)
            known = req.token_ids(start, start + n - k)
            proposals = plan.spec_token_ids.get(rid)
            if proposals is not None:  # prompt lookup: the proposals ride in the chunk
                chunks.append(SeqChunk([*known, *proposals], start, table, num_logits=k + 1))
                num_draft.append(0)
            else:  # k == 0, or the worker's draft model proposes k
                chunks.append(SeqChunk(known, start, table))
                num_draft.append(k)
            params.append(req.sampling)
            seeds.append(req.seed)
            steps.append(len(req.output_token_ids))
        out = self.worker.execute(chunks, params, seeds, steps, num_draft if any(num_draft) else None)
        return {req.request_id: t for req, t in zip(plan.requests, out.token_ids, strict=True)}

    def _apply_aborts(self) -> None:
        while self._pending_aborts:
            rid = self._pending_aborts.pop()
            st = self._states.pop(rid, None)
            if st is None:
                continue
            self.scheduler.abort(rid)
            st.abort()

    def _postprocess(self, plan: StepPlan, sampled: dict[str, list[int]]) -> None:
        before = {req.request_id: len(req.output_token_ids) for req in plan.requests}
        updated = self.scheduler.update(plan, sampled)
        for req in updated:
            rid = req.request_id
            new = req.output_token_ids[before[rid] :]
            st = self._states.get(rid)
            used = self._deliver(req, st, new) if st is not None else len(new)
            self.stats_.generation_tokens_total += used
            k = plan.num_spec_tokens.get(rid, 0)
            if k:
                self.stats_.record_verification(k, len(sampled[rid]) - 1, used)

    def _deliver(self, req: Request, st: RequestState, new: list[int]) -> int:
        """Hand this step's new tokens to the request's output slot, one at a time as a plain run
        would (stop strings end it mid-way); returns how many counted."""
        outs = []
        used = 0
        for token in new:
            out = st.on_token(token)
            used += 1
            if out is not None:
                outs.append(out)
            if st.stop_hit:
                break
        if st.stop_hit and not req.is_finished:
            self.scheduler.finish(req.request_id, "stop")
        last = outs.pop() if outs else None
        for out in outs:
            st.slot.put(out)
        if req.is_finished or st.stop_hit:
            # A stop string before the scheduler's own stop token wins: a plain run would have ended there.
            last = st.close(last, "stop" if used < len(new) else (req.finish_reason or "stop"))
            del self._states[req.request_id]
        if last is not None:
            st.slot.put(last)
        return used

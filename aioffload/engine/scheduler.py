"""Continuous batching: a token budget, chunked prefill, preemption by recompute.

There is no prefill phase and no decode phase. Each request has `num_computed_tokens`
(tokens whose K/V are in the cache) and wants `num_tokens - num_computed_tokens` more;
a step is `{request_id: num_tokens}` under a token budget. One step is
`plan = schedule()`, the worker runs `plan`, then `update(plan, sampled)`: one plan in
flight at a time.

Invariants:
- Only running requests own KV blocks; waiting ones (new or preempted) own none.
- The pool holds `max_model_len` tokens, so a request alone always fits: the oldest
  running request is never preempted and makes progress every step, hence no deadlock.
- Finished and aborted requests return all their blocks at once.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aioffload.attention.kv_cache import BlockManager
from aioffload.config import SchedulerConfig
from aioffload.engine.request import Request, RequestStatus

if TYPE_CHECKING:
    from aioffload.worker.step_cost import StepCost


@dataclass(frozen=True)
class StepPlan:
    """What the model computes in one step: running requests first, then new admissions."""

    num_scheduled_tokens: dict[str, int]  # request_id -> tokens this step, in batch order
    requests: list[Request]  # the same requests, same order
    preempted_ids: list[str]  # preempted during the schedule() call that built this plan

    @property
    def total_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values())

    @property
    def is_empty(self) -> bool:
        return not self.num_scheduled_tokens


class Scheduler:
    """FCFS continuous-batching scheduler over a paged KV cache; never touches tensors.

    `token_budget` (tokens per step) is a plain attribute: offload-aware sizing may change
    it between steps. It must stay >= 1. `step_cost` (None: no bound) bounds what long
    prompts' chunks take of a step that also carries decoding requests, so their
    inter-token latency stays within `step_cost.itl_factor` x a decode-only step.
    """

    def __init__(
        self,
        config: SchedulerConfig,
        block_manager: BlockManager,
        max_model_len: int,
        token_budget: int | None = None,
    ) -> None:
        capacity = block_manager.pool.num_blocks * block_manager.block_size
        if capacity < max_model_len:
            raise ValueError(
                f"KV pool holds {capacity} tokens, fewer than max_model_len={max_model_len}: "
                "a lone request could get stuck"
            )
        self.config = config
        self.block_manager = block_manager
        self.max_model_len = max_model_len
        self.token_budget = token_budget if token_budget is not None else config.max_num_batched_tokens
        self.step_cost: StepCost | None = None
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # admission order: the last one is the newest
        self._requests: dict[str, Request] = {}  # every unfinished request, by id

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.running or self.waiting)

    def add_request(self, request: Request) -> None:
        """Queue a new request (validated at the edge: non-empty prompt, < max_model_len tokens)."""
        assert request.request_id not in self._requests, f"duplicate request id {request.request_id}"
        request.status = RequestStatus.WAITING
        self._requests[request.request_id] = request
        self.waiting.append(request)

    def abort(self, request_id: str) -> Request | None:
        """Drop a running or waiting request, freeing all its blocks; None if unknown or finished."""
        request = self._requests.get(request_id)
        if request is None:
            return None
        self._remove(request)
        self._finish(request, "abort")
        return request

    def finish(self, request_id: str, reason: str) -> None:
        """Engine-side stop (e.g. a stop string matched): like abort, with `reason`."""
        request = self._requests.get(request_id)
        if request is not None:
            self._remove(request)
            self._finish(request, reason)

    def schedule(self) -> StepPlan:
        """Build the next step: running requests in order, then waiting ones FCFS.

        A running request that cannot get KV slots preempts the newest running request
        (possibly itself) until it fits. New requests are admitted only while budget and
        `max_num_seqs` allow, never past a head that does not fit, and not at all in a step
        that preempted (the freed blocks go to the requests already running).
        """
        budget = self.token_budget
        scheduled: dict[str, int] = {}
        requests: list[Request] = []
        preempted: list[str] = []
        prefill = _PrefillShare(self.running, self.step_cost)

        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            n = prefill.take(request, budget)
            if n == 0:  # a prefill chunk waits: this step's prefill share is spent
                i += 1
                continue
            if not self._allocate_or_preempt(request, n, preempted):
                break  # it preempted itself, so it was the last one
            scheduled[request.request_id] = n
            requests.append(request)
            budget -= n
            i += 1

        while not preempted and self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            n = prefill.take(request, budget)
            if n == 0 or not self.block_manager.allocate_slots(request.request_id, request.num_computed_tokens + n):
                break  # FCFS: nobody overtakes the head of the queue
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            scheduled[request.request_id] = n
            requests.append(request)
            budget -= n

        return StepPlan(scheduled, requests, preempted)

    def update(self, plan: StepPlan, sampled: dict[str, int]) -> list[Request]:
        """Record what the model computed for `plan`; return the requests that got a new token.

        `sampled[request_id]` must exist for each request whose last known token was
        computed this step; entries for requests still mid-prefill are ignored. Requests
        aborted or finished since schedule() are skipped. Finished requests (returned too)
        leave running and free their blocks.
        """
        emitted: list[Request] = []
        any_finished = False
        for request in plan.requests:
            if request.status is not RequestStatus.RUNNING:
                continue
            request.num_computed_tokens += plan.num_scheduled_tokens[request.request_id]
            if request.num_computed_tokens < request.num_tokens:
                continue  # mid-prefill: the sampled token is meaningless
            token = sampled[request.request_id]
            request.output_token_ids.append(token)
            emitted.append(request)
            reason = self._stop_reason(request, token)
            if reason is not None:
                self._finish(request, reason)
                any_finished = True
        if any_finished:
            self.running = [r for r in self.running if not r.is_finished]
        return emitted

    def _stop_reason(self, request: Request, token: int) -> str | None:
        sampling = request.sampling
        if token in sampling.stop_token_ids or (not sampling.ignore_eos and token in request.eos_token_ids):
            return "stop"
        if len(request.output_token_ids) >= sampling.max_tokens or request.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _allocate_or_preempt(self, request: Request, n: int, preempted: list[str]) -> bool:
        """Get slots for n more tokens of a running request, preempting the newest until they fit.

        Returns False when `request` itself had to be preempted.
        """
        while not self.block_manager.allocate_slots(request.request_id, request.num_computed_tokens + n):
            victim = self.running.pop()
            self._preempt(victim)
            preempted.append(victim.request_id)
            if victim is request:
                return False
        return True

    def _preempt(self, request: Request) -> None:
        """Free its blocks and requeue it at the head: it recomputes prompt + outputs later."""
        self.block_manager.free(request.request_id)
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.waiting.appendleft(request)

    def _remove(self, request: Request) -> None:
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)

    def _finish(self, request: Request, reason: str) -> None:
        self.block_manager.free(request.request_id)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        del self._requests[request.request_id]


class _PrefillShare:
    """How many tokens each request gets in one schedule() call.

    A decoding request (one token left to compute) gets its token. With a step cost and
    anyone decoding, the chunks of long prompts (those that would not fit in one step's
    prefill share, `StepCost.prefill_budget_s`) share that compute, each the most that
    fits from its position; the first gets at least one token, so a long prompt progresses
    every step. Short prompts go whole, as when nobody is decoding: a chunk takes what
    budget is left.
    """

    def __init__(self, running: list[Request], cost: StepCost | None) -> None:
        decoding = any(r.num_tokens - r.num_computed_tokens == 1 for r in running)
        self.cost = cost if decoding else None
        self.share_s = cost.prefill_budget_s() if cost is not None else 0.0
        self.seconds = self.share_s  # what the long prompts' chunks have left this step
        self.first = True

    def take(self, request: Request, budget: int) -> int:
        """Tokens for `request` (budget >= 1); 0 when its chunk must wait for a later step."""
        left = request.num_tokens - request.num_computed_tokens
        n = min(left, budget)
        start = request.num_computed_tokens
        if left > 1 and self.cost is not None and self.cost.max_chunk(start, self.share_s) < left:
            n = min(n, self.cost.max_chunk(start, self.seconds))
            n = max(n, 1) if self.first else n
            self.seconds -= self.cost.chunk_s(n, start)
            self.first = self.first and n == 0
        return n


def should_hold(now: float, newest_arrival: float | None, num_running: int, max_num_seqs: int, hold_s: float) -> bool:
    """Hold an offloaded step a moment when requests just arrived and there is room, so
    the next arrivals of a burst share this step's transfer instead of the next one's."""
    if hold_s <= 0 or newest_arrival is None or num_running >= max_num_seqs:
        return False
    return now - newest_arrival < hold_s

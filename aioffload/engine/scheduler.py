"""Continuous batching: a token budget, chunked prefill, preemption by recompute.

There is no prefill phase and no decode phase. Each request has `num_computed_tokens`
(tokens whose K/V are in the cache) and wants `num_tokens - num_computed_tokens` more;
a step is `{request_id: num_tokens}` under a token budget. One step is
`plan = schedule()`, the worker runs `plan`, then `update(plan, sampled)`: one plan in
flight at a time.

Speculative decoding (with a `Speculation` policy): a decoding request may carry k proposed
tokens after its last one, k + 1 query rows of the same step. `update` appends the accepted
proposals and the target's next token, rolls `num_computed_tokens` back to the accepted end and
frees the blocks past it. Proposals only use room left over: they never preempt, and never take
budget or KV blocks from a request that would otherwise run.

n / best_of (issue 13): a group's leader carries its followers (`Request.followers`) and is admitted
only when running has a seat for each of them. When its prefill completes, every follower forks the
blocks of the prompt's first P - 1 tokens and joins running with P - 1 computed: it computes the last
prompt token itself, so its first token is its own draw. The block manager copies a shared block
before a sequence writes into it (copy-on-write); the plan carries the (src, dst) pairs to copy.

Invariants:
- Only running requests own KV blocks; waiting ones (new or preempted) own none.
- The pool holds `max_model_len` tokens, so a request alone always fits: the oldest
  running request is never preempted and makes progress every step, hence no deadlock.
- Finished and aborted requests return all their blocks at once.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from aioffload.attention.kv_cache import BlockManager
from aioffload.config import SchedulerConfig
from aioffload.engine.prefill_share import PrefillShare
from aioffload.engine.request import Request, RequestStatus
from aioffload.engine.speculative import Speculation
from aioffload.engine.step_plan import StepPlan

if TYPE_CHECKING:
    from aioffload.worker.step_cost import StepCost


class Scheduler:
    """FCFS continuous-batching scheduler over a paged KV cache; never touches tensors.

    `token_budget` (tokens per step) is a plain attribute: offload-aware sizing may change
    it between steps. It must stay >= 1. `idle_token_budget` (None: the same) is a step's budget
    while nobody is decoding, for prompts' first chunks (engine/prefill_share.py). `step_cost`
    (None: no bound) bounds what long prompts' chunks take of a step that also carries decoding
    requests, so their inter-token latency stays within `step_cost.itl_factor` x a decode-only step.
    """

    def __init__(
        self,
        config: SchedulerConfig,
        block_manager: BlockManager,
        max_model_len: int,
        token_budget: int | None = None,
        speculation: Speculation | None = None,
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
        self.idle_token_budget: int | None = None  # a step's tokens with nobody decoding (None: token_budget)
        self.speculation = speculation
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
        """Queue a new request (validated at the edge: non-empty prompt, < max_model_len tokens, and
        num_seats <= max_num_seqs); its followers, if any, are known by id from now on too."""
        for r in (request, *request.followers):
            assert r.request_id not in self._requests, f"duplicate request id {r.request_id}"
            r.status = RequestStatus.WAITING
            self._requests[r.request_id] = r
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
        prefill = PrefillShare(self.running, self.step_cost, self.config.max_num_seqs, self.token_budget,
                               self.idle_token_budget)  # fmt: skip
        budget = prefill.step_budget
        scheduled: dict[str, int] = {}
        requests: list[Request] = []
        preempted: list[str] = []

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

        seats = len(self.running) + sum(len(r.followers) for r in self.running) if self.waiting else 0
        max_seqs = self.config.max_num_seqs
        while not preempted and self.waiting and budget > 0 and seats + self.waiting[0].num_seats <= max_seqs:
            request = self.waiting[0]
            n = prefill.take(request, budget)
            start = request.num_computed_tokens
            if n == 0 or not self.block_manager.allocate_slots(request.request_id, start + n, first_write=start):
                break  # FCFS: nobody overtakes the head of the queue
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            scheduled[request.request_id] = n
            requests.append(request)
            budget -= n
            seats += request.num_seats

        plan = StepPlan(scheduled, requests, preempted)
        if self.speculation is not None and not preempted:
            self._add_proposals(plan, budget)
        plan.block_copies.extend(self.block_manager.take_copies())  # every allocation of this step is done
        return plan

    def lookahead(self, plan: StepPlan) -> StepPlan | None:
        """The step after `plan`, planned while `plan` runs, before its tokens are known (decode
        lookahead, engine/lookahead.py): each of its decoding requests one token further, that token
        being `plan`'s output. It is what `schedule()` would return after `update(plan)` unless that
        depends on what the step yields, so None where it could differ:
        - a request of `plan` mid-prefill, with proposals or logits extras (logprobs, penalties,
          masks), or a running request `plan` left out;
        - a request waiting that could be admitted; `plan` preempted; speculation is on;
        - the KV blocks for the extra token are not free (a lookahead never preempts).
        A request whose token from `plan` surely ends it (max_tokens, max_model_len) is left out; one
        ended by a stop token or an abort is computed and dropped (`update` skips it). Allocates the
        slots (and queues any copy-on-write) as `schedule()` would."""
        if self.speculation is not None or plan.preempted_ids or plan.num_spec_tokens:
            return None
        live = [r for r in plan.requests if r.status is RequestStatus.RUNNING]
        if len(live) != len(self.running):
            return None
        if self.waiting and len(self.running) + self.waiting[0].num_seats <= self.config.max_num_seqs:
            return None
        nxt: list[Request] = []
        for r in live:
            if plan.num_scheduled_tokens[r.request_id] != 1 or r.num_computed_tokens + 1 != r.num_tokens:
                return None
            if r.needs_extras or r.followers:
                return None
            if len(r.output_token_ids) + 1 >= r.sampling.max_tokens or r.num_tokens + 1 >= self.max_model_len:
                continue  # plan's token is its last
            nxt.append(r)
        bm = self.block_manager
        if not nxt or sum(bm.blocks_needed(r.request_id, r.num_tokens + 1) for r in nxt) > bm.pool.num_free:
            return None
        for r in nxt:
            if not bm.allocate_slots(r.request_id, r.num_tokens + 1, first_write=r.num_tokens):
                return None  # copy-on-write took the last blocks; what was allocated is needed next anyway
        lookahead = StepPlan({r.request_id: 1 for r in nxt}, nxt, [])
        lookahead.block_copies.extend(bm.take_copies())
        return lookahead

    def _add_proposals(self, plan: StepPlan, budget: int) -> None:
        """Give decoding requests proposed tokens from what the step has left: `budget` tokens, and
        logits rows up to max_num_seqs (the logits memory the placement reserved). Oldest first, each
        at most a fair share of what remains, and only where KV blocks are free (no preemption)."""
        spec = self.speculation
        assert spec is not None
        rows_left = min(budget, self.config.max_num_seqs - len(plan.requests))
        if rows_left <= 0:  # a full batch (the usual offloaded step): no room for proposals
            return
        candidates = [
            r for r in plan.requests
            if plan.num_scheduled_tokens[r.request_id] == 1 and r.num_tokens - r.num_computed_tokens == 1
        ]  # fmt: skip
        for i, request in enumerate(candidates):
            if rows_left <= 0:
                break
            share = -(-rows_left // (len(candidates) - i))
            k = min(
                spec.num_wanted(request, self.token_budget), share,
                request.sampling.max_tokens - len(request.output_token_ids) - 1,  # the last token is never a proposal
                self.max_model_len - request.num_tokens - 1,
            )  # fmt: skip
            if k < 1:
                continue
            proposals = spec.propose(request, k)
            if proposals is not None:
                k = len(proposals)
            rid = request.request_id
            if k < 1 or not self.block_manager.allocate_slots(rid, request.num_tokens + k,
                                                              first_write=request.num_computed_tokens):
                continue
            plan.num_scheduled_tokens[rid] += k
            plan.num_spec_tokens[rid] = k
            if proposals is not None:
                plan.spec_token_ids[rid] = proposals
            rows_left -= k

    def update(self, plan: StepPlan, sampled: Mapping[str, int | Sequence[int]]) -> list[Request]:
        """Record what the model computed for `plan`; return the requests that got new tokens.

        `sampled[request_id]` must exist for each request whose last known token was computed this
        step: the tokens it emits, i.e. its accepted proposals then the target's next token (an int
        is one token, for a step without proposals); entries for requests still mid-prefill are
        ignored. Tokens are appended one at a time with the usual stop checks, so a stop token or
        max_tokens inside the accepted proposals ends the request there. Requests aborted or finished
        since schedule() are skipped. Finished requests (returned too) leave running and free their
        blocks; the others give back the blocks past their accepted end.
        """
        emitted: list[Request] = []
        any_finished = False
        for request in plan.requests:
            if request.status is not RequestStatus.RUNNING:
                continue
            rid = request.request_id
            k = plan.num_spec_tokens.get(rid, 0)
            request.num_computed_tokens += plan.num_scheduled_tokens[rid] - k
            if request.num_computed_tokens < request.num_tokens:
                continue  # mid-prefill: the sampled token is meaningless
            if request.followers:
                self._fork(request)
            out = sampled[rid]
            tokens = [out] if isinstance(out, int) else list(out)
            if k and self.speculation is not None:
                self.speculation.record(request, k, len(tokens) - 1)
            emitted.append(request)
            for i, token in enumerate(tokens):
                request.output_token_ids.append(token)
                reason = self._stop_reason(request, token)
                if reason is not None:
                    self._finish(request, reason)
                    any_finished = True
                    break
                if i < len(tokens) - 1:
                    request.num_computed_tokens += 1  # an accepted proposal: its K/V is in the cache
            if k and not request.is_finished:
                self.block_manager.truncate(rid, request.num_computed_tokens)
        if any_finished:
            self.running = [r for r in self.running if not r.is_finished]
        return emitted

    def _fork(self, leader: Request) -> None:
        """The leader's prompt is in the cache: its followers share it and join running (module docstring)."""
        assert not leader.output_token_ids, "a leader forks at the end of its first prefill"
        shared = leader.num_tokens - 1
        for f in leader.followers:
            self.block_manager.fork(leader.request_id, f.request_id, shared)
            f.num_computed_tokens = shared
            f.leader = None
            f.status = RequestStatus.RUNNING
            self.running.append(f)
        leader.followers = []

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
        start = request.num_computed_tokens
        while not self.block_manager.allocate_slots(request.request_id, start + n, first_write=start):
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
        if request.leader is not None:  # a follower not forked yet: it sits in its leader only
            request.leader.followers.remove(request)
            request.leader = None
        elif request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)

    def _finish(self, request: Request, reason: str) -> None:
        for f in request.followers:  # a leader gone before its prefill ended takes its followers along
            f.leader = None
            self._finish(f, reason)
        request.followers = []
        self.block_manager.free(request.request_id)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        del self._requests[request.request_id]


def should_hold(now: float, newest_arrival: float | None, num_running: int, max_num_seqs: int, hold_s: float) -> bool:
    """Hold an offloaded step a moment when requests just arrived and there is room, so
    the next arrivals of a burst share this step's transfer instead of the next one's."""
    if hold_s <= 0 or newest_arrival is None or num_running >= max_num_seqs:
        return False
    return now - newest_arrival < hold_s

"""Scheduler tests: CPU only, no tensors. A fake deterministic model stands in for the worker."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from aioffload.attention.kv_cache import BlockManager, BlockPool
from aioffload.config import SchedulerConfig
from aioffload.engine.request import Request, RequestStatus
from aioffload.engine.scheduler import Scheduler, StepPlan
from aioffload.worker.sampling import SamplingParams

VOCAB = 50
EOS = 0  # fake_next never produces it


def fake_next(token_ids: list[int]) -> int:
    """Greedy "model": a pure function of the sequence (its length and last tokens), never EOS."""
    h = len(token_ids)
    for t in token_ids[-3:]:
        h = (h * 31 + t) % 1_000_003
    return 1 + h % (VOCAB - 1)


def reference_output(
    prompt: list[int], max_tokens: int, max_model_len: int, stop_ids: tuple[int, ...] = ()
) -> list[int]:
    """What an unconstrained greedy run must produce for one request."""
    seq, out = list(prompt), []
    while True:
        token = fake_next(seq)
        seq.append(token)
        out.append(token)
        if token in stop_ids or len(out) >= max_tokens or len(seq) >= max_model_len:
            return out


def make_scheduler(
    num_blocks: int = 64,
    block_size: int = 4,
    max_num_seqs: int = 8,
    budget: int = 32,
    max_model_len: int = 64,
) -> Scheduler:
    config = SchedulerConfig(
        max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, max_model_len=max_model_len
    )
    return Scheduler(config, BlockManager(BlockPool(num_blocks, block_size)), max_model_len)


def make_requests(
    n: int, prompt_len: int, max_tokens: int, prefix: str = "r", start: int = 0, **sampling: object
) -> list[Request]:
    """n requests with distinct prompts, ids prefix{start}..prefix{start+n-1}."""
    return [
        Request(
            request_id=f"{prefix}{i}",
            prompt_token_ids=[1 + (i * 13 + j * 7) % (VOCAB - 1) for j in range(prompt_len)],
            sampling=SamplingParams(max_tokens=max_tokens, **sampling),  # type: ignore[arg-type]
            eos_token_ids=(EOS,),
        )
        for i in range(start, start + n)
    ]


def check_step(scheduler: Scheduler, plan: StepPlan, had_unfinished: bool) -> None:
    """Invariants that hold after every schedule() call."""
    bm = scheduler.block_manager
    assert plan.total_tokens <= max(scheduler.token_budget, scheduler.idle_token_budget or 0)
    assert scheduler.num_running <= scheduler.config.max_num_seqs
    if had_unfinished:
        assert not plan.is_empty, "deadlock: requests wait but nothing was scheduled"
    assert list(plan.num_scheduled_tokens) == [r.request_id for r in plan.requests]
    for r in plan.requests:
        n = plan.num_scheduled_tokens[r.request_id]
        assert r.status is RequestStatus.RUNNING
        assert 1 <= n <= r.num_tokens - r.num_computed_tokens
        if r.num_computed_tokens > 0:  # a chunk after a prefix: the token budget, idle or not
            assert n <= scheduler.token_budget
        assert len(bm.block_table(r.request_id)) * bm.block_size >= r.num_computed_tokens + n
    for r in scheduler.waiting:
        assert r.status is RequestStatus.WAITING and not bm.has(r.request_id)
    owned = sum(len(bm.block_table(r.request_id)) for r in scheduler.running)
    assert owned == bm.pool.num_blocks - bm.pool.num_free


def run_to_completion(
    scheduler: Scheduler,
    requests: list[Request],
    arrivals: dict[int, list[Request]] | None = None,
    on_step: Callable[[int, StepPlan], None] | None = None,
    max_steps: int = 5000,
) -> tuple[list[StepPlan], list[str]]:
    """Drive schedule() -> fake model -> update() until idle; return the plans and the finish order."""
    arrivals = dict(arrivals or {})
    for r in requests:
        scheduler.add_request(r)
    plans: list[StepPlan] = []
    finished: list[str] = []
    for step in range(max_steps):
        for r in arrivals.pop(step, []):
            scheduler.add_request(r)
        if not scheduler.has_unfinished and not arrivals:
            break
        had_unfinished = scheduler.has_unfinished
        plan = scheduler.schedule()
        check_step(scheduler, plan, had_unfinished)
        plans.append(plan)
        if on_step is not None:
            on_step(step, plan)
        sampled = {
            r.request_id: fake_next(r.token_ids(0, r.num_computed_tokens + n))
            for r, n in zip(plan.requests, plan.num_scheduled_tokens.values(), strict=True)
        }
        for r in scheduler.update(plan, sampled):
            if r.is_finished:
                finished.append(r.request_id)
    else:
        pytest.fail(f"not done after {max_steps} steps")
    pool = scheduler.block_manager.pool
    assert pool.num_free == pool.num_blocks
    assert scheduler.num_running == 0 and scheduler.num_waiting == 0
    return plans, finished


def assert_reference_outputs(requests: list[Request], max_model_len: int) -> None:
    for r in requests:
        assert r.is_finished
        expected = reference_output(r.prompt_token_ids, r.sampling.max_tokens, max_model_len)
        assert r.output_token_ids == expected, r.request_id


def test_empty_schedule_and_plan_properties() -> None:
    s = make_scheduler()
    plan = s.schedule()
    assert plan.is_empty and plan.total_tokens == 0 and plan.preempted_ids == []
    assert not s.has_unfinished
    reqs = make_requests(2, prompt_len=5, max_tokens=3)
    for r in reqs:
        s.add_request(r)
    plan = s.schedule()
    assert plan.num_scheduled_tokens == {"r0": 5, "r1": 5} and plan.total_tokens == 10
    assert plan.requests == reqs and s.num_running == 2 and s.num_waiting == 0


def test_pool_smaller_than_max_model_len_is_refused() -> None:
    with pytest.raises(ValueError, match="max_model_len"):
        make_scheduler(num_blocks=3, block_size=4, max_model_len=13)


def test_budget_and_max_num_seqs_respected() -> None:
    s = make_scheduler(num_blocks=128, max_num_seqs=3, budget=8, max_model_len=64)
    reqs = [r for i, n in enumerate([3, 11, 7, 20, 1, 5]) for r in make_requests(1, n, 6, start=i)]
    peak = 0

    def on_step(step: int, plan: StepPlan) -> None:
        nonlocal peak
        peak = max(peak, s.num_running)

    plans, _ = run_to_completion(s, reqs, on_step=on_step)
    assert peak == 3
    assert max(p.total_tokens for p in plans) == 8  # the budget is actually used up
    assert_reference_outputs(reqs, 64)


def test_token_budget_can_change_between_steps() -> None:
    s = make_scheduler(num_blocks=128, budget=16, max_model_len=64)
    reqs = make_requests(4, prompt_len=9, max_tokens=5)

    def on_step(step: int, plan: StepPlan) -> None:
        s.token_budget = 1 + (step * 5) % 11

    plans, _ = run_to_completion(s, reqs, on_step=on_step)
    assert [p.total_tokens for p in plans[:3]] == [16, 1, 6]
    assert_reference_outputs(reqs, 64)


def test_chunked_prefill_interleaves_with_decodes() -> None:
    s = make_scheduler(num_blocks=128, max_num_seqs=8, budget=16, max_model_len=128)
    decoders = make_requests(4, prompt_len=4, max_tokens=30)
    long = make_requests(1, prompt_len=50, max_tokens=3, prefix="long")[0]
    prefill_chunks: list[int] = []

    def on_step(step: int, plan: StepPlan) -> None:
        if step == 0:
            return
        for r in s.running:
            if r is not long and r.num_computed_tokens >= r.num_prompt_tokens:
                assert plan.num_scheduled_tokens.get(r.request_id) == 1, "a decode was stalled"
        if long.request_id in plan.num_scheduled_tokens and long.num_computed_tokens < long.num_prompt_tokens:
            prefill_chunks.append(plan.num_scheduled_tokens[long.request_id])
            assert len(plan.requests) == 5  # mixed with all four decodes

    run_to_completion(s, decoders, arrivals={3: [long]}, on_step=on_step)
    assert prefill_chunks == [12, 12, 12, 12, 2]
    assert_reference_outputs([*decoders, long], 128)


def test_a_lone_prompt_takes_the_idle_budget_then_the_token_budget_after_its_prefix() -> None:
    s = make_scheduler(num_blocks=128, budget=16, max_model_len=128)
    s.idle_token_budget = 64
    long = make_requests(1, prompt_len=100, max_tokens=3)[0]
    plans, _ = run_to_completion(s, [long])
    assert [p.num_scheduled_tokens["r0"] for p in plans] == [64, 16, 16, 4, 1, 1]
    assert_reference_outputs([long], 128)


def test_a_burst_of_prompts_keeps_the_token_budget_past_its_first_chunk() -> None:
    s = make_scheduler(num_blocks=128, max_num_seqs=8, budget=16, max_model_len=64)
    s.idle_token_budget = 40
    reqs = make_requests(3, prompt_len=30, max_tokens=2)
    plans, _ = run_to_completion(s, reqs)
    assert plans[0].num_scheduled_tokens == {"r0": 30}  # the first prompt whole: no 16-token budget left for r1
    assert plans[1].num_scheduled_tokens == {"r0": 1, "r1": 15}  # r0 decodes: the token budget for all
    assert plans[2].num_scheduled_tokens == {"r1": 15, "r2": 1}  # r0 is done; r1 goes on after its prefix
    assert_reference_outputs(reqs, 64)


def test_the_idle_budget_is_not_taken_while_anyone_decodes() -> None:
    s = make_scheduler(num_blocks=128, max_num_seqs=8, budget=16, max_model_len=128)
    s.idle_token_budget = 100
    decoders = make_requests(4, prompt_len=4, max_tokens=30)
    long = make_requests(1, prompt_len=50, max_tokens=3, prefix="long")[0]
    chunks: list[int] = []

    def on_step(step: int, plan: StepPlan) -> None:
        if long.request_id in plan.num_scheduled_tokens and long.num_computed_tokens < long.num_prompt_tokens:
            chunks.append(plan.num_scheduled_tokens[long.request_id])

    run_to_completion(s, decoders, arrivals={3: [long]}, on_step=on_step)
    assert chunks == [12, 12, 12, 12, 2]  # as with no idle budget (test_chunked_prefill_interleaves_with_decodes)
    assert_reference_outputs([*decoders, long], 128)


def test_preemption_under_tiny_pool_gives_unconstrained_outputs() -> None:
    def workload() -> list[Request]:
        return make_requests(6, prompt_len=8, max_tokens=16)

    free_run = workload()
    s = make_scheduler(num_blocks=256, max_num_seqs=6, budget=32, max_model_len=40)
    _, free_order = run_to_completion(s, free_run)
    assert sum(r.num_preemptions for r in free_run) == 0

    tight = workload()
    # each request ends at 24 tokens = 6 blocks of 4: the pool holds fewer than two of them
    s = make_scheduler(num_blocks=10, max_num_seqs=6, budget=32, max_model_len=40)
    plans, order = run_to_completion(s, tight)
    assert sum(r.num_preemptions for r in tight) > 0
    assert sum(len(p.preempted_ids) for p in plans) == sum(r.num_preemptions for r in tight)
    assert [r.output_token_ids for r in tight] == [r.output_token_ids for r in free_run]
    assert all(r.finish_reason == "length" for r in tight)
    assert order == free_order == [r.request_id for r in tight]  # FCFS survives preemption
    assert_reference_outputs(tight, 40)


def test_preempts_newest_and_requeues_it_at_the_head() -> None:
    s = make_scheduler(num_blocks=4, block_size=4, budget=64, max_model_len=16)
    a, b = make_requests(2, prompt_len=8, max_tokens=8)  # 8 tokens = 2 blocks each: pool full
    c = make_requests(1, prompt_len=2, max_tokens=1, start=2)[0]
    for r in (a, b, c):
        s.add_request(r)
    plan = s.schedule()
    assert list(plan.num_scheduled_tokens) == ["r0", "r1"] and s.waiting[0] is c
    s.update(plan, {"r0": 5, "r1": 6})
    s.token_budget = 5  # b's first recompute chunk (4 tokens, 1 block) would fit in what it frees
    plan = s.schedule()  # a's 9th token needs a third block: b (newest) is preempted, not readmitted
    assert plan.num_scheduled_tokens == {"r0": 1} and plan.preempted_ids == ["r1"]
    assert b.status is RequestStatus.WAITING and b.num_computed_tokens == 0 and b.num_preemptions == 1
    assert list(s.waiting) == [b, c] and b.output_token_ids == [6]  # recomputes prompt + outputs later
    assert not s.block_manager.has("r1")
    s.update(plan, {"r0": 7})
    plan = s.schedule()  # the next step readmits b first (head of the queue), in a chunk
    assert plan.num_scheduled_tokens == {"r0": 1, "r1": 4} and list(s.waiting) == [c]


def test_request_preempts_itself_when_newest() -> None:
    s = make_scheduler(num_blocks=4, block_size=4, budget=64, max_model_len=16)
    a = make_requests(1, prompt_len=8, max_tokens=8)[0]  # 2 blocks
    b = make_requests(1, prompt_len=4, max_tokens=8, start=1)[0]  # 1 block: 1 block left free
    s.add_request(a)
    s.add_request(b)
    s.update(s.schedule(), {"r0": 5, "r1": 6})
    plan = s.schedule()  # a takes the last block; b (newest) needs one too and preempts itself
    assert plan.num_scheduled_tokens == {"r0": 1} and plan.preempted_ids == ["r1"]
    assert s.running == [a] and list(s.waiting) == [b] and b.num_preemptions == 1
    s.update(plan, {"r0": 7})
    assert a.output_token_ids == [5, 7] and b.output_token_ids == [6]


def test_fcfs_head_is_never_overtaken() -> None:
    s = make_scheduler(num_blocks=8, block_size=4, budget=64, max_model_len=32)
    r0 = make_requests(1, prompt_len=20, max_tokens=10)[0]
    s.add_request(r0)
    s.update(s.schedule(), {"r0": 3})  # r0 owns 5 blocks (21 tokens next step needs 6)
    big = make_requests(1, prompt_len=16, max_tokens=2, start=1)[0]  # needs 4 blocks
    small = make_requests(1, prompt_len=4, max_tokens=2, start=2)[0]  # needs 1 block
    s.add_request(big)
    s.add_request(small)
    plan = s.schedule()
    assert plan.num_scheduled_tokens == {"r0": 1}
    assert list(s.waiting) == [big, small]


@pytest.mark.parametrize("num_blocks", [256, 12])
def test_equal_requests_finish_in_fcfs_order(num_blocks: int) -> None:
    s = make_scheduler(num_blocks=num_blocks, max_num_seqs=3, budget=10, max_model_len=48)
    reqs = make_requests(8, prompt_len=6, max_tokens=12)
    _, order = run_to_completion(s, reqs)
    assert order == [r.request_id for r in reqs]
    assert_reference_outputs(reqs, 48)


def test_abort_waiting_mid_prefill_and_running_free_all_blocks() -> None:
    s = make_scheduler(num_blocks=32, max_num_seqs=2, budget=8, max_model_len=64)
    pool = s.block_manager.pool
    decoding, prefilling, waiting = make_requests(3, prompt_len=4, max_tokens=20)
    prefilling.prompt_token_ids = prefilling.prompt_token_ids * 5  # 20 tokens: 3 chunks of <= 8
    for r in (decoding, prefilling, waiting):
        s.add_request(r)
    s.update(s.schedule(), {"r0": 7, "r1": 7})
    assert prefilling.num_computed_tokens == 4 and prefilling.output_token_ids == []  # mid-prefill

    assert s.abort("r2") is waiting and waiting.finish_reason == "abort" and waiting.is_finished
    assert s.num_waiting == 0
    assert s.abort("r1") is prefilling and prefilling.status is RequestStatus.FINISHED
    assert not s.block_manager.has("r1")
    assert s.abort("r0") is decoding and decoding.finish_reason == "abort"
    assert pool.num_free == pool.num_blocks and not s.has_unfinished
    assert s.abort("r0") is None and s.abort("nope") is None
    assert s.schedule().is_empty


def test_abort_and_finish_between_schedule_and_update() -> None:
    s = make_scheduler()
    a, b, c = make_requests(3, prompt_len=5, max_tokens=4)
    for r in (a, b, c):
        s.add_request(r)
    plan = s.schedule()
    s.abort("r1")
    s.finish("r2", "stop")  # e.g. a stop string matched in the detokenizer
    s.finish("r2", "stop")  # already finished: no-op
    emitted = s.update(plan, {"r0": 3, "r1": 4, "r2": 5})
    assert emitted == [a] and a.output_token_ids == [3]
    assert b.output_token_ids == [] and b.finish_reason == "abort"
    assert c.output_token_ids == [] and c.finish_reason == "stop"
    assert s.num_running == 1 and s.block_manager.has("r0")
    assert not s.block_manager.has("r1") and not s.block_manager.has("r2")
    s.abort("r0")
    assert s.block_manager.pool.num_free == s.block_manager.pool.num_blocks


def test_sampled_ids_mid_prefill_are_ignored() -> None:
    s = make_scheduler(budget=4)
    r = make_requests(1, prompt_len=10, max_tokens=3)[0]
    s.add_request(r)
    for expected_computed in (4, 8):
        assert s.update(s.schedule(), {"r0": 42}) == []
        assert r.num_computed_tokens == expected_computed and r.output_token_ids == []
    assert s.update(s.schedule(), {"r0": 42}) == [r]
    assert r.num_computed_tokens == 10 and r.output_token_ids == [42]


def _stop_index(ref: list[int]) -> int:
    """First k >= 2 whose token did not appear before it, so stopping on it stops exactly at k."""
    return next(k for k in range(2, len(ref)) if ref[k] not in ref[:k])


def test_stop_token_ids_eos_and_max_tokens() -> None:
    max_model_len = 64
    prompt_source = make_requests(1, prompt_len=6, max_tokens=10)[0]
    ref = reference_output(prompt_source.prompt_token_ids, 10, max_model_len)
    k = _stop_index(ref)

    by_stop = make_requests(1, 6, 10, prefix="stop", stop_token_ids=(ref[k],))[0]
    by_eos = make_requests(1, 6, 10, prefix="eos")[0]
    by_eos.eos_token_ids = (ref[k],)
    ignoring_eos = make_requests(1, 6, 10, prefix="ign", ignore_eos=True)[0]
    ignoring_eos.eos_token_ids = (ref[k],)
    by_length = make_requests(1, 6, 10, prefix="len")[0]
    reqs = [by_stop, by_eos, ignoring_eos, by_length]
    run_to_completion(make_scheduler(max_model_len=max_model_len), reqs)

    assert by_stop.output_token_ids == ref[: k + 1] and by_stop.finish_reason == "stop"
    assert by_eos.output_token_ids == ref[: k + 1] and by_eos.finish_reason == "stop"
    assert ignoring_eos.output_token_ids == ref and ignoring_eos.finish_reason == "length"
    assert by_length.output_token_ids == ref and by_length.finish_reason == "length"


def test_max_model_len_truncates_with_length() -> None:
    s = make_scheduler(num_blocks=8, block_size=4, max_model_len=16)
    long_gen = make_requests(1, prompt_len=10, max_tokens=100)[0]
    one_left = make_requests(1, prompt_len=15, max_tokens=100, start=1)[0]
    run_to_completion(s, [long_gen, one_left])
    assert len(long_gen.output_token_ids) == 6 and long_gen.num_tokens == 16
    assert len(one_left.output_token_ids) == 1
    assert long_gen.finish_reason == one_left.finish_reason == "length"
    assert_reference_outputs([long_gen, one_left], 16)


@pytest.mark.parametrize("seed", range(25))
def test_random_workloads_never_stall_and_match_reference(seed: int) -> None:
    rng = random.Random(seed)
    block_size = rng.choice([1, 2, 4, 8])
    max_model_len = 40
    min_blocks = -(-max_model_len // block_size)
    s = make_scheduler(
        num_blocks=rng.randint(min_blocks, 3 * min_blocks),
        block_size=block_size,
        max_num_seqs=rng.randint(1, 6),
        budget=rng.randint(1, 40),
        max_model_len=max_model_len,
    )
    arrivals: dict[int, list[Request]] = {}
    reqs: list[Request] = []
    for i in range(rng.randint(1, 12)):
        r = make_requests(1, rng.randint(1, 30), rng.randint(1, 20), start=i)[0]
        arrivals.setdefault(rng.randint(0, 30), []).append(r)
        reqs.append(r)
    to_abort = {r.request_id for r in reqs if rng.random() < 0.15}
    s.idle_token_budget = rng.choice([None, rng.randint(1, 60)])

    def on_step(step: int, plan: StepPlan) -> None:
        for rid in sorted(to_abort):
            if rng.random() < 0.2:
                s.abort(rid)

    run_to_completion(s, [], arrivals=arrivals, on_step=on_step)
    completed = [r for r in reqs if r.finish_reason != "abort"]
    assert all(r.request_id in to_abort for r in reqs if r.finish_reason == "abort")
    assert_reference_outputs(completed, max_model_len)


# ---- offload-aware sizing (pure functions) -------------------------------------------


def test_should_hold_only_for_fresh_arrivals_with_room() -> None:
    from aioffload.engine.scheduler import should_hold

    assert should_hold(10.000, 9.999, num_running=3, max_num_seqs=8, hold_s=0.003)
    assert not should_hold(10.000, 9.990, num_running=3, max_num_seqs=8, hold_s=0.003)  # arrival is old
    assert not should_hold(10.000, 9.999, num_running=8, max_num_seqs=8, hold_s=0.003)  # no room
    assert not should_hold(10.000, None, num_running=0, max_num_seqs=8, hold_s=0.003)  # nobody waiting
    assert not should_hold(10.000, 9.999, num_running=0, max_num_seqs=8, hold_s=0.0)  # offload off

"""Scheduler prefill sizing (issue 14): a long prompt beside decoding requests gets the share of a
step its StepCost allows while every decode keeps its token, a lone prompt keeps the whole
budget, and outputs stay those of an unconstrained run. CPU only, no tensors."""

from __future__ import annotations

import dataclasses
import random

import pytest

from aioffload.engine.scheduler import StepPlan
from aioffload.worker.step_cost import StepCost
from tests.test_scheduler import assert_reference_outputs, make_requests, make_scheduler, run_to_completion

# A resident model: decode-only steps take 6 ms, prefill 20 us a token (+ attention, when given).
RESIDENT = StepCost(floor_s=0.0, decode_s=0.006, token_s=2e-5, pair_s=0.0)


def long_prompt_beside_decoders(cost: StepCost | None, prompt_len: int, budget: int = 2048, idle: int | None = None):  # type: ignore[no-untyped-def]
    """16 requests decoding, then a long prompt arrives: per step, (prefill chunk, decodes in it)."""
    s = make_scheduler(num_blocks=512, block_size=16, max_num_seqs=32, budget=budget, max_model_len=4096)
    s.step_cost = cost
    s.idle_token_budget = idle
    decoders = make_requests(16, prompt_len=8, max_tokens=400)
    long = make_requests(1, prompt_len=prompt_len, max_tokens=2, prefix="long")[0]
    steps: list[tuple[int, int, int]] = []  # (prefill chunk, its first position, decodes in the step)

    def on_step(step: int, plan: StepPlan) -> None:
        n = plan.num_scheduled_tokens.get(long.request_id)
        if n is not None and long.num_computed_tokens < long.num_prompt_tokens:
            decodes = sum(1 for r in plan.requests if r is not long and plan.num_scheduled_tokens[r.request_id] == 1)
            steps.append((n, long.num_computed_tokens, decodes))

    run_to_completion(s, decoders, arrivals={2: [long]}, on_step=on_step)
    assert_reference_outputs([*decoders, long], 4096)
    assert sum(n for n, _, _ in steps) == prompt_len
    return steps


def test_prefill_beside_decodes_gets_the_share_that_keeps_the_step_within_the_itl_factor() -> None:
    steps = long_prompt_beside_decoders(RESIDENT, 3000)
    assert all(decodes == 16 for _, _, decodes in steps), "every decoding request runs every step"
    chunks = [n for n, _, _ in steps]
    assert chunks[:-1] == [300] * (len(chunks) - 1)  # 6 ms of prefill = 300 tokens: 2 x the 6 ms step
    for n, _, _ in steps:
        assert RESIDENT.step_s(RESIDENT.chunk_s(n, 0)) <= 2 * RESIDENT.alone_s + 1e-12


def test_without_a_step_cost_the_prefill_takes_what_the_decodes_leave() -> None:
    steps = long_prompt_beside_decoders(None, 3000)
    assert [n for n, _, _ in steps] == [2048 - 16, 3000 - 2032]


def test_attention_cost_shrinks_later_chunks() -> None:
    cost = StepCost(floor_s=0.0, decode_s=0.006, token_s=2e-5, pair_s=2e-9)
    steps = long_prompt_beside_decoders(cost, 3000)
    chunks = [n for n, _, _ in steps[:-1]]
    assert chunks == sorted(chunks, reverse=True) and chunks[0] > chunks[-1]
    for n, start, _ in steps[:-1]:  # each chunk is the most that fits from where it starts
        assert cost.chunk_s(n, start) <= cost.prefill_budget_s() < cost.chunk_s(n + 1, start)


def test_offloaded_prefill_beside_decodes_takes_few_streamed_steps() -> None:
    # A 194 ms copy floor, a quarter of the layers resident: a step may carry ~388 ms of prefill.
    cost = StepCost(floor_s=0.194, decode_s=0.197, token_s=2e-5, pair_s=0.0, exposed=0.25)
    steps = long_prompt_beside_decoders(cost, 4000, budget=16384)
    assert [n for n, _, _ in steps] == [4000]  # one streamed step, at 2 floors of compute at most
    assert cost.step_s(cost.chunk_s(4000, 0)) <= 2 * cost.alone_s


def test_an_idle_budget_changes_nothing_beside_decodes() -> None:
    want = long_prompt_beside_decoders(RESIDENT, 3000)
    got = long_prompt_beside_decoders(RESIDENT, 3000, idle=4096)
    assert got == want and max(n for n, _, _ in got) < 2048


def test_a_lone_prompt_keeps_the_whole_budget() -> None:
    s = make_scheduler(num_blocks=512, block_size=16, budget=1000, max_model_len=4096)
    s.step_cost = RESIDENT  # nobody is decoding: no bound
    long = make_requests(1, prompt_len=2500, max_tokens=2)[0]
    plans, _ = run_to_completion(s, [long])
    assert [p.total_tokens for p in plans] == [1000, 1000, 500, 1]


def test_short_prompts_beside_decodes_go_whole() -> None:
    """A burst of prompts that each fit in one step's share is admitted as without a step cost
    (the bound is for long prompts; vLLM's long-prefill threshold is the same idea)."""
    s = make_scheduler(num_blocks=512, block_size=16, max_num_seqs=32, budget=2048, max_model_len=4096)
    s.step_cost = RESIDENT  # a 300-token share
    decoders = make_requests(16, prompt_len=8, max_tokens=50)
    burst = make_requests(10, prompt_len=200, max_tokens=5, prefix="burst")
    admitted: list[int] = []

    def on_step(step: int, plan: StepPlan) -> None:
        admitted.append(sum(1 for r in burst if plan.num_scheduled_tokens.get(r.request_id) == 200))

    run_to_completion(s, decoders, arrivals={2: burst}, on_step=on_step)
    assert admitted[2] == 10
    assert_reference_outputs([*decoders, *burst], 4096)


def test_a_prompt_progresses_even_when_the_share_is_below_one_token() -> None:
    tiny = StepCost(floor_s=0.0, decode_s=1e-6, token_s=2e-5, pair_s=0.0)
    steps = long_prompt_beside_decoders(tiny, 40)
    assert [n for n, _, _ in steps] == [1] * 40


@pytest.mark.parametrize("seed", range(10))
def test_random_workloads_with_a_step_cost_match_reference(seed: int) -> None:
    rng = random.Random(seed)
    cost = StepCost(floor_s=rng.choice([0.0, 0.05]), decode_s=rng.uniform(1e-4, 0.01), token_s=1e-4,
                    pair_s=rng.choice([0.0, 1e-6]), exposed=rng.choice([1.0, 0.3]))  # fmt: skip
    s = make_scheduler(num_blocks=rng.randint(10, 30), block_size=4, max_num_seqs=rng.randint(1, 6),
                       budget=rng.randint(1, 40), max_model_len=40)  # fmt: skip
    s.step_cost = cost
    arrivals: dict[int, list] = {}
    reqs = []
    for i in range(rng.randint(1, 12)):
        r = make_requests(1, rng.randint(1, 30), rng.randint(1, 20), start=i)[0]
        arrivals.setdefault(rng.randint(0, 30), []).append(r)
        reqs.append(r)
    run_to_completion(s, [], arrivals=arrivals)
    assert_reference_outputs(reqs, 40)


def test_a_cut_chunk_takes_a_size_the_worker_has_a_graph_for() -> None:
    """With chunk graphs (StepCost.chunk_sizes), every chunk the share cuts short is a captured
    size, never more than the share allows; the prompt's last chunk is whatever is left."""
    sizes = (16, 32, 64, 96, 128, 160, 192, 224, 256)
    cost = dataclasses.replace(RESIDENT, pair_s=2e-9, chunk_sizes=sizes)
    steps = long_prompt_beside_decoders(cost, 3000)
    plain = long_prompt_beside_decoders(dataclasses.replace(cost, chunk_sizes=()), 3000)
    assert all(n in sizes for n, _, _ in steps[:-1])
    assert all(n <= cost.max_chunk(p, cost.prefill_budget_s()) for n, p, _ in steps[:-1])
    assert any(n not in sizes for n, _, _ in plain[:-1])  # without graphs the cut is the share's own
    assert cost.graph_chunk(300) == 256 and cost.graph_chunk(95) == 64 and cost.graph_chunk(9) == 9

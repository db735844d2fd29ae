"""Speculative scheduling without tensors: the k policy (engine/speculative.py) and the scheduler's
proposals, verification bookkeeping and KV rollback, driven by a fake greedy model."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from aioffload.attention.kv_cache import BlockManager, BlockPool
from aioffload.config import SchedulerConfig, SpeculativeConfig
from aioffload.engine.request import Request, RequestStatus
from aioffload.engine.scheduler import Scheduler, StepPlan
from aioffload.engine.speculative import Speculation, resolve_method, worthwhile_k
from aioffload.worker.sampling import SamplingParams

VOCAB = 40
Model = Callable[[list[int]], int]


def copy_model(seq: list[int]) -> int:
    """Greedy "model" that repeats its sequence with period 5, except at every 7th position: prompt
    lookup guesses most of its tokens and misses some."""
    n = len(seq)
    return seq[n - 5] if n % 7 else 1 + (n * 31 + seq[-1]) % (VOCAB - 1)


def drifting_draft(seq: list[int]) -> int:
    """A draft that agrees with copy_model except at every 3rd position."""
    return copy_model(seq) if len(seq) % 3 else (copy_model(seq) + 1) % VOCAB


def reference(prompt: list[int], sampling: SamplingParams, max_model_len: int) -> list[int]:
    seq, out = list(prompt), []
    while True:
        token = copy_model(seq)
        seq.append(token)
        out.append(token)
        if token in sampling.stop_token_ids or len(out) >= sampling.max_tokens or len(seq) >= max_model_len:
            return out


def make(num_blocks: int = 64, budget: int = 64, seqs: int = 8, max_model_len: int = 64, method: str = "ngram",
         cap: int = 8) -> Scheduler:  # fmt: skip
    config = SchedulerConfig(max_num_seqs=seqs, max_num_batched_tokens=budget, max_model_len=max_model_len)
    spec = Speculation(method, SpeculativeConfig(method=method, num_tokens=cap, ngram_min=1, ngram_max=3))
    return Scheduler(config, BlockManager(BlockPool(num_blocks, 4)), max_model_len, speculation=spec)


def requests(n: int, prompt_len: int = 11, **sampling: object) -> list[Request]:
    rng = random.Random(n * 100 + prompt_len)
    return [
        Request(f"r{i}", [rng.randrange(1, VOCAB) for _ in range(prompt_len)],
                SamplingParams(temperature=0.0, **sampling))  # type: ignore[arg-type]  # fmt: skip
        for i in range(n)
    ]


def verify_step(plan: StepPlan, draft: Model | None) -> dict[str, list[int]]:
    """What the worker returns: per request, the accepted proposals and then the model's next token."""
    sampled: dict[str, list[int]] = {}
    for r in plan.requests:
        n, k = plan.num_scheduled_tokens[r.request_id], plan.num_spec_tokens.get(r.request_id, 0)
        if r.num_computed_tokens + n - k < r.num_tokens:
            sampled[r.request_id] = [0]  # mid-prefill: ignored
            continue
        seq = r.all_token_ids
        proposals = plan.spec_token_ids.get(r.request_id)
        if proposals is None:  # the worker's draft model proposes
            assert draft is not None or k == 0
            proposals = []
            for _ in range(k):
                proposals.append(draft(seq + proposals))  # type: ignore[misc]
        out: list[int] = []
        for d in proposals:
            out.append(copy_model(seq + out))
            if out[-1] != d:
                break
        else:
            out.append(copy_model(seq + out))
        sampled[r.request_id] = out
    return sampled


def drive(s: Scheduler, reqs: list[Request], draft: Model | None = None,
          abort: dict[int, str] | None = None) -> list[StepPlan]:  # fmt: skip
    for r in reqs:
        s.add_request(r)
    plans = []
    bm = s.block_manager
    for step in range(2000):
        if step in (abort or {}):
            s.abort((abort or {})[step])
        if not s.has_unfinished:
            break
        plan = s.schedule()
        plans.append(plan)
        assert plan.total_tokens <= s.token_budget
        assert len(plan.requests) + sum(plan.num_spec_tokens.values()) <= s.config.max_num_seqs  # logits rows
        for r in plan.requests:
            n, k = plan.num_scheduled_tokens[r.request_id], plan.num_spec_tokens.get(r.request_id, 0)
            assert len(bm.block_table(r.request_id)) * bm.block_size >= r.num_computed_tokens + n
            # A proposal is never the last token a request may emit.
            assert k <= r.sampling.max_tokens - len(r.output_token_ids) - 1 and r.num_tokens + k < s.max_model_len
        s.update(plan, verify_step(plan, draft))
        owned = sum(len(bm.block_table(r.request_id)) for r in s.running)
        assert owned == bm.pool.num_blocks - bm.pool.num_free  # nothing leaks, rollback included
        for r in s.running:  # rolled back to the accepted end: one token (the newest) left to compute
            if r.num_computed_tokens >= r.num_prompt_tokens:
                assert r.num_tokens - r.num_computed_tokens == 1
                assert len(bm.block_table(r.request_id)) == -(-r.num_computed_tokens // bm.block_size)
    else:
        pytest.fail("not done")
    assert bm.pool.num_free == bm.pool.num_blocks
    return plans


# ---- the policy ----------------------------------------------------------------------------------


def test_worthwhile_k_is_the_last_proposal_that_pays() -> None:
    assert worthwhile_k(0.5, 1 / 1000, 16) == 9  # 0.5^9 = 0.00195 >= 0.001 > 0.5^10
    assert worthwhile_k(0.5, 1 / 4, 16) == 2  # exactly 0.25 still pays
    assert worthwhile_k(0.9, 0.1, 16) == 16  # capped (21 would pay)
    assert worthwhile_k(0.9, 0.1, 30) == 21
    assert worthwhile_k(0.0, 1e-4, 16) == 0 and worthwhile_k(0.3, 1.0, 16) == 0 and worthwhile_k(0.2, 0.5, 16) == 0
    assert worthwhile_k(1.0, 0.5, 7) == 7


def test_acceptance_is_measured_and_shrunk_towards_the_overall_rate() -> None:
    spec = Speculation("ngram", SpeculativeConfig(num_tokens=16))
    a, b = requests(2)
    assert spec.acceptance(a) == 0.5  # the prior
    spec.record(a, proposed=8, accepted=8)  # 8 trials, 8 accepted
    spec.record(a, proposed=4, accepted=1)  # accepted 1, then one rejected: 2 trials
    assert (a.num_spec_accepted, a.num_spec_trials) == (9, 10)
    overall = (9 + 0.5 * 4) / (10 + 4)
    assert spec.acceptance(b) == pytest.approx(overall)
    assert spec.acceptance(a) == pytest.approx((9 + overall * 4) / (10 + 4))
    # The cost side: a verification row is 1/budget of a step; a draft forward draft_step_s/step_s.
    assert spec.min_gain(1000) == pytest.approx(1e-3)
    draft = Speculation("draft", SpeculativeConfig(num_tokens=16), draft_step_s=0.002, step_s=0.2)
    assert draft.min_gain(1000) == pytest.approx(0.011)
    assert draft.num_wanted(a, 1000) == worthwhile_k(draft.acceptance(a), 0.011, 16)
    assert draft.propose(a, 5) is None  # the worker's draft model proposes


def test_auto_is_prompt_lookup_only_while_offload_is_active() -> None:
    assert resolve_method(SpeculativeConfig(), offload_active=True) == "ngram"
    assert resolve_method(SpeculativeConfig(), offload_active=False) == "off"
    assert resolve_method(SpeculativeConfig(method="ngram"), offload_active=False) == "ngram"
    assert resolve_method(SpeculativeConfig(method="off"), offload_active=True) == "off"


# ---- the scheduler ---------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_outputs_equal_the_plain_greedy_run(method: str) -> None:
    s = make(method=method)
    reqs = requests(5, max_tokens=30)
    plans = drive(s, reqs, drifting_draft)
    for r in reqs:
        assert r.output_token_ids == reference(r.prompt_token_ids, r.sampling, 64), r.request_id
        assert r.finish_reason == "length"
    proposed = sum(sum(p.num_spec_tokens.values()) for p in plans)
    accepted = sum(r.num_spec_accepted for r in reqs)
    assert proposed > 50 and 0 < accepted < proposed  # some accepted, some rolled back
    assert len(plans) < 5 + 30  # fewer steps than one token per step


def test_stop_token_inside_accepted_proposals_ends_the_request_there() -> None:
    reqs = requests(4, max_tokens=40)
    stops = []
    for r in reqs:  # stop at a token the plain run emits mid-way
        plain = reference(r.prompt_token_ids, r.sampling, 64)
        stops.append(plain[17])
    reqs = [Request(r.request_id, r.prompt_token_ids, SamplingParams(temperature=0.0, max_tokens=40,
                    stop_token_ids=(t,))) for r, t in zip(reqs, stops)]  # fmt: skip
    drive(make(), reqs)
    for r in reqs:
        assert r.output_token_ids == reference(r.prompt_token_ids, r.sampling, 64)
        assert r.finish_reason == "stop" and r.output_token_ids[-1] in r.sampling.stop_token_ids


def test_max_tokens_and_max_model_len_bound_k() -> None:
    s = make(max_model_len=32)
    reqs = requests(3, max_tokens=13) + [Request("long", [3, 4, 5, 6, 7] * 4, SamplingParams(temperature=0.0,
                                                  max_tokens=100))]  # fmt: skip
    plans = drive(s, reqs)
    for r in reqs:
        assert r.output_token_ids == reference(r.prompt_token_ids, r.sampling, 32)
    assert len(reqs[-1].output_token_ids) == 32 - 20 and reqs[-1].finish_reason == "length"
    assert any(p.num_spec_tokens for p in plans)  # drive() checked every k against both limits


def test_max_tokens_ending_mid_proposal_truncates_the_accepted_tokens() -> None:
    """update() appends one token at a time: tokens past max_tokens are dropped with their blocks."""
    s = make()
    (r,) = requests(1, prompt_len=6, max_tokens=3)
    s.add_request(r)
    s.update(s.schedule(), {"r0": [9]})  # prefill: first token
    plan = s.schedule()
    plan.num_scheduled_tokens["r0"] += 4  # as if 4 proposals had been scheduled
    plan.num_spec_tokens["r0"] = 4
    assert s.block_manager.allocate_slots("r0", r.num_tokens + 4)
    s.update(plan, {"r0": [5, 6, 7, 8, 1]})
    assert r.output_token_ids == [9, 5, 6] and r.finish_reason == "length"
    assert s.block_manager.pool.num_free == s.block_manager.pool.num_blocks and not s.has_unfinished


def test_rejected_proposals_roll_back_computed_tokens_and_blocks() -> None:
    s = make()
    r = Request("r0", [1, 2, 3, 4, 5, 1, 2, 3, 4], SamplingParams(temperature=0.0, max_tokens=50))
    s.add_request(r)
    s.update(s.schedule(), {"r0": [5]})  # prefill 9 tokens; "5" makes [..., 4, 5]: lookup proposes 1 2 3 4 5
    plan = s.schedule()
    assert plan.spec_token_ids["r0"] == [1, 2, 3, 4, 5] and plan.num_scheduled_tokens["r0"] == 6
    assert len(s.block_manager.block_table("r0")) == 4  # 10 tokens + 5 proposals = 15 slots
    s.update(plan, {"r0": [1, 2, 7]})  # two accepted, the third replaced
    assert r.output_token_ids == [5, 1, 2, 7]
    assert (r.num_computed_tokens, r.num_tokens) == (12, 13)
    assert len(s.block_manager.block_table("r0")) == 3 and r.num_spec_accepted == 2 and r.num_spec_trials == 3


def test_large_batches_leave_no_room_for_proposals() -> None:
    # 8 decoding sequences and max_num_seqs = 8: every logits row is taken, k = 0.
    s = make(seqs=8)
    plans = drive(s, requests(8, max_tokens=20))
    assert all(not p.num_spec_tokens for p in plans if len(p.requests) == 8)
    # A token budget of 10 for 8 sequences: 2 proposals per step, to the oldest first.
    s = make(seqs=64, budget=10)
    plans = drive(s, requests(8, max_tokens=20))
    full = [p for p in plans if len(p.requests) == 8 and all(r.num_computed_tokens >= 11 for r in p.requests)]
    assert full and all(sum(p.num_spec_tokens.values()) <= 2 for p in full)
    assert any(p.num_spec_tokens for p in full)


def test_preemption_and_abort_keep_outputs_and_free_every_block() -> None:
    # 12 blocks of 4 tokens: three requests of up to 11 + 30 tokens cannot all stay.
    s = make(num_blocks=12, max_model_len=48)
    reqs = requests(3, max_tokens=30) + requests(4, max_tokens=30)[3:]
    reqs[3].request_id = "gone"
    drive(s, reqs, abort={9: "gone"})
    assert sum(r.num_preemptions for r in reqs) > 0
    for r in reqs[:3]:
        assert r.output_token_ids == reference(r.prompt_token_ids, r.sampling, 48)
    assert reqs[3].finish_reason == "abort" and reqs[3].status is RequestStatus.FINISHED


def test_the_log_line_reports_the_mean_accepted_length(caplog: pytest.LogCaptureFixture) -> None:
    from aioffload.engine.stats import StepStats

    stats = StepStats(log_interval_s=0.0)
    stats.record_verification(proposed=8, accepted=5, emitted=6)
    stats.record_verification(proposed=4, accepted=0, emitted=1)
    assert stats.mean_accepted_length == 3.5
    with caplog.at_level("INFO", logger="aioffload.engine"):
        stats.maybe_log(num_running=1, num_waiting=0, kv_usage=0.5)
        stats.maybe_log(num_running=1, num_waiting=0, kv_usage=0.5)  # no verification since: no figure
    first, second = (r.getMessage() for r in caplog.records)
    assert first.endswith("KV usage 50.0%, mean accepted length 3.50") and second.endswith("KV usage 50.0%")

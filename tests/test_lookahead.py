"""Decode lookahead (engine/lookahead.py): the next decode step planned and launched before this
one's tokens are known. The scheduler's plan, the launch arguments, the worker's fed launch on the
CPU, and the engine's outputs with lookahead on against off."""

from __future__ import annotations

import asyncio

import pytest
import torch

from aioffload.checkpoint.checkpoint import Checkpoint
from aioffload.config import CacheConfig, ConfigError, EngineConfig, SchedulerConfig
from aioffload.engine.async_engine import Engine
from aioffload.engine.lookahead import PLACEHOLDER, launch_step, resolve_mode
from aioffload.engine.request import Request, RequestStatus
from aioffload.engine.scheduler import Scheduler, StepPlan
from aioffload.worker.inputs import SeqChunk
from aioffload.worker.sampling import SamplingParams
from aioffload.worker.worker import Worker
from tests.test_scheduler import fake_next, make_requests, make_scheduler, reference_output
from tests.tiny_models import add_word_tokenizer, make_checkpoint

# ---- the scheduler's lookahead plan --------------------------------------------------------------


def decoding(s: Scheduler, requests: list[Request]) -> StepPlan:
    """Admit and prefill `requests` whole; return the first all-decode plan."""
    for r in requests:
        s.add_request(r)
    plan = s.schedule()
    s.update(plan, {r.request_id: fake_next(r.all_token_ids) for r in plan.requests})
    plan = s.schedule()
    assert all(n == 1 for n in plan.num_scheduled_tokens.values())
    return plan


def test_lookahead_plans_each_decoding_request_one_token_further() -> None:
    s = make_scheduler(block_size=4, max_model_len=64)
    reqs = make_requests(2, prompt_len=6, max_tokens=10)
    plan = decoding(s, reqs)
    before = {r.request_id: (r.num_computed_tokens, r.num_tokens) for r in reqs}
    nxt = s.lookahead(plan)
    assert nxt is not None and nxt.requests == reqs and nxt.num_scheduled_tokens == {"r0": 1, "r1": 1}
    for r in reqs:  # nothing about the requests moved; only the slot for the pending token's position
        assert (r.num_computed_tokens, r.num_tokens) == before[r.request_id] == (6, 7)
        assert len(s.block_manager.block_table(r.request_id)) == 2  # covers 8 tokens: position 7 fits
    step = launch_step(nxt, s.block_manager, feeding=plan)
    assert [c.start for c in step.chunks] == [7, 7] and step.feed_rows == [0, 1]
    assert [list(c.token_ids) for c in step.chunks] == [[PLACEHOLDER]] * 2
    assert step.steps == [2, 2]  # the output index the lookahead token takes (the plan samples 1)
    own = launch_step(plan, s.block_manager)
    assert [c.start for c in own.chunks] == [6, 6] and own.feed_rows is None
    assert [c.token_ids[0] for c in own.chunks] == [r.output_token_ids[-1] for r in reqs] and own.steps == [1, 1]


def test_lookahead_allocates_the_next_block_at_a_boundary() -> None:
    s = make_scheduler(block_size=4, max_model_len=64)
    (r,) = make_requests(1, prompt_len=7, max_tokens=10)
    plan = decoding(s, [r])  # 8 tokens known; the plan computes position 7, the lookahead position 8
    assert len(s.block_manager.block_table("r0")) == 2
    assert s.lookahead(plan) is not None
    assert len(s.block_manager.block_table("r0")) == 3


def test_no_lookahead_while_an_admission_could_change_the_next_plan() -> None:
    s = make_scheduler(max_num_seqs=2)
    plan = decoding(s, make_requests(1, prompt_len=5, max_tokens=10))
    s.add_request(make_requests(1, prompt_len=5, max_tokens=10, start=1)[0])
    assert s.lookahead(plan) is None  # a seat is free: schedule() would admit r1
    s2 = make_scheduler(max_num_seqs=1)
    plan2 = decoding(s2, make_requests(1, prompt_len=5, max_tokens=10))
    s2.add_request(make_requests(1, prompt_len=5, max_tokens=10, start=1)[0])
    assert s2.lookahead(plan2) is not None  # no seat: r1 waits either way


def test_no_lookahead_for_prefill_extras_or_a_full_pool() -> None:
    s = make_scheduler(budget=4)
    s.add_request(make_requests(1, prompt_len=9, max_tokens=5)[0])
    assert s.lookahead(s.schedule()) is None  # a prefill chunk
    s = make_scheduler()
    (r,) = make_requests(1, prompt_len=5, max_tokens=5)
    r.needs_extras = True
    assert s.lookahead(decoding(s, [r])) is None
    s = make_scheduler(num_blocks=16, block_size=4, max_model_len=64)
    (r,) = make_requests(1, prompt_len=7, max_tokens=30)
    plan = decoding(s, [r])
    s.block_manager.pool.allocate(s.block_manager.pool.num_free)  # nothing left for position 8's block
    assert s.lookahead(plan) is None and len(s.block_manager.block_table("r0")) == 2


def test_a_request_the_pending_token_surely_ends_is_left_out() -> None:
    s = make_scheduler()
    last, more = make_requests(1, prompt_len=5, max_tokens=2) + make_requests(1, prompt_len=5, max_tokens=9, start=1)
    plan = decoding(s, [last, more])  # `last` has 1 of 2 tokens: the plan's token is its last
    nxt = s.lookahead(plan)
    assert nxt is not None and [r.request_id for r in nxt.requests] == ["r1"]
    assert launch_step(nxt, s.block_manager, feeding=plan).feed_rows == [1]
    s = make_scheduler()
    assert s.lookahead(decoding(s, make_requests(1, prompt_len=5, max_tokens=2))) is None  # nobody left


def pipelined_run(s: Scheduler, requests: list[Request], arrivals: dict[int, list[Request]]) -> int:
    """Drive the scheduler as the engine does with lookahead, the fake model standing in for the
    device (a lookahead step's token computed from the pending one); returns the lookahead steps."""
    for r in requests:
        s.add_request(r)
    inflight: tuple[StepPlan, dict[str, int]] | None = None
    looked = 0
    for step in range(2000):
        for r in arrivals.pop(step, []):
            s.add_request(r)
        if inflight is not None and all(r.is_finished for r in inflight[0].requests):
            inflight = None
        if inflight is None:
            if not s.has_unfinished and not arrivals:
                return looked
            plan = s.schedule()
            tokens = {r.request_id: fake_next(r.token_ids(0, r.num_computed_tokens + n))
                      for r, n in zip(plan.requests, plan.num_scheduled_tokens.values())}  # fmt: skip
        else:
            plan, tokens = inflight
        nxt = s.lookahead(plan)
        if nxt is not None:
            looked += 1
            ahead = {r.request_id: fake_next([*r.all_token_ids, tokens[r.request_id]]) for r in nxt.requests}
        s.update(plan, tokens)
        inflight = (nxt, ahead) if nxt is not None else None
    pytest.fail("not done")


def test_pipelined_outputs_equal_the_plain_runs() -> None:
    s = make_scheduler(num_blocks=40, block_size=4, max_num_seqs=3, budget=16, max_model_len=48)
    reqs = make_requests(3, prompt_len=7, max_tokens=15) + make_requests(1, prompt_len=4, max_tokens=3, start=3)
    late = make_requests(2, prompt_len=9, max_tokens=20, start=4)
    stop = make_requests(1, prompt_len=6, max_tokens=30, start=6)
    stop_at = reference_output(stop[0].prompt_token_ids, 30, 48)[4]
    stop[0].sampling = SamplingParams(max_tokens=30, stop_token_ids=(stop_at,))
    looked = pipelined_run(s, reqs, {5: late, 9: stop})
    assert looked > 20
    for r in reqs + late:
        assert r.output_token_ids == reference_output(r.prompt_token_ids, r.sampling.max_tokens, 48), r.request_id
    assert stop[0].output_token_ids == reference_output(stop[0].prompt_token_ids, 30, 48, (stop_at,))
    assert stop[0].finish_reason == "stop" and len(stop[0].output_token_ids) == 5
    pool = s.block_manager.pool
    assert pool.num_free == pool.num_blocks and all(r.status is RequestStatus.FINISHED for r in reqs + late + stop)


def test_resolve_mode_and_config() -> None:
    assert resolve_mode("auto", True) and not resolve_mode("auto", False)
    assert resolve_mode("on", False) and not resolve_mode("off", True)
    with pytest.raises(ConfigError, match="--lookahead must be one of auto, on, off"):
        EngineConfig(model="x", scheduler=SchedulerConfig(lookahead="sometimes")).validate()


# ---- the worker's fed launch and the engine, on the CPU -----------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(add_word_tokenizer(make_checkpoint(tmp_path_factory.mktemp("lookahead"), "llama", seed=9, layers=3)))


def engine_config(model: str, lookahead: str, seqs: int = 8) -> EngineConfig:
    return EngineConfig(
        model=model, device="cpu", cache=CacheConfig(num_blocks=128, block_size=4),
        scheduler=SchedulerConfig(max_model_len=96, max_num_batched_tokens=64, max_num_seqs=seqs, lookahead=lookahead),
    ).validate()  # fmt: skip


def test_fed_launch_equals_execute_of_the_known_tokens(tiny: str) -> None:
    worker = Worker(engine_config(tiny, "on"), Checkpoint.open(tiny))
    assert worker.can_launch(3)
    greedy = [SamplingParams(max_tokens=4, temperature=0.0)] * 2
    prompts = [[5, 9, 13, 2, 7], [30, 31, 32]]
    tables = [[0, 1], [2]]
    worker.execute([SeqChunk(p, 0, t) for p, t in zip(prompts, tables)], greedy, [0, 0], [0, 0])
    first = worker.launch([SeqChunk([p[-1]], len(p) - 1, t) for p, t in zip(prompts, tables)], greedy, [0, 0], [0, 0])
    # the next step, fed from `first` with its rows swapped
    fed = worker.launch([SeqChunk([PLACEHOLDER], len(p), t) for p, t in zip(prompts[::-1], tables[::-1])],
                        greedy[::-1], [0, 0], [1, 1], feed=first, feed_rows=[1, 0])  # fmt: skip
    ids = first.wait()
    plain = Worker(engine_config(tiny, "off"), Checkpoint.open(tiny))
    plain.execute([SeqChunk(p, 0, t) for p, t in zip(prompts, tables)], greedy, [0, 0], [0, 0])
    out = plain.execute([SeqChunk([p[-1]], len(p) - 1, t) for p, t in zip(prompts, tables)], greedy, [0, 0], [0, 0])
    assert ids == [t[0] for t in out.token_ids]
    out2 = plain.execute([SeqChunk([ids[i]], len(prompts[i]), tables[i]) for i in (1, 0)], greedy, [0, 0], [1, 1])
    assert fed.wait() == [t[0] for t in out2.token_ids]


def run_engine(model: str, lookahead: str, jobs: list[tuple[list[int], SamplingParams]],
               abort_after: dict[int, int] | None = None) -> tuple[list[list[int]], int]:  # fmt: skip
    """Each job's output ids on the CPU, and how many steps the worker launched ahead."""
    return run_config(engine_config(model, lookahead), jobs, abort_after)


def run_config(config: EngineConfig, jobs: list[tuple[list[int], SamplingParams]],
               abort_after: dict[int, int] | None = None) -> tuple[list[list[int]], int]:  # fmt: skip
    """run_engine for any engine config (tests/test_lookahead_gpu.py's on the GPU)."""
    engine = Engine.from_config(config)
    launches = 0
    real = engine.worker.launch

    def counting(*a, **k):  # type: ignore[no-untyped-def]
        nonlocal launches
        launches += 1
        return real(*a, **k)

    engine.worker.launch = counting  # type: ignore[method-assign]

    async def one(i: int, prompt: list[int], params: SamplingParams) -> list[int]:
        ids: list[int] = []
        async for out in engine.generate(prompt, params, f"j{i}"):
            ids.extend(out.token_ids)
            if abort_after and len(ids) >= abort_after.get(i, 10**9):
                engine.abort(f"j{i}")
        return ids

    async def main() -> list[list[int]]:
        try:
            return list(await asyncio.gather(*(one(i, p, sp) for i, (p, sp) in enumerate(jobs))))
        finally:
            await engine.shutdown(1.0)

    return asyncio.run(main()), launches


def test_engine_outputs_equal_with_lookahead_on_and_off(tiny: str) -> None:
    greedy = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    probe, _ = run_engine(tiny, "off", [([4, 8, 15, 16, 23, 42], greedy)])
    stop_at = probe[0][6]
    jobs = [
        ([4, 8, 15, 16, 23, 42], greedy),
        ([4, 8, 15, 16, 23, 42], SamplingParams(max_tokens=24, temperature=0.0, stop_token_ids=(stop_at,))),
        ([7, 7, 3], SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)),
        ([50, 60, 70, 80], SamplingParams(max_tokens=20, temperature=0.9, top_p=0.9, seed=4, ignore_eos=True)),
        ([11, 12], SamplingParams(max_tokens=12, temperature=0.7, seed=5, n=2, ignore_eos=True)),
    ]
    off, none = run_engine(tiny, "off", jobs)
    on, launched = run_engine(tiny, "on", jobs)
    assert none == 0 and launched > 10
    assert on == off
    # the stop token (not delivered) ended it early, in lookahead's run too; max_tokens=5 ended the third
    assert len(off[1]) < 7 and off[1] == probe[0][: len(off[1])] and len(off[2]) == 5


def test_abort_while_a_lookahead_step_is_in_flight(tiny: str) -> None:
    greedy = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    jobs = [([9, 8, 7], greedy), ([1, 2, 3, 4], greedy)]
    off, _ = run_engine(tiny, "off", jobs)
    on, launched = run_engine(tiny, "on", jobs, abort_after={0: 5})
    assert launched > 10 and on[1] == off[1]
    assert 5 <= len(on[0]) < 30 and on[0] == off[0][: len(on[0])]


def test_served_decode_times_tokens_with_lookahead_off_and_on(tiny: str) -> None:
    from aioffload.bench.served_decode import _one, served_decode

    worker = Worker(engine_config(tiny, "auto"), Checkpoint.open(tiny))
    out = served_decode(worker, context=12, tokens=6)
    assert out["context"] == 12 and not out["off"]["lookahead"] and not out["auto"]["lookahead"]  # the CPU: auto = off
    on = asyncio.run(_one(worker, "on", [5, 6, 7, 8], 6))
    for r in (out["off"], out["auto"], on):
        assert r["tokens"] == 6 and r["mean_ms"] > 0 and r["gaps_ms"]["p50"] > 0
    assert on["lookahead"]


def test_lookahead_auto_is_off_on_the_cpu(tiny: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO", logger="aioffload.engine"):
        engine = Engine.from_config(engine_config(tiny, "auto"))
    assert not engine.lookahead
    assert "decode lookahead: off (auto: decode does not run as a CUDA graph)" in caplog.text
    assert torch.get_default_device().type == "cpu"

"""n > 1 and best_of: one prefill shared through forked blocks with copy-on-write, derived seeds, ranking,
group aborts, seats in running; every block back after every test."""

from __future__ import annotations

import asyncio

import pytest

from aioffload.config import DEMO_MODEL, CacheConfig, EngineConfig, SchedulerConfig
from aioffload.engine.async_engine import Engine
from aioffload.engine.choices import choice_ids, choice_seed, make_choices, rank_best_of
from aioffload.engine.outputs import RequestOutput
from aioffload.engine.request import RequestStatus
from aioffload.worker.sampling import SamplingParams
from tests.helpers import make_cpu_engine as make
from tests.helpers import run_jobs as run
from tests.test_scheduler import make_scheduler
from tests.tiny_models import add_word_tokenizer, make_checkpoint

DEMO = DEMO_MODEL


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(add_word_tokenizer(make_checkpoint(tmp_path_factory.mktemp("choices"), "llama", seed=7, layers=3)))




def by_choice(outs: list[RequestOutput]) -> dict[int, list[int]]:
    got: dict[int, list[int]] = {}
    for o in outs:
        got.setdefault(o.index, []).extend(o.token_ids)
    return got


def sampled(n: int = 1, seed: int | None = 5, max_tokens: int = 12, **kw: object) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed, n=n, ignore_eos=True, **kw)  # type: ignore[arg-type]


def test_n4_with_a_seed_gives_4_reproducible_different_samples_on_the_demo_model() -> None:
    engine = make(DEMO)
    p = sampled(4, seed=1234, max_tokens=16)
    first = run(engine, [("Once upon a time", p)])[0]
    again = run(engine, [("Once upon a time", p)])[0]
    texts = {i: "".join(o.text for o in first if o.index == i) for i in range(4)}
    assert by_choice(first) == by_choice(again) and len(by_choice(first)) == 4
    assert len(set(texts.values())) == 4, texts
    assert [sum(o.finished for o in first if o.index == i) for i in range(4)] == [1] * 4  # each ends once
    assert all(o.request_id == "r0" for o in first)


@pytest.mark.parametrize("prompt_len", [10, 9, 1], ids=["partial-block", "aligned", "one-token"])
def test_each_choice_is_the_single_request_with_its_derived_seed(tiny: str, prompt_len: int) -> None:
    prompt = [1, 5, 9, 33, 7, 100, 3, 44, 45, 46][:prompt_len]
    engine = make(tiny)
    group = by_choice(run(engine, [(prompt, sampled(3))])[0])
    alone = [by_choice(run(engine, [(prompt, sampled(1, seed=choice_seed(5, i)))])[0])[0] for i in range(3)]
    assert [group[i] for i in range(3)] == alone
    assert alone[0] == by_choice(run(engine, [(prompt, sampled(1))])[0])[0]  # choice 0 keeps the seed itself


@pytest.mark.parametrize("prompt_len,copies", [(10, 3), (9, 0)])
def test_the_prompt_is_prefilled_once_and_the_shared_partial_block_is_copied(
    tiny: str, prompt_len: int, copies: int
) -> None:
    prompt = list(range(3, 3 + prompt_len))
    engine = make(tiny)
    tokens, pairs = [], []
    run_step, copy = engine._run_step, engine.worker.copy_blocks
    engine._run_step = lambda plan, *more: (tokens.append(plan.total_tokens), run_step(plan, *more))[1]  # type: ignore[method-assign]
    engine.worker.copy_blocks = lambda ps: (pairs.extend(ps), copy(ps))[1]  # type: ignore[method-assign]
    p = SamplingParams(max_tokens=5, temperature=0.0, n=4, ignore_eos=True)
    outs = run(engine, [(prompt, p)])[0]
    # the leader's prompt once, each follower's last prompt token, then 4 decodes of 4 tokens each
    assert sum(tokens) == prompt_len + 3 + 4 * 4
    assert len(pairs) == copies  # 10 tokens: block 2 (positions 8, 9) is shared and written by all four
    assert all(v == by_choice(outs)[0] for v in by_choice(outs).values())  # greedy: four equal choices


def test_best_of_returns_the_n_of_highest_cumulative_logprob(tiny: str) -> None:
    prompt = [1, 5, 9, 33, 7]
    engine = make(tiny)
    four = run(engine, [(prompt, sampled(4, logprobs=0))])[0]
    finals = {o.index: o for o in four if o.finished}
    cum = {i: sum(x.logprob for o in four if o.index == i for x in o.logprobs or []) for i in range(4)}
    assert cum == pytest.approx({i: finals[i].cumulative_logprob for i in range(4)})
    best = sorted(range(4), key=lambda i: -cum[i])[:2]
    got = run(engine, [(prompt, sampled(2, best_of=4))])[0]
    assert [o.index for o in got] == [0, 1] and all(o.finished for o in got)
    assert [o.token_ids for o in got] == [by_choice(four)[i] for i in best]
    assert [o.cumulative_logprob for o in got] == pytest.approx([cum[i] for i in best])
    assert all(o.logprobs is None for o in got)  # ranked by logprobs the request did not ask to see


def test_rank_best_of_ties_and_missing_scores() -> None:
    outs = [RequestOutput("r", "", [], index=i, cumulative_logprob=c) for i, c in enumerate([-2.0, None, -1.0, -1.0])]
    assert [(o.index, o.cumulative_logprob) for o in rank_best_of(outs, 3)] == [(0, -1.0), (1, -1.0), (2, -2.0)]


def test_aborting_the_request_aborts_every_choice(tiny: str) -> None:
    engine = make(tiny)
    p = sampled(3, max_tokens=100)

    async def main() -> list[RequestOutput]:
        outs = []
        async for o in engine.generate([1, 5, 9, 33, 7, 100], p, "g"):
            outs.append(o)
            if len(outs) == 4:
                engine.abort("g")
        return outs

    outs = asyncio.run(main())
    finals = [o for o in outs if o.finished]
    assert sorted(o.index for o in finals) == [0, 1, 2] and {o.finish_reason for o in finals} == {"abort"}
    assert engine.block_manager.pool.num_free == engine.block_manager.pool.num_blocks
    assert not engine.scheduler.has_unfinished and not engine._groups and not engine._states


def test_a_consumer_that_leaves_aborts_every_choice(tiny: str) -> None:
    engine = make(tiny)

    async def main() -> None:
        gen = engine.generate([1, 5, 9], sampled(4, max_tokens=100), "g")
        async for _ in gen:
            break
        await gen.aclose()
        for _ in range(100):
            if not engine.scheduler.has_unfinished:
                return
            await asyncio.sleep(0.01)

    asyncio.run(main())
    assert engine.block_manager.pool.num_free == engine.block_manager.pool.num_blocks and not engine._states


def test_choices_survive_preemption_in_a_tiny_pool(tiny: str) -> None:
    jobs = [([1, 5 + i, 9, 33, 7, 100, 3], sampled(3, seed=i, max_tokens=30)) for i in range(4)]
    roomy = [by_choice(o) for o in run(make(tiny), jobs)]
    engine = make(tiny, num_blocks=33, budget=16)  # 132 tokens for 12 sequences of 37
    preempted: list[str] = []
    original = engine.scheduler._preempt
    engine.scheduler._preempt = lambda r: (preempted.append(r.request_id), original(r))[1]  # type: ignore[method-assign]
    assert [by_choice(o) for o in run(engine, jobs)] == roomy
    assert preempted


def test_n_above_max_num_seqs_is_refused_naming_the_field(tiny: str) -> None:
    engine = make(tiny, seqs=4)

    async def first(p: SamplingParams) -> None:
        async for _ in engine.generate([1, 2], p, "x"):
            break

    with pytest.raises(ValueError, match=r"^n: 5 sequences exceed --max-num-seqs 4"):
        asyncio.run(first(sampled(5)))
    with pytest.raises(ValueError, match=r"^best_of: 6 sequences"):
        asyncio.run(first(sampled(2, best_of=6)))
    with pytest.raises(ValueError, match=r"^logit_bias: token ids must be below the vocabulary size 256"):
        asyncio.run(first(sampled(1, logit_bias=((256, 1.0),))))
    assert not engine._states and not engine._groups


# --- the scheduler's side, no model --------------------------------------------------------------------


def group(n: int, prompt_len: int = 6):  # noqa: ANN201
    ids = choice_ids("g", n)
    assert ids == (["g"] if n == 1 else [f"g#{i}" for i in range(n)])
    return make_choices(ids, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=4, temperature=0.0), 9, (0,))


def test_a_group_waits_for_seats_for_all_its_choices() -> None:
    s = make_scheduler(max_num_seqs=4, budget=64)
    from tests.test_scheduler import make_requests

    for r in make_requests(2, 4, 8):
        s.add_request(r)
    reqs = group(3)
    s.add_request(reqs[0])
    plan = s.schedule()
    assert [r.request_id for r in plan.requests] == ["r0", "r1"]  # 2 running + 3 seats > 4: the group waits
    s.abort("r1")
    plan = s.schedule()
    assert "g#0" in plan.num_scheduled_tokens and s.num_running == 2  # r0 and the leader (+2 seats held)
    assert s.update(plan, {r.request_id: 7 for r in plan.requests})
    assert s.num_running == 4 and [r.status for r in reqs] == [RequestStatus.RUNNING] * 3
    table = s.block_manager.block_table
    assert [table(r.request_id)[:1] for r in reqs[1:]] == [table("g#0")[:1]] * 2  # the first block, shared
    assert all(r.num_computed_tokens == 5 for r in reqs[1:]) and reqs[0].num_computed_tokens == 6


def test_aborting_a_leader_before_its_fork_takes_its_followers() -> None:
    s = make_scheduler()
    reqs = group(3)
    s.add_request(reqs[0])
    s.schedule()
    s.abort("g#1")  # a follower alone: it leaves its leader
    assert reqs[0].followers == [reqs[2]] and reqs[1].finish_reason == "abort"
    s.abort("g#0")
    assert reqs[2].status is RequestStatus.FINISHED and reqs[2].finish_reason == "abort"
    assert not s.has_unfinished and s.block_manager.pool.num_free == s.block_manager.pool.num_blocks
    assert s.abort("g#2") is None


def test_a_leader_preempted_before_its_fork_keeps_its_followers() -> None:
    s = make_scheduler(budget=3)
    reqs = group(2, prompt_len=8)
    s.add_request(reqs[0])
    plan = s.schedule()  # 3 of 8 prompt tokens
    s.update(plan, {"g#0": 1})
    s._preempt(s.running.pop())
    assert reqs[0].followers == [reqs[1]] and s.num_waiting == 1 and reqs[0].num_computed_tokens == 0
    while reqs[1].status is not RequestStatus.RUNNING:
        plan = s.schedule()
        s.update(plan, {r.request_id: 1 for r in plan.requests})
    assert reqs[1].num_computed_tokens == 7 and reqs[0].output_token_ids == [1]


def test_every_choice_carries_the_prompt_logprobs_of_the_one_prefill(tiny: str) -> None:
    prompt = [1, 5, 9, 33, 7, 100, 3]
    engine = make(tiny, budget=3)  # the leader's prompt in chunks of 3
    single = run(engine, [(prompt, SamplingParams(max_tokens=4, temperature=0.0, prompt_logprobs=2))])[0]
    ref = single[0].prompt_logprobs
    assert ref is not None and len(ref) == len(prompt) and ref[0] is None
    for p in (sampled(3, prompt_logprobs=2, max_tokens=4), sampled(2, best_of=3, prompt_logprobs=2, max_tokens=4)):
        outs = run(engine, [(prompt, p)])[0]
        firsts = {}
        for o in outs:
            firsts.setdefault(o.index, o)
        assert sorted(firsts) == list(range(p.n))
        assert all(f.prompt_logprobs == ref for f in firsts.values())
        assert all(o.prompt_logprobs is None for o in outs if firsts[o.index] is not o)


def test_choices_with_prompt_lookup_keep_their_tokens(tiny: str) -> None:
    from aioffload.config import SpeculativeConfig

    cfg = EngineConfig(
        model=tiny, device="cpu",
        cache=CacheConfig(num_blocks=256, block_size=4),
        scheduler=SchedulerConfig(max_model_len=128, max_num_batched_tokens=64, max_num_seqs=16),
        speculative=SpeculativeConfig(method="ngram", num_tokens=6),
    ).validate()  # fmt: skip
    spec = Engine.from_config(cfg)
    prompt = [1, 5, 9]  # greedy falls into a loop of 12s that prompt lookup proposes
    jobs = [(prompt, SamplingParams(max_tokens=40, temperature=0.0, n=2, ignore_eos=True, logprobs=1)),
            (prompt, SamplingParams(max_tokens=40, temperature=0.3, n=3, seed=8, ignore_eos=True))]  # fmt: skip
    assert [by_choice(o) for o in run(spec, jobs)] == [by_choice(o) for o in run(make(tiny), jobs)]
    assert spec.stats()["spec_accepted_tokens_total"] > 0

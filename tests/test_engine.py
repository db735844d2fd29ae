"""The asyncio engine end to end on the CPU: concurrency, aborts, preemption, offload."""

from __future__ import annotations

import asyncio
import re
import time

import pytest

from aioffload.checkpoint.checkpoint import Checkpoint
from aioffload.config import DEMO_MODEL, CacheConfig, EngineConfig, OffloadConfig, SchedulerConfig
from aioffload.engine.async_engine import Engine
from aioffload.engine.outputs import PromptTooLongError, QueueFullError, RequestOutput
from aioffload.engine.request_state import OutputSlot
from aioffload.model.layout import layer_layout
from aioffload.offload.transfer_queue import TransferQueue
from aioffload.worker.sampling import SamplingParams
from tests.tiny_models import add_word_tokenizer, make_checkpoint

DEMO = DEMO_MODEL
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(add_word_tokenizer(make_checkpoint(tmp_path_factory.mktemp("engine"), "llama", seed=5, layers=4)))


def make_engine(model: str, num_blocks: int = 256, budget: int = 64, seqs: int = 16, **offload: object) -> Engine:
    cfg = EngineConfig(
        model=model,
        cache=CacheConfig(num_blocks=num_blocks, block_size=4),
        scheduler=SchedulerConfig(max_model_len=128, max_num_batched_tokens=budget, max_num_seqs=seqs),
        offload=OffloadConfig(**offload),  # type: ignore[arg-type]
    ).validate()
    return Engine.from_config(cfg)


async def collect(engine: Engine, prompt: str | list[int], rid: str, params: SamplingParams = GREEDY) -> list[int]:
    ids: list[int] = []
    async for out in engine.generate(prompt, params, rid):
        ids.extend(out.token_ids)
    return ids


def prompts(n: int) -> list[list[int]]:
    return [[1] + [(7 * i + 3 * j) % 250 + 3 for j in range(3 + (5 * i) % 23)] for i in range(n)]


def run_all(engine: Engine, ps: list[list[int]], params: SamplingParams = GREEDY) -> list[list[int]]:
    async def main() -> list[list[int]]:
        try:
            return list(await asyncio.gather(*(collect(engine, p, f"r{i}", params) for i, p in enumerate(ps))))
        finally:
            await engine.shutdown(1.0)

    return asyncio.run(main())


def alone(model: str, ps: list[list[int]], **kw: object) -> list[list[int]]:
    out = []
    for p in ps:
        out += run_all(make_engine(model, **kw), [p])  # type: ignore[arg-type]
    return out


def test_32_concurrent_requests_on_demo_model_equal_each_run_alone() -> None:
    texts = ["The", "Once upon a time", "Python is a", "In the beginning the", "It was"]
    ps = [texts[i % len(texts)] + " " * (i // len(texts)) for i in range(32)]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    engine = make_engine(DEMO, num_blocks=2048, budget=128, seqs=32)
    together = run_all(engine, ps, params)  # type: ignore[arg-type]
    assert engine.block_manager.pool.num_free == engine.block_manager.pool.num_blocks
    assert all(len(t) == 6 for t in together)
    solo = make_engine(DEMO, num_blocks=2048, budget=128, seqs=32)

    async def one_at_a_time() -> list[list[int]]:
        # the same engine, reused across event loops, one request at a time
        return [await collect(solo, ps[i], f"solo{i}", params) for i in (0, 7, 13, 31)]

    assert asyncio.run(one_at_a_time()) == [together[i] for i in (0, 7, 13, 31)]
    assert asyncio.run(one_at_a_time()) == [together[i] for i in (0, 7, 13, 31)]  # a second loop works too


def test_concurrent_equals_alone_and_pool_returns_free(tiny: str) -> None:
    ps = prompts(32)
    engine = make_engine(tiny)
    together = run_all(engine, ps)
    assert engine.block_manager.pool.num_free == engine.block_manager.pool.num_blocks
    assert together == alone(tiny, ps[:6]) + together[6:]  # spot-check six alone (each reloads the engine)
    assert all(len(t) == GREEDY.max_tokens for t in together)


def test_preemption_under_tiny_pool_gives_same_outputs(tiny: str) -> None:
    ps = prompts(12)
    roomy = run_all(make_engine(tiny), ps)
    engine = make_engine(tiny, num_blocks=40, budget=32)  # 160 tokens for 12 sequences of ~25: must preempt
    tight = run_all(engine, ps)
    assert tight == roomy
    assert engine.block_manager.pool.num_free == 40


def spy_preemptions(engine: Engine) -> list[str]:
    """Ids of the requests the engine's scheduler preempts from now on, in order."""
    preempted: list[str] = []
    original = engine.scheduler._preempt

    def spy(request):  # type: ignore[no-untyped-def]
        preempted.append(request.request_id)
        return original(request)

    engine.scheduler._preempt = spy  # type: ignore[method-assign]
    return preempted


def test_preempted_requests_really_were_preempted(tiny: str) -> None:
    engine = make_engine(tiny, num_blocks=40, budget=32)
    preempted = spy_preemptions(engine)
    run_all(engine, prompts(12))
    assert preempted, "the tiny pool should have forced at least one preemption"


def half_layers_gb(model: str) -> float:
    ckpt = Checkpoint.open(model)
    layer = layer_layout(ckpt.model_config).nbytes(ckpt.resolve_dtype("auto", __import__("torch").device("cpu")))
    return 2 * layer / 1e9


def test_offloaded_engine_is_bit_identical_including_chunked_and_preempted(tiny: str) -> None:
    ps = prompts(12)
    resident = run_all(make_engine(tiny, num_blocks=40, budget=16), ps)
    engine = make_engine(tiny, num_blocks=40, budget=16, cpu_offload_gb=half_layers_gb(tiny))
    assert isinstance(engine.worker.layers, TransferQueue)
    assert engine.worker.placement.offloaded_layers == (2, 3)
    preempted = spy_preemptions(engine)
    assert run_all(engine, ps) == resident
    assert preempted, "a 40-block pool for 12 sequences must preempt and resume some"
    assert max(len(p) for p in ps) > 16  # prompts longer than the budget: chunked prefill happened


def test_abort_stops_within_one_step_and_frees_blocks(tiny: str) -> None:
    engine = make_engine(tiny)
    params = SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True)

    async def main() -> tuple[int, int]:
        got = 0
        steps_at_abort = 0
        gen = engine.generate([1, 5, 6, 7], params, "victim")
        async for out in gen:
            got += len(out.token_ids)
            if got >= 3 and not steps_at_abort:
                engine.abort("victim")
                steps_at_abort = engine.stats_.steps_total
            if out.finished:
                assert out.finish_reason == "abort"
                break
        steps_after = engine.stats_.steps_total - steps_at_abort
        await asyncio.sleep(0.05)
        free = engine.block_manager.pool.num_free
        await engine.shutdown(1.0)
        return steps_after, free

    steps_after, free = asyncio.run(main())
    assert steps_after <= 1
    assert free == engine.block_manager.pool.num_blocks


def test_consumer_that_goes_away_aborts_its_request(tiny: str) -> None:
    engine = make_engine(tiny)
    params = SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True)

    async def main() -> int:
        gen = engine.generate([1, 5, 6, 7], params, "leaver")
        await gen.__anext__()
        await gen.aclose()  # what a disconnecting HTTP client does
        for _ in range(100):
            await asyncio.sleep(0.01)
            if engine.block_manager.pool.num_free == engine.block_manager.pool.num_blocks:
                break
        free = engine.block_manager.pool.num_free
        await engine.shutdown(1.0)
        return free

    assert asyncio.run(main()) == engine.block_manager.pool.num_blocks


def test_prompt_too_long_and_queue_full(tiny: str) -> None:
    cfg = EngineConfig(
        model=tiny, cache=CacheConfig(num_blocks=64, block_size=4),
        scheduler=SchedulerConfig(max_model_len=32, max_queue=1, max_num_seqs=1, max_num_batched_tokens=8),
    ).validate()  # fmt: skip
    engine = Engine.from_config(cfg)

    async def main() -> None:
        with pytest.raises(PromptTooLongError):
            await engine.generate(list(range(1, 40)), GREEDY, "long").__anext__()
        first = asyncio.ensure_future(collect(engine, [1, 2, 3], "a"))
        while engine.scheduler.num_running == 0:  # "a" runs (max_num_seqs=1) ...
            await asyncio.sleep(0.001)
        second = asyncio.ensure_future(collect(engine, [1, 2, 3], "b"))
        await asyncio.sleep(0)  # ... and "b" fills the one-place queue
        with pytest.raises(QueueFullError):
            await engine.generate([1, 2, 3], GREEDY, "c").__anext__()
        assert len(await first) == GREEDY.max_tokens and len(await second) == GREEDY.max_tokens
        await engine.shutdown(1.0)

    asyncio.run(main())


def test_stop_string_truncates_text(tiny: str) -> None:
    engine = make_engine(tiny)
    free_text = asyncio.run(_text(engine, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)))
    words = free_text.split()
    stop = f" {words[3]}"
    engine = make_engine(tiny)
    text = asyncio.run(_text(engine, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, stop=(stop,))))
    assert text == free_text[: free_text.index(stop)]


async def _text(engine: Engine, params: SamplingParams) -> str:
    parts = []
    finish = None
    async for out in engine.generate([1, 9, 8, 7], params, "s"):
        parts.append(out.text)
        finish = out.finish_reason
    await engine.shutdown(1.0)
    assert finish in ("stop", "length")
    return "".join(parts)


def test_output_slot_merges_when_consumer_lags() -> None:
    async def main() -> RequestOutput:
        slot = OutputSlot()
        for i in range(5):  # put never blocks
            slot.put(RequestOutput("r", f"t{i} ", [i], num_output_tokens=i + 1))
        slot.put(RequestOutput("r", "end", [5], finished=True, finish_reason="length", num_output_tokens=6))
        return await slot.get()

    out = asyncio.run(main())
    assert out.text == "t0 t1 t2 t3 t4 end"
    assert out.token_ids == [0, 1, 2, 3, 4, 5]
    assert out.finished and out.finish_reason == "length" and out.num_output_tokens == 6


def test_event_loop_stays_free_during_a_step(tiny: str) -> None:
    engine = make_engine(tiny)
    real = engine.worker.execute

    def slow(*a, **k):  # type: ignore[no-untyped-def]
        time.sleep(0.2)
        return real(*a, **k)

    engine.worker.execute = slow  # type: ignore[method-assign]

    async def main() -> float:
        task = asyncio.ensure_future(collect(engine, [1, 2, 3], "slow", SamplingParams(max_tokens=3, temperature=0)))
        await asyncio.sleep(0.05)
        worst = 0.0
        for _ in range(10):
            t = time.perf_counter()
            await asyncio.sleep(0.01)
            worst = max(worst, time.perf_counter() - t)
        await task
        await engine.shutdown(1.0)
        return worst

    assert asyncio.run(main()) < 0.1


def test_stats_log_line_reports_throughput_and_queue(tiny: str, caplog: pytest.LogCaptureFixture) -> None:
    engine = make_engine(tiny)
    engine.stats_.log_interval_s = 0.0  # log at every opportunity
    with caplog.at_level("INFO", logger="aioffload.engine"):
        run_all(engine, prompts(4))
    lines = [r.getMessage() for r in caplog.records if "generation throughput" in r.getMessage()]
    assert lines, "no throughput line was logged"
    assert any(re.search(r"prompt throughput [\d.]+ tok/s, generation throughput [1-9][\d.]* tok/s, running \d+, "
                         r"waiting \d+, KV usage [\d.]+%", ln) for ln in lines), lines
    s = engine.stats()
    assert s["generation_tokens_total"] == 4 * GREEDY.max_tokens
    assert s["prompt_tokens_total"] == sum(len(p) for p in prompts(4))

"""Decode lookahead on the GPU (engine/lookahead.py): fed graph replays queued back to back, the
graphs' two host-buffer sets, and the engine's outputs with lookahead on against off.

Marked `gpu` and skipped without CUDA; run on the GPU machine with `pytest -m gpu`.
"""

from __future__ import annotations

import pytest
import torch

from aioffload.checkpoint.checkpoint import Checkpoint
from aioffload.config import CacheConfig, EngineConfig, SchedulerConfig
from aioffload.engine.lookahead import PLACEHOLDER
from aioffload.worker.inputs import SeqChunk
from aioffload.worker.sampling import SamplingParams
from aioffload.worker.worker import Worker
from tests.test_lookahead import run_config
from tests.tiny_models import add_word_tokenizer, make_checkpoint

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on the GPU machine)"),
]
GREEDY = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(add_word_tokenizer(make_checkpoint(tmp_path_factory.mktemp("la_gpu"), "qwen3", seed=13, layers=4)))


def config(model: str, lookahead: str) -> EngineConfig:
    return EngineConfig(
        model=model, dtype="float32", device="cuda", cache=CacheConfig(num_blocks=256, block_size=16),
        scheduler=SchedulerConfig(max_model_len=256, max_num_seqs=8, max_num_batched_tokens=256, lookahead=lookahead),
    ).validate()  # fmt: skip


def test_fed_graph_steps_queued_back_to_back_equal_plain_steps(tiny: str) -> None:
    """Ten fed steps launched before any is read (the feed's rows swapped every other step),
    against ten plain steps, each read before the next."""
    prompts, tables = [[5, 9, 13, 2, 7], [30, 31, 32]], [[0, 1], [2, 3]]
    ids: dict[str, list[list[int]]] = {}
    for mode in ("ahead", "plain"):
        w = Worker(config(tiny, "on"), Checkpoint.open(tiny))
        assert w.graphs is not None and w.can_launch(2)
        out = w.execute([SeqChunk(p, 0, t) for p, t in zip(prompts, tables)], [GREEDY] * 2, [0, 0], [0, 0])
        last = [t[0] for t in out.token_ids]
        order, pos, got = [0, 1], [len(p) for p in prompts], []
        pending = None
        for step in range(10):
            nxt = order[::-1] if step % 2 else order  # which sequence sits in which row this step
            if mode == "ahead":
                chunks = [SeqChunk([last[s] if pending is None else PLACEHOLDER], pos[s], tables[s]) for s in nxt]
                rows = None if pending is None else [order.index(s) for s in nxt]
                pending = w.launch(chunks, [GREEDY] * 2, [0, 0], [step + 1] * 2, feed=pending, feed_rows=rows)
                got.append(pending)
            else:
                plain = [SeqChunk([last[s]], pos[s], tables[s]) for s in nxt]
                o = w.execute(plain, [GREEDY] * 2, [0, 0], [step + 1] * 2)
                tok = [t[0] for t in o.token_ids]
                for r, s in enumerate(nxt):
                    last[s] = tok[r]
                got.append(tok)
            order = nxt
            pos = [p + 1 for p in pos]
        ids[mode] = [g.wait() for g in got] if mode == "ahead" else got
    assert ids["ahead"] == ids["plain"]
    assert len({tuple(t) for t in ids["plain"]}) > 2  # the tokens move: a stuck feed would show


def run_engine(model: str, lookahead: str, jobs: list[tuple[list[int], SamplingParams]]) -> tuple[list, int]:
    return run_config(config(model, lookahead), jobs)


def test_engine_outputs_equal_with_lookahead_auto_and_off(tiny: str) -> None:
    probe, _ = run_engine(tiny, "off", [([4, 8, 15, 16, 23, 42], GREEDY)])
    jobs = [
        ([4, 8, 15, 16, 23, 42], GREEDY),
        ([4, 8, 15, 16, 23, 42], SamplingParams(max_tokens=64, temperature=0.0, stop_token_ids=(probe[0][9],))),
        ([7, 7, 3], SamplingParams(max_tokens=11, temperature=0.0, ignore_eos=True)),
        ([50, 60, 70, 80], SamplingParams(max_tokens=40, temperature=0.9, top_p=0.9, seed=4, ignore_eos=True)),
        ([11, 12], SamplingParams(max_tokens=30, temperature=0.7, seed=5, n=2, ignore_eos=True)),
    ]
    off, none = run_engine(tiny, "off", jobs)
    on, launched = run_engine(tiny, "auto", jobs)
    assert none == 0 and launched > 20
    assert on == off
    assert len(off[1]) < 10 and len(off[2]) == 11

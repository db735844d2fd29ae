"""A step that mixes decode tokens with prefill chunks (worker.Worker._forward): the decode tokens
replay the CUDA graph, the chunks run eager behind it, and the logits rows come back in chunk order.

On the CPU a recording stand-in replaces the graph runner (it runs the decode chunks through the
same eager forward); on the GPU (marked `gpu`) the real captured graphs run.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from aioffload.checkpoint.checkpoint import Checkpoint
from aioffload.config import CacheConfig, EngineConfig, SchedulerConfig
from aioffload.worker.inputs import SeqChunk, build_inputs
from aioffload.worker.worker import Worker
from tests.tiny_models import add_word_tokenizer, make_checkpoint

BLOCK = 16


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return add_word_tokenizer(make_checkpoint(tmp_path_factory.mktemp("mixed"), "llama", seed=5, layers=3))


def make_worker(path: Path, device: str) -> Worker:
    cfg = EngineConfig(
        model=str(path), dtype="float32", device=device, cache=CacheConfig(num_blocks=64, block_size=BLOCK),
        scheduler=SchedulerConfig(max_model_len=256, max_num_seqs=8, max_num_batched_tokens=256),
    ).validate()  # fmt: skip
    return Worker(cfg, Checkpoint.open(str(path)))


class RecordingGraphs:
    """Stands in for CudaGraphRunner: decode-only steps of up to 8 sequences, run eager."""

    def __init__(self, worker: Worker) -> None:
        self.worker, self.calls = worker, []  # type: ignore[var-annotated]

    def can_run(self, chunks: Sequence[SeqChunk]) -> bool:
        return len(chunks) <= 8 and all(len(c.token_ids) == 1 for c in chunks)

    def run(self, chunks: Sequence[SeqChunk]) -> torch.Tensor:
        self.calls.append([c.start for c in chunks])
        return eager(self.worker, chunks)


def eager(worker: Worker, chunks: Sequence[SeqChunk]) -> torch.Tensor:
    inputs = build_inputs(chunks, worker.block_size, worker.device)
    return worker.model.forward(inputs.input_ids, inputs.positions, inputs.meta, worker.kv)


def tables(n: int) -> list[list[int]]:
    return [list(range(4 * s, 4 * s + 4)) for s in range(n)]  # 64 positions per sequence


def prefill_three(worker: Worker) -> list[list[int]]:
    """Sequences 0 and 1 hold 9 and 13 prompt tokens (decoding next); sequence 2 gets a prompt later."""
    prompts = [[(7 * s + j) % 250 + 3 for j in range(n)] for s, n in enumerate((9, 13, 40))]
    t = tables(3)
    eager(worker, [SeqChunk(prompts[0], 0, t[0]), SeqChunk(prompts[1], 0, t[1])])
    return prompts


def mixed_chunks(prompts: list[list[int]], decode_first: bool) -> list[SeqChunk]:
    t = tables(3)
    dec = [SeqChunk([5], 9, t[0]), SeqChunk([6], 13, t[1])]
    pre = [SeqChunk(prompts[2][:24], 0, t[2], num_logits=3)]  # 3 logits rows: the prompt-scoring case
    return dec + pre if decode_first else [dec[0], *pre, dec[1]]


@pytest.mark.parametrize("decode_first", [True, False], ids=["decodes-first", "interleaved"])
def test_mixed_step_runs_decodes_through_the_graph_and_keeps_row_order(tiny: Path, decode_first: bool) -> None:
    worker = make_worker(tiny, "cpu")
    prompts = prefill_three(worker)
    chunks = mixed_chunks(prompts, decode_first)
    want = eager(worker, chunks)  # all eager, one forward: 5 rows
    worker.graphs = RecordingGraphs(worker)  # type: ignore[assignment]
    got = worker._forward(chunks)
    assert worker.graphs.calls == [[9, 13]]  # type: ignore[union-attr]  # only the decode tokens, once
    assert got.shape == want.shape == (5, 256)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got.argmax(-1).tolist() == want.argmax(-1).tolist()


def test_decode_only_and_prefill_only_steps_take_one_path(tiny: Path) -> None:
    worker = make_worker(tiny, "cpu")
    prompts = prefill_three(worker)
    worker.graphs = RecordingGraphs(worker)  # type: ignore[assignment]
    t = tables(3)
    worker._forward([SeqChunk([5], 9, t[0])])
    worker._forward([SeqChunk(prompts[2][:8], 0, t[2])])  # no decode token: eager only
    assert worker.graphs.calls == [[9]]  # type: ignore[union-attr]


def gpu_only(test):  # type: ignore[no-untyped-def]
    skip = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on the GPU machine)")
    return pytest.mark.gpu(skip(test))


def spy(runner: object, calls: list) -> None:  # type: ignore[type-arg]
    """Record each run: the decode graph's as its row count, a chunk graph's as (-chunk tokens, decodes)."""
    run = runner.run  # type: ignore[attr-defined]

    def record(c, decodes=()):  # type: ignore[no-untyped-def]
        calls.append(len(c) if isinstance(c, list) else (-len(c.token_ids), len(decodes)))
        return run(c, decodes) if decodes else run(c)

    runner.run = record  # type: ignore[attr-defined]


@gpu_only
@pytest.mark.parametrize("decode_first", [True, False], ids=["decodes-first", "interleaved"])
@pytest.mark.parametrize("num_logits", [1, 3], ids=["chunk-graph", "chunk-eager"])
def test_mixed_step_with_real_graphs_matches_eager(tiny: Path, decode_first: bool, num_logits: int) -> None:
    worker = make_worker(tiny, "cuda")
    assert worker.graphs is not None and worker.chunk_graphs is not None
    prompts = prefill_three(worker)
    chunks = mixed_chunks(prompts, decode_first)
    chunks = [SeqChunk(c.token_ids, c.start, c.block_table, num_logits if len(c.token_ids) > 1 else 1) for c in chunks]
    want = eager(worker, chunks)
    calls: list = []  # type: ignore[type-arg]
    spy(worker.graphs, calls)
    spy(worker.chunk_graphs, calls)
    got = worker._forward(chunks)
    # one mixed graph for the 2 decode tokens and the 24-token chunk; a 3-logits chunk: decode graph + eager
    assert calls == ([(-24, 2)] if num_logits == 1 else [2])
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)  # TF32 matmuls, other kernels for the decodes
    assert got.argmax(-1).tolist() == want.argmax(-1).tolist()


@gpu_only
def test_more_decodes_than_the_mixed_buckets_take_the_decode_graph_and_a_chunk_graph(tiny: Path) -> None:
    worker = make_worker(tiny, "cuda")
    assert worker.chunk_graphs is not None and worker.chunk_graphs.inputs.buckets == (0, 1, 2, 4, 8)
    prompts = prefill_three(worker)
    chunks = mixed_chunks(prompts, decode_first=False)
    chunks = [SeqChunk(c.token_ids, c.start, c.block_table) for c in chunks]
    want = eager(worker, chunks)
    worker.chunk_graphs.inputs.buckets = (0, 1)  # as if 2 decodes were more than the largest bucket
    calls: list = []  # type: ignore[type-arg]
    spy(worker.graphs, calls)
    spy(worker.chunk_graphs, calls)
    got = worker._forward(chunks)
    assert calls == [2, (-24, 0)]  # the decode graph, then the chunk's graph alone: two weight passes
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)


@gpu_only
def test_a_lone_chunk_replays_its_graph_deep_in_a_prompt(tiny: Path) -> None:
    worker = make_worker(tiny, "cuda")
    assert worker.chunk_graphs is not None
    t = tables(3)
    prompt = [(3 * j) % 250 + 3 for j in range(60)]
    eager(worker, [SeqChunk(prompt[:40], 0, t[2])])
    for n in (2, 16, 17):  # sizes 16, 16 and 32: padding of 14, 0 and 15 rows
        chunk = SeqChunk(prompt[40 : 40 + n], 40, t[2])
        want = eager(worker, [chunk])
        calls: list = []  # type: ignore[type-arg]
        spy(worker.chunk_graphs, calls)
        got = worker._forward([chunk])
        assert calls == [(-n, 0)]
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)


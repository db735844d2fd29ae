"""A step's flat inputs (worker/inputs.py): the per-row tensors of short chunks (Python lists) and of
long ones (host tensor ops) agree, and the logits rows' own metadata, with which the model's last
layer computes those rows alone, gives the logits of a forward over every row."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from aioffload.bench.prefill import long_context_view
from aioffload.checkpoint.checkpoint import Checkpoint
from aioffload.config import CacheConfig, EngineConfig, SchedulerConfig
from aioffload.worker.inputs import LONG_CHUNK, SeqChunk, build_inputs
from aioffload.worker.worker import Worker
from tests.tiny_models import make_checkpoint

CPU = torch.device("cpu")
BLOCK = 16


def gpu_only(test):  # type: ignore[no-untyped-def]
    skip = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on the GPU machine)")
    return pytest.mark.gpu(skip(test))


def expected_rows(chunks: list[SeqChunk], block: int) -> dict[str, list[int]]:
    """The per-row inputs written out one row at a time."""
    rows: dict[str, list[int]] = {"ids": [], "pos": [], "slots": [], "seq": [], "ctx": []}
    for s, c in enumerate(chunks):
        for j, tok in enumerate(c.token_ids):
            p = c.start + j
            rows["ids"].append(tok)
            rows["pos"].append(p)
            rows["slots"].append(c.block_table[p // block] * block + p % block)
            rows["seq"].append(s)
            rows["ctx"].append(p + 1)
    return rows


def test_long_and_short_chunks_give_the_same_rows_as_one_row_at_a_time() -> None:
    n = LONG_CHUNK + 37  # a long chunk after a prefix, between short ones, its blocks out of order
    chunks = [
        SeqChunk([7], 40, [5, 9, 2]),
        SeqChunk(list(range(100, 100 + n)), 20, [30 - b for b in range(30)]),
        SeqChunk([3, 4, 5], 0, [11]),
        SeqChunk(list(range(LONG_CHUNK)), 0, list(range(40, 40 + LONG_CHUNK // BLOCK))),
    ]
    inp = build_inputs(chunks, BLOCK, CPU)
    want = expected_rows(chunks, BLOCK)
    assert inp.input_ids.tolist() == want["ids"]
    assert inp.positions.tolist() == want["pos"]
    assert inp.meta.slot_mapping.tolist() == want["slots"]
    assert inp.meta.row_seq.tolist() == want["seq"]
    assert inp.meta.row_ctx.tolist() == want["ctx"]
    assert inp.input_ids.dtype == torch.int64 and inp.meta.row_seq.dtype == torch.int32
    assert inp.meta.last_token_idx.tolist() == [0, n, n + 3, n + 3 + LONG_CHUNK]
    assert inp.meta.query_lens == [1, n, 3, LONG_CHUNK]


def test_logits_rows_are_each_chunks_last_rows_as_a_step_of_their_own() -> None:
    chunks = [
        SeqChunk(list(range(40)), 8, [1, 2, 3, 4]),  # a prefill chunk after a prefix: its last row
        SeqChunk([9], 30, [5, 6]),  # a decode token
        SeqChunk(list(range(12)), 0, [7], num_logits=4),  # ends in 3 proposals to verify
    ]
    meta = build_inputs(chunks, BLOCK, CPU).meta
    logits = meta.logits_rows
    assert logits is not None
    assert meta.last_token_idx.tolist() == [39, 40, 49, 50, 51, 52]
    assert logits.query_lens == [1, 1, 4] and logits.seq_lens_host == [48, 31, 12]
    assert logits.row_seq.tolist() == [0, 1, 2, 2, 2, 2]
    assert logits.row_ctx.tolist() == [48, 31, 9, 10, 11, 12]
    assert logits.slot_mapping.tolist() == [3 * BLOCK + 15, 6 * BLOCK + 14, *(7 * BLOCK + p for p in range(8, 12))]
    assert logits.block_tables is meta.block_tables and not logits.decode_only
    assert logits.prefill_tiles is not None and logits.prefill_tiles.tolist() == [[2, 2, 4, 8]]
    assert logits.decode_rows is not None and logits.decode_rows.tolist() == [0, 1]


def test_no_logits_rows_where_they_are_most_rows_or_every_row_is_scored() -> None:
    decode = [SeqChunk([5], 10, [0]), SeqChunk([6], 3, [1])]
    assert build_inputs(decode, BLOCK, CPU).meta.logits_rows is None  # decode-only: every row is a logits row
    verify = [SeqChunk([1, 2, 3], 10, [0], num_logits=3)]
    assert build_inputs(verify, BLOCK, CPU).meta.logits_rows is None  # 3 of 3 rows
    scored = [SeqChunk(list(range(20)), 0, [0, 1], num_logits=20, prompt_targets=list(range(1, 21)))]
    assert build_inputs(scored, BLOCK, CPU).meta.logits_rows is None  # prompt logprobs: every row's logits
    prefill = [SeqChunk(list(range(20)), 0, [0, 1])]
    assert build_inputs(prefill, BLOCK, CPU).meta.logits_rows is not None
    assert build_inputs(prefill, BLOCK, CPU, prune_last_layer=False).meta.logits_rows is None


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("prune"), "llama", seed=11, layers=3)


def forward(worker: Worker, chunks: list[SeqChunk], prune: bool) -> torch.Tensor:
    inp = build_inputs(chunks, worker.block_size, worker.device, worker.attention.dense_min_rows, prune)
    assert (inp.meta.logits_rows is not None) == prune
    return worker.model.forward(inp.input_ids, inp.positions, inp.meta, worker.kv)


def pruned_against_every_row(path: Path, device: str, dtype: str, long: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of one mixed step (a long chunk after a cached prefix, a decode token, a chunk ending in
    proposals) with the last layer on the logits rows alone, and over every row."""
    cfg = EngineConfig(
        model=long_context_view(str(path), 2048), dtype=dtype, device=device, enforce_eager=True,
        cache=CacheConfig(num_blocks=160, block_size=BLOCK),
        scheduler=SchedulerConfig(max_model_len=2048, max_num_seqs=4, max_num_batched_tokens=2048),
    ).validate()  # fmt: skip
    worker = Worker(cfg, Checkpoint.open(cfg.model))
    g = torch.Generator().manual_seed(0)
    vocab = worker.model_config.vocab_size
    tok = torch.randint(0, vocab, (long + 200,), generator=g).tolist()
    tables = [list(range(0, 100)), list(range(100, 110)), list(range(110, 120))]
    forward(worker, [SeqChunk(tok[:100], 0, tables[0]), SeqChunk(tok[:40], 0, tables[1])], prune=True)  # prefixes
    step = [
        SeqChunk(tok[100 : 100 + long], 100, tables[0]),
        SeqChunk(tok[40:41], 40, tables[1]),
        SeqChunk(tok[:30], 0, tables[2], num_logits=5),
    ]
    return forward(worker, step, prune=True), forward(worker, step, prune=False)


def test_the_pruned_last_layer_gives_the_logits_of_every_row_on_the_cpu(tiny: Path) -> None:
    got, want = pruned_against_every_row(tiny, "cpu", "float32", 300)
    assert got.shape == want.shape == (7, want.shape[1])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # the same rows' arithmetic, another batch shape


@gpu_only
def test_the_pruned_last_layer_gives_the_logits_of_every_row_on_the_gpu(tiny: Path) -> None:
    got, want = pruned_against_every_row(tiny, "cuda", "bfloat16", 1200)  # >= 1024 rows: the cuDNN path
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)  # bf16 matmuls of other row counts
    assert got.argmax(-1).tolist() == want.argmax(-1).tolist()

"""The chunk graphs' static inputs (worker/chunk_graphs.py): a prefill chunk padded to a captured
size gives the eager chunk's logits and K/V, and writes nothing but its own slots and the trash
slot. The padded forward runs the real Triton kernels under the interpreter (a child process, see
tests/paged_cases.py); the graphs themselves are captured on the GPU (tests/test_mixed_step.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from aioffload.attention.kv_cache import KVCache
from aioffload.worker.chunk_graphs import CHUNK_SIZES, ChunkInputs, num_tiles
from aioffload.worker.inputs import SeqChunk, build_inputs
from tests.paged_cases import CPU, INTERPRETED, interpreter, needs_interpreter, run_interpreter_child

BLOCK, TRASH = 16, 999


def test_sizes_round_up_and_refuse_what_a_graph_cannot_take() -> None:
    ci = ChunkInputs((16, 32, 64), max_blocks=4, trash_slot=TRASH, block_size=BLOCK, device=CPU)
    table = [1, 2, 3]
    assert ci.size_for(SeqChunk([5] * 13, 0, table)) == 16
    assert ci.size_for(SeqChunk([5] * 16, 0, table)) == 16
    assert ci.size_for(SeqChunk([5] * 17, 0, table)) == 32
    assert ci.size_for(SeqChunk([5] * 65, 0, table)) is None  # longer than the largest graph
    assert ci.size_for(SeqChunk([5], 3, table)) is None  # a decode token: the decode graphs' job
    assert ci.size_for(SeqChunk([5] * 9, 0, table, num_logits=3)) is None  # verification rows
    assert ci.size_for(SeqChunk([5] * 9, 0, table, num_logits=9, prompt_targets=[1] * 9)) is None
    assert ci.size_for(SeqChunk([5] * 9, 0, [1, 2, 3, 4, 5])) is None  # a table wider than the graphs'
    assert CHUNK_SIZES == tuple(sorted(CHUNK_SIZES)) and num_tiles(CHUNK_SIZES[-1]) == 4 and CHUNK_SIZES[0] == 16


def test_fill_pads_rows_to_the_trash_slot_and_tiles_with_empty_ones() -> None:
    ci = ChunkInputs((16, 160), max_blocks=12, trash_slot=TRASH, block_size=BLOCK, device=CPU)
    table = [4, 9, 2, 7, 5, 11, 3, 8, 6, 10, 12]
    chunk = SeqChunk(list(range(100, 130)), 140, table)  # 30 tokens at positions 140..169
    ci.fill(chunk, 160)
    ids, pos, meta = ci.args(160)
    assert ids[:30].tolist() == list(range(100, 130)) and ids[30:].tolist() == [0] * 130
    assert pos[:30].tolist() == list(range(140, 170)) and pos[30:].tolist() == [140] * 130
    slots = meta.slot_mapping.tolist()
    assert slots[0] == table[140 // BLOCK] * BLOCK + 140 % BLOCK and slots[29] == table[169 // BLOCK] * BLOCK + 9
    assert slots[30:] == [TRASH] * 130
    assert meta.prefill_tiles.tolist() == [[0, 0, 30, 140], [0, 0, 0, 0]]  # 160 rows: a 2-tile grid
    assert meta.block_tables.tolist() == [[*table, 0]] and meta.last_token_idx.tolist() == [29]
    assert meta.decode_rows is not None and meta.decode_rows.numel() == 0
    ci.fill(SeqChunk([7] * 5, 0, [1]), 16)  # a later, shorter chunk overwrites the table and the tiles
    _, _, meta = ci.args(16)
    assert meta.block_tables.tolist() == [[1] + [0] * 11] and meta.prefill_tiles.tolist() == [[0, 0, 5, 0]]


def test_fill_puts_decode_rows_first_and_the_chunk_behind_its_bucket() -> None:
    ci = ChunkInputs((16, 32), max_blocks=6, trash_slot=TRASH, block_size=BLOCK, device=CPU, decode_buckets=(1, 4))
    assert ci.buckets == (0, 1, 4)
    decodes = [SeqChunk([71], 20, [3, 5]), SeqChunk([72], 3, [8])]
    assert ci.bucket_for(decodes) == 4 and ci.bucket_for([]) == 0 and ci.bucket_for(decodes * 3) is None
    assert ci.bucket_for([SeqChunk([1, 2], 0, [1])]) is None  # not a decode token
    chunk = SeqChunk(list(range(100, 130)), 40, [9, 4, 6, 2, 10])  # 30 tokens at positions 40..69: size 32
    ci.fill(chunk, 32, decodes, 4)
    ids, pos, meta = ci.args(32, 4)
    assert ids.tolist() == [71, 72, 0, 0, *range(100, 130), 0, 0]
    assert pos.tolist() == [20, 3, 0, 0, *range(40, 70), 40, 40]
    slots = meta.slot_mapping.tolist()
    assert slots[:4] == [5 * BLOCK + 4, 8 * BLOCK + 3, TRASH, TRASH]
    assert slots[4] == 6 * BLOCK + 40 % BLOCK and slots[33] == 10 * BLOCK + 69 % BLOCK and slots[34:] == [TRASH] * 2
    assert meta.row_ctx.tolist() == [21, 4, 1, 1, *range(41, 71), 1, 1]
    assert meta.row_seq.tolist() == [1, 2, 3, 4, *[0] * 32]  # block-table row 0 is the chunk's
    assert meta.block_tables.tolist()[:3] == [[9, 4, 6, 2, 10, 0], [3, 5, 0, 0, 0, 0], [8, 0, 0, 0, 0, 0]]
    assert meta.block_tables.shape == (5, 6)
    assert meta.prefill_tiles.tolist() == [[0, 4, 30, 40]]  # the chunk's rows start after the bucket
    assert meta.decode_rows.tolist() == [0, 1, 2, 3]
    assert meta.last_token_idx.tolist() == [0, 1, 2, 3, 4 + 29]


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny_models import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("chunkg"), "qwen3", seed=4, layers=2)


class Interpreted:
    """The tiny model over the Triton kernels (built under the interpreter): fresh caches of
    `blocks` blocks and eager steps over them."""

    def __init__(self, path: Path, blocks: int) -> None:
        from aioffload.attention.backends import TritonPagedBackend
        from aioffload.checkpoint.checkpoint import Checkpoint
        from aioffload.worker.model_loader import build_model

        ckpt = Checkpoint.open(str(path))
        self.cfg, self.blocks = ckpt.model_config, blocks
        self.model, _ = build_model(ckpt, torch.float32, CPU, TritonPagedBackend(), 256)

    def cache(self) -> KVCache:
        c = self.cfg
        return KVCache(c.num_layers, self.blocks, BLOCK, c.num_kv_heads, c.head_dim, torch.float32, CPU)

    def eager(self, kv: KVCache, chunks: list[SeqChunk]) -> torch.Tensor:
        inp = build_inputs(chunks, BLOCK, CPU)
        return self.model.forward(inp.input_ids, inp.positions, inp.meta, kv)


def assert_same_cache(got: KVCache, want: KVCache) -> None:
    """Every block but the trash block holds the same K/V."""
    for layer in range(len(got.k)):
        torch.testing.assert_close(got.k[layer][:-1], want.k[layer][:-1], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got.v[layer][:-1], want.v[layer][:-1], rtol=1e-6, atol=1e-6)


@needs_interpreter
def test_interpreted_padded_chunk_equals_the_eager_chunk(tiny_path: Path) -> None:
    with interpreter():
        m = Interpreted(tiny_path, 8)
        table, prompt = [5, 2, 6], [(11 * j) % 250 + 3 for j in range(33)]
        want_kv, got_kv = m.cache(), m.cache()
        for kv in (want_kv, got_kv):
            m.eager(kv, [SeqChunk(prompt[:20], 0, table)])  # a cached prefix of 20 tokens
            m.eager(kv, [SeqChunk([9] * 16, 0, [0])])  # another sequence's block, which must stay as it is
        chunk = SeqChunk(prompt[20:], 20, table)  # 13 tokens after the prefix
        want = m.eager(want_kv, [chunk])
        ci = ChunkInputs((16, 32), max_blocks=4, trash_slot=got_kv.trash_slot, block_size=BLOCK, device=CPU)
        assert ci.size_for(chunk) == 16
        ci.fill(chunk, 16)
        got = m.model.forward(*ci.args(16), got_kv)
    assert got.shape == want.shape == (1, m.cfg.vocab_size)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert_same_cache(got_kv, want_kv)


@needs_interpreter
def test_interpreted_mixed_rows_equal_the_eager_step(tiny_path: Path) -> None:
    """Two decode tokens in a bucket of 4 and a 13-token chunk padded to 16, in one forward, give
    the eager step's logits for the real rows and leave every block but the trash block as eager does."""
    with interpreter():
        m = Interpreted(tiny_path, 10)
        prompt = [(11 * j) % 250 + 3 for j in range(33)]
        want_kv, got_kv = m.cache(), m.cache()
        for kv in (want_kv, got_kv):
            m.eager(kv, [SeqChunk(prompt[:20], 0, [5, 2, 6]), SeqChunk(prompt[3:21], 0, [1, 7]),
                         SeqChunk(prompt[:9], 0, [8])])  # fmt: skip
        decodes = [SeqChunk([17], 18, [1, 7]), SeqChunk([23], 9, [8])]
        chunk = SeqChunk(prompt[20:], 20, [5, 2, 6])
        want = m.eager(want_kv, [*decodes, chunk])  # [3, V]
        ci = ChunkInputs((16, 32), max_blocks=4, trash_slot=got_kv.trash_slot, block_size=BLOCK, device=CPU,
                         decode_buckets=(4,))  # fmt: skip
        ci.fill(chunk, 16, decodes, 4)
        out = m.model.forward(*ci.args(16, 4), got_kv)  # [5, V]: 4 decode rows (2 padding), the chunk
    torch.testing.assert_close(out[[0, 1, 4]], want, rtol=1e-5, atol=1e-5)
    assert_same_cache(got_kv, want_kv)


@pytest.mark.skipif(INTERPRETED, reason="this is the child process")
def test_interpreter_cases() -> None:
    """The interpreter tests above, in a child pytest started with TRITON_INTERPRET=1."""
    pytest.importorskip("triton", reason="triton is not importable; the prefill kernel needs it")
    run_interpreter_child(__file__, 2)

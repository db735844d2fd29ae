"""CUDA graphs for one prefill chunk, replayed beside the decode graph (issue 14).

A step that mixes decode tokens with a prompt's chunk ran the chunk eager, and an eager forward
is launch-bound on the hosts we measured: its ~200 Triton and ATen launches cost 10-15 ms
whatever the chunk's size, so the decoding requests' inter-token latency tripled while a long
prompt prefilled (BENCHMARKS.md, second session). Here a chunk of n tokens of one sequence
replays the graph captured for the smallest size C >= n of `CHUNK_SIZES`: rows n .. C - 1 are
padding (token 0 at the chunk's first position, K/V written to the cache's trash slot, no
attention tile, their logits never read); the attention tiles come from `tiles.plan_rows` and
empty tiles ([0, 0, 0, 0]: no rows, no keys) fill the graph's fixed grid. The logits row is the
chunk's last real token.

The prefill kernel reads everything that varies (sequence, first row, rows, first position)
from the tiles tensor, and the block-table width is fixed at the graphs' maximum, so one graph
serves every start position.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from aioffload.attention.backends import AttentionMetadata
from aioffload.attention.kv_cache import KVCache, slot_mapping
from aioffload.attention.tiles import PREFILL_TILE, plan_rows
from aioffload.model.llama import LlamaModel
from aioffload.worker.capture import no_gc
from aioffload.worker.inputs import SeqChunk

log = logging.getLogger("aioffload.cuda_graphs")

# Chunk sizes captured: a chunk beside decoding requests is held to the prefill share
# (worker/step_cost.py: a few hundred fresh tokens on an H200 at 8B, fewer deep in a prompt) and
# the scheduler cuts such a chunk to one of these sizes; only a prompt's last chunk is padded.
CHUNK_SIZES = (16, 32, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)


def num_tiles(size: int, tile: int = PREFILL_TILE) -> int:
    return -(-size // tile)


class ChunkInputs:
    """The static inputs of the chunk graphs: pinned host staging and device buffers for the
    largest size, each graph using a prefix. `fill` writes one chunk padded to `size`; `meta`
    is the attention metadata over those buffers (what the model is captured with)."""

    def __init__(self, sizes: Sequence[int], max_blocks: int, trash_slot: int, block_size: int,
                 device: torch.device) -> None:  # fmt: skip
        self.sizes, self.max_blocks, self.trash_slot, self.block_size = tuple(sizes), max_blocks, trash_slot, block_size
        n, t = self.sizes[-1], num_tiles(self.sizes[-1])
        pin = device.type == "cuda"
        i32, i64 = torch.int32, torch.int64
        # rows: ids, positions, slots, row_ctx; tiles [t, 4]; table [1, max_blocks]; last [1]
        self.host_rows = torch.zeros(4, n, dtype=i64, pin_memory=pin)
        self.host_tiles = torch.zeros(t, 4, dtype=i32, pin_memory=pin)
        self.host_table = torch.zeros(1, max_blocks, dtype=i32, pin_memory=pin)
        self.host_last = torch.zeros(1, dtype=i64, pin_memory=pin)
        self.rows = torch.zeros(4, n, dtype=i64, device=device)
        self.rows[2].fill_(trash_slot)
        self.rows[3].fill_(1)
        self.tiles = torch.zeros(t, 4, dtype=i32, device=device)
        self.table = torch.zeros(1, max_blocks, dtype=i32, device=device)
        self.last = torch.zeros(1, dtype=i64, device=device)
        self.row_seq = torch.zeros(n, dtype=i32, device=device)
        self.no_rows = torch.zeros(0, dtype=i32, device=device)

    def size_for(self, chunk: SeqChunk) -> int | None:
        """The graph size that takes `chunk`, or None (several logits rows, prompt logprobs, too long)."""
        n = len(chunk.token_ids)
        if n < 2 or chunk.num_logits != 1 or chunk.prompt_targets or len(chunk.block_table) > self.max_blocks:
            return None
        return next((s for s in self.sizes if s >= n), None)

    def fill(self, chunk: SeqChunk, size: int) -> None:
        """Host staging for `chunk` padded to `size`, then one copy per buffer to the device."""
        n, p0, bs, table = len(chunk.token_ids), chunk.start, self.block_size, chunk.block_table
        pos = range(p0, p0 + n)
        pad = size - n
        rows = [
            [*chunk.token_ids, *[0] * pad],
            [*pos, *[p0] * pad],
            [*slot_mapping(table, p0, p0 + n, bs), *[self.trash_slot] * pad],
            [*(p + 1 for p in pos), *[1] * pad],
        ]
        self.host_rows[:, :size].copy_(torch.tensor(rows, dtype=torch.int64))
        tiles, _ = plan_rows([n], [p0])
        tiles += [[0, 0, 0, 0]] * (num_tiles(size) - len(tiles))
        self.host_tiles[: len(tiles)].copy_(torch.tensor(tiles, dtype=torch.int32))
        self.host_table.zero_()
        self.host_table[0, : len(table)] = torch.tensor(list(table), dtype=torch.int32)
        self.host_last[0] = n - 1
        self.rows[:, :size].copy_(self.host_rows[:, :size], non_blocking=True)
        self.tiles[: len(tiles)].copy_(self.host_tiles[: len(tiles)], non_blocking=True)
        self.table.copy_(self.host_table, non_blocking=True)
        self.last.copy_(self.host_last, non_blocking=True)

    def args(self, size: int) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """(input_ids, positions, metadata) of a `size`-row chunk over the static buffers."""
        meta = AttentionMetadata(
            slot_mapping=self.rows[2, :size],
            block_tables=self.table,
            row_seq=self.row_seq[:size],
            row_ctx=self.rows[3, :size],
            last_token_idx=self.last,
            query_lens=[size],
            seq_lens_host=[size],
            prefill_tiles=self.tiles[: num_tiles(size)],
            decode_rows=self.no_rows,
        )
        return self.rows[0, :size], self.rows[1, :size], meta


class ChunkGraphRunner:
    """One CUDA graph per chunk size over `ChunkInputs`, captured in a pool of their own."""

    def __init__(self, model: LlamaModel, kv: KVCache, max_blocks_per_seq: int,
                 sizes: Sequence[int] = CHUNK_SIZES) -> None:  # fmt: skip
        self.model, self.kv = model, kv
        self.inputs = ChunkInputs(sizes, max_blocks_per_seq, kv.trash_slot, kv.block_size, model.device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self._capture()

    def _capture(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        with no_gc():
            self._capture_in(pool, stream)

    def _capture_in(self, pool: tuple[int, int], stream: torch.cuda.Stream) -> None:
        for size in reversed(self.inputs.sizes):  # largest first, so smaller graphs reuse its pool memory
            ids, pos, meta = self.inputs.args(size)
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self.model.forward(ids, pos, meta, self.kv)  # warm-up: Triton compile, cuBLAS handles
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[size] = self.model.forward(ids, pos, meta, self.kv)
            self.graphs[size] = graph
        torch.cuda.synchronize()
        log.info("CUDA graphs captured for prefill chunks of up to %s tokens", list(self.inputs.sizes))

    def can_run(self, chunk: SeqChunk) -> bool:
        return self.inputs.size_for(chunk) is not None

    def run(self, chunk: SeqChunk) -> torch.Tensor:  # logits [1, V]
        size = self.inputs.size_for(chunk)
        assert size is not None, "can_run first"
        self.inputs.fill(chunk, size)
        self.graphs[size].replay()
        return self.outputs[size]

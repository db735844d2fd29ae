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

import ctypes
import logging
from collections.abc import Sequence

import torch

from aioffload.attention.backends import AttentionMetadata
from aioffload.attention.kv_cache import KVCache, slot_mapping
from aioffload.attention.tiles import PREFILL_TILE, plan_rows
from aioffload.model.llama import LlamaModel
from aioffload.worker.capture import capture_graphs
from aioffload.worker.inputs import SeqChunk

log = logging.getLogger("aioffload.cuda_graphs")

# Chunk sizes captured: a chunk beside decoding requests is held to the prefill share
# (worker/step_cost.py: a few hundred fresh tokens on an H200 at 8B, fewer deep in a prompt) and
# the scheduler cuts such a chunk to one of these sizes; only a prompt's last chunk is padded.
CHUNK_SIZES = (16, 32, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)
# Decode tokens a mixed graph holds beside its chunk: the decode graphs' buckets up to this many
# (more decodes than that: the decode graph and a chunk graph, two weight passes).
MIXED_DECODE_MAX = 64


def mixed_buckets(decode_buckets: Sequence[int], most: int = MIXED_DECODE_MAX) -> tuple[int, ...]:
    """0 (a chunk alone) and the decode buckets of at most `most` tokens."""
    return (0, *(b for b in decode_buckets if 0 < b <= most))


def num_tiles(size: int, tile: int = PREFILL_TILE) -> int:
    return -(-size // tile)


class ChunkInputs:
    """The static inputs of the chunk graphs: pinned host staging and device buffers for the
    largest (decode bucket, chunk size), each graph using a prefix. `fill` writes one chunk padded
    to `size` behind `bucket` decode rows; `args` is the forward's input over those buffers (what
    the model is captured with).

    Row layout of a graph for (b, c): rows 0 .. b - 1 are decode tokens (one per sequence, as in
    the decode graphs; rows past the step's decodes are padding: token 0, trash slot, one key),
    rows b .. b + c - 1 the chunk. Block-table row 0 is the chunk's, row 1 + i decode row i's, so
    the chunk's tiles name sequence 0 whatever b is."""

    def __init__(self, sizes: Sequence[int], max_blocks: int, trash_slot: int, block_size: int,
                 device: torch.device, decode_buckets: Sequence[int] = (0,)) -> None:  # fmt: skip
        self.sizes, self.max_blocks, self.trash_slot, self.block_size = tuple(sizes), max_blocks, trash_slot, block_size
        self.buckets = tuple(sorted(set(decode_buckets) | {0}))
        b, n, t = self.buckets[-1], self.sizes[-1], num_tiles(self.sizes[-1])
        self.total = total = b + n
        pin = device.type == "cuda"
        i32, i64 = torch.int32, torch.int64
        # rows: ids, positions, slots, row_ctx; tiles [t, 4]; table [1 + b, max_blocks]; last [1 + b]
        self.host_rows = torch.zeros(4, total, dtype=i64, pin_memory=pin)
        self.host_tiles = torch.zeros(t, 4, dtype=i32, pin_memory=pin)
        self.host_table = torch.zeros(1 + b, max_blocks, dtype=i32, pin_memory=pin)
        self.host_last = torch.zeros(1 + b, dtype=i64, pin_memory=pin)
        # Flat ctypes views (numpy is not a runtime dependency): rows[k, i] is _rows[k * total + i].
        self._rows = (ctypes.c_int64 * (4 * total)).from_address(self.host_rows.data_ptr())
        self._table = (ctypes.c_int32 * ((1 + b) * max_blocks)).from_address(self.host_table.data_ptr())
        self._tiles = (ctypes.c_int32 * (4 * t)).from_address(self.host_tiles.data_ptr())
        self._last = (ctypes.c_int64 * (1 + b)).from_address(self.host_last.data_ptr())
        self.rows = torch.zeros(4, total, dtype=i64, device=device)
        self.rows[2].fill_(trash_slot)
        self.rows[3].fill_(1)
        self.tiles = torch.zeros(t, 4, dtype=i32, device=device)
        self.table = torch.zeros(1 + b, max_blocks, dtype=i32, device=device)
        self.last = torch.zeros(1 + b, dtype=i64, device=device)
        # Per bucket b: each row's sequence (decode row i: 1 + i; chunk rows: 0) and the decode rows.
        self.row_seq = {k: torch.tensor([*range(1, k + 1), *[0] * n], dtype=i32, device=device) for k in self.buckets}
        self.decode_rows = {k: torch.arange(k, dtype=i32, device=device) for k in self.buckets}

    def size_for(self, chunk: SeqChunk) -> int | None:
        """The graph size that takes `chunk`, or None (several logits rows, prompt logprobs, too long)."""
        n = len(chunk.token_ids)
        if n < 2 or chunk.num_logits != 1 or chunk.prompt_targets or len(chunk.block_table) > self.max_blocks:
            return None
        return next((s for s in self.sizes if s >= n), None)

    def bucket_for(self, decodes: Sequence[SeqChunk]) -> int | None:
        """The decode bucket that takes these decode tokens beside a chunk, or None."""
        if any(len(c.token_ids) != 1 or c.num_logits != 1 or len(c.block_table) > self.max_blocks for c in decodes):
            return None
        return next((b for b in self.buckets if b >= len(decodes)), None)

    def fill(self, chunk: SeqChunk, size: int, decodes: Sequence[SeqChunk] = (), bucket: int = 0) -> None:
        """Host staging for `bucket` decode rows (the first len(decodes) real) and `chunk` padded to
        `size`, then one copy per buffer to the device."""
        n, p0, bs, table = len(chunk.token_ids), chunk.start, self.block_size, chunk.block_table
        d, b, total, m = len(decodes), bucket, self.total, self.max_blocks
        pos = [c.start for c in decodes] + [0] * (b - d) + list(range(p0, p0 + n)) + [p0] * (size - n)
        slots = [c.block_table[p // bs] * bs + p % bs for c, p in zip(decodes, pos)] + [self.trash_slot] * (b - d)
        slots += [*slot_mapping(table, p0, p0 + n, bs), *[self.trash_slot] * (size - n)]
        ids = [c.token_ids[0] for c in decodes] + [0] * (b - d) + [*chunk.token_ids, *[0] * (size - n)]
        ctx = [p + 1 for p in pos[:d]] + [1] * (b - d) + [p + 1 for p in range(p0, p0 + n)] + [1] * (size - n)
        rows, k = self._rows, b + size
        rows[0:k], rows[total : total + k], rows[2 * total : 2 * total + k], rows[3 * total : 3 * total + k] = (
            ids, pos, slots, ctx,
        )  # fmt: skip
        tiles, _ = plan_rows([n], [p0])
        nt = num_tiles(size)
        flat = [v for _, row, count, first in tiles for v in (0, b + row, count, first)]
        self._tiles[0 : 4 * nt] = flat + [0] * (4 * nt - len(flat))  # empty tiles fill the graph's grid
        tab = self._table
        tab[0:m] = [*table, *[0] * (m - len(table))]
        for i, c in enumerate(decodes):  # entries past a sequence's own blocks are never read
            tab[(1 + i) * m : (1 + i) * m + len(c.block_table)] = list(c.block_table)
        self._last[0 : b + 1] = [*range(b), b + n - 1]
        self.rows.copy_(self.host_rows, non_blocking=True)
        self.tiles[:nt].copy_(self.host_tiles[:nt], non_blocking=True)
        self.table[: 1 + b].copy_(self.host_table[: 1 + b], non_blocking=True)
        self.last[: 1 + b].copy_(self.host_last[: 1 + b], non_blocking=True)

    def args(self, size: int, bucket: int = 0) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """(input_ids, positions, metadata) of `bucket` decode rows and a `size`-row chunk over the static buffers."""
        k = bucket + size
        meta = AttentionMetadata(
            slot_mapping=self.rows[2, :k],
            block_tables=self.table[: 1 + bucket],
            row_seq=self.row_seq[bucket][:k],
            row_ctx=self.rows[3, :k],
            last_token_idx=self.last[: 1 + bucket],
            query_lens=[size, *[1] * bucket],  # host copies, chunk first; the Triton kernels never read them
            seq_lens_host=[size, *[1] * bucket],
            prefill_tiles=self.tiles[: num_tiles(size)],
            decode_rows=self.decode_rows[bucket],
        )
        return self.rows[0, :k], self.rows[1, :k], meta


class ChunkGraphRunner:
    """One CUDA graph per (decode bucket, chunk size) over `ChunkInputs`, captured in a pool of
    their own. Bucket 0 is a chunk alone (beside the decode graph when the step's decodes exceed
    the largest bucket); a bucket b > 0 holds up to b decode tokens and the chunk in one forward,
    one pass over the weights (a chunk graph beside the decode graph made two: BENCHMARKS.md,
    second session, call 4)."""

    def __init__(self, model: LlamaModel, kv: KVCache, max_blocks_per_seq: int,
                 sizes: Sequence[int] = CHUNK_SIZES, decode_buckets: Sequence[int] = (0,)) -> None:  # fmt: skip
        self.model, self.kv = model, kv
        self.inputs = ChunkInputs(sizes, max_blocks_per_seq, kv.trash_slot, kv.block_size, model.device,
                                  decode_buckets)  # fmt: skip
        self._capture()

    def _capture(self) -> None:
        def forward(key: tuple[int, int]) -> torch.Tensor:
            return self.model.forward(*self.inputs.args(key[1], key[0]), self.kv)

        keys = sorted(((b, c) for b in self.inputs.buckets for c in self.inputs.sizes), key=lambda k: -sum(k))
        self.graphs, self.outputs = capture_graphs(keys, forward)  # largest first
        log.info("CUDA graphs captured for prefill chunks of up to %s tokens beside %s decode tokens (%d graphs)",
                 list(self.inputs.sizes), list(self.inputs.buckets), len(keys))  # fmt: skip

    def can_run(self, chunk: SeqChunk, decodes: Sequence[SeqChunk] = ()) -> bool:
        return self.inputs.size_for(chunk) is not None and self.inputs.bucket_for(decodes) is not None

    def run(self, chunk: SeqChunk, decodes: Sequence[SeqChunk] = ()) -> torch.Tensor:
        """Logits [len(decodes) + 1, V]: the decode tokens' rows, then the chunk's last row."""
        size, bucket = self.inputs.size_for(chunk), self.inputs.bucket_for(decodes)
        assert size is not None and bucket is not None, "can_run first"
        self.inputs.fill(chunk, size, decodes, bucket)
        self.graphs[(bucket, size)].replay()
        out = self.outputs[(bucket, size)]  # [bucket + 1, V]
        d = len(decodes)
        return out if d == bucket else torch.cat([out[:d], out[bucket:]])

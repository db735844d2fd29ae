"""CUDA graphs for decode steps when every weight is resident.

Graphs are captured for bucketed batch sizes (1, 2, 4, 8, then steps of 16 up to
max_num_seqs) from one shared memory pool. A step of S decode tokens replays the
smallest bucket >= S; padding rows write their K/V to the cache's trash slot and see
one key, so they change nothing. Each replay's inputs are written into pinned host
buffers through ctypes arrays over their memory (`GraphInputs`; numpy is not a runtime
dependency), then copied to the device whole.

Two sets of host buffers take turns, so a step can be filled while the one before it is still
queued (decode lookahead, engine/lookahead.py); a set is refilled only after the copies that read
it last are done. A lookahead step's token ids come from the step before it, on the device
(`run`'s `feed`): a copy after the inputs' copy, before the replay.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Sequence

import torch

from aioffload.attention.backends import AttentionMetadata
from aioffload.attention.kv_cache import KVCache
from aioffload.model.llama import LlamaModel
from aioffload.worker.capture import capture_graphs
from aioffload.worker.inputs import SeqChunk

log = logging.getLogger("aioffload.cuda_graphs")


def bucket_sizes(max_num_seqs: int) -> list[int]:
    sizes = [s for s in (1, 2, 4, 8) if s <= max_num_seqs]
    sizes += list(range(16, max_num_seqs + 1, 16))
    if sizes[-1] != max_num_seqs:
        sizes.append(max_num_seqs)
    return sizes


class GraphInputs:
    """Host staging buffers of one replay: `rows` [4, n] int64 (ids, positions, slots, ctx),
    `tables` [n, max_blocks] int32 and `feed` [n] int64 (a lookahead step's rows of the feeding
    step's ids), written in place through ctypes views of their memory."""

    def __init__(self, n: int, max_blocks_per_seq: int, pin_memory: bool) -> None:
        self.n, self.max_blocks = n, max_blocks_per_seq
        self.rows = torch.zeros(4, n, dtype=torch.int64, pin_memory=pin_memory)
        self.tables = torch.zeros(n, max_blocks_per_seq, dtype=torch.int32, pin_memory=pin_memory)
        self.feed = torch.zeros(n, dtype=torch.int64, pin_memory=pin_memory)
        # Flat views: rows[k, i] is _rows[k * n + i], tables[i, j] is _tables[i * max_blocks + j].
        self._rows = (ctypes.c_int64 * (4 * n)).from_address(self.rows.data_ptr())
        self._tables = (ctypes.c_int32 * (n * max_blocks_per_seq)).from_address(self.tables.data_ptr())
        self._feed = (ctypes.c_int64 * n).from_address(self.feed.data_ptr())

    def fill_feed(self, feed_rows: Sequence[int]) -> None:
        self._feed[0 : len(feed_rows)] = list(feed_rows)

    def fill(self, chunks: Sequence[SeqChunk], bs: int, block_size: int, trash_slot: int) -> None:
        """Write one decode token per chunk into rows [0, len(chunks)), padding rows up to `bs`
        (token 0 at position 0, writing to the trash slot, one key), and each block table."""
        s, n, m = len(chunks), self.n, self.max_blocks
        rows, tables = self._rows, self._tables
        pos = [c.start for c in chunks]
        rows[0:s] = [c.token_ids[0] for c in chunks]
        rows[n : n + s] = pos
        rows[2 * n : 2 * n + s] = [
            c.block_table[p // block_size] * block_size + p % block_size for c, p in zip(chunks, pos)
        ]
        rows[3 * n : 3 * n + s] = [p + 1 for p in pos]
        pad = bs - s
        if pad > 0:
            rows[s:bs] = [0] * pad
            rows[n + s : n + bs] = [0] * pad
            rows[2 * n + s : 2 * n + bs] = [trash_slot] * pad
            rows[3 * n + s : 3 * n + bs] = [1] * pad
        for i, c in enumerate(chunks):
            table = c.block_table
            if len(table) > m:  # the flat view would spill into the next row
                raise ValueError(f"a block table of {len(table)} blocks exceeds the graphs' {m}")
            tables[i * m : i * m + len(table)] = table


class CudaGraphRunner:
    def __init__(self, model: LlamaModel, kv: KVCache, max_num_seqs: int, max_blocks_per_seq: int) -> None:
        self.model, self.kv = model, kv
        self.sizes = bucket_sizes(max_num_seqs)
        n, dev = self.sizes[-1], model.device
        i32, i64 = torch.int32, torch.int64
        self.block_size = kv.block_size
        # Pinned host buffers, copied whole each step (8 KB + the tables): two sets taking turns,
        # each with the event of its last copies.
        self.hosts = [GraphInputs(n, max_blocks_per_seq, pin_memory=True) for _ in range(2)]
        self._copied = [torch.cuda.Event(), torch.cuda.Event()]  # never recorded: synchronize returns at once
        self._turn = 0
        self.feed_rows = torch.zeros(n, dtype=i64, device=dev)  # rows of the feeding step's ids
        self.rows = torch.zeros(4, n, dtype=i64, device=dev)
        self.rows[2].fill_(kv.trash_slot)
        self.rows[3].fill_(1)
        self.input_ids, self.positions, self.slot_mapping, self.row_ctx = self.rows.unbind(0)
        self.block_tables = torch.zeros(n, max_blocks_per_seq, dtype=i32, device=dev)
        self.arange32 = torch.arange(n, dtype=i32, device=dev)
        self.arange64 = torch.arange(n, dtype=i64, device=dev)
        self._capture()

    def _meta(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:bs],
            block_tables=self.block_tables[:bs],
            row_seq=self.arange32[:bs],
            row_ctx=self.row_ctx[:bs],
            last_token_idx=self.arange64[:bs],
            query_lens=[1] * bs,
            seq_lens_host=[1] * bs,
            decode_only=True,
        )

    def _capture(self) -> None:
        def forward(bs: int) -> torch.Tensor:
            return self.model.forward(self.input_ids[:bs], self.positions[:bs], self._meta(bs), self.kv)

        self.graphs, self.outputs = capture_graphs(reversed(self.sizes), forward)  # largest first
        log.info("CUDA graphs captured for decode batch sizes %s", self.sizes)

    def can_run(self, chunks: Sequence[SeqChunk]) -> bool:
        """Decode-only steps (one token per sequence) of at most the largest bucket."""
        return len(chunks) <= self.sizes[-1] and all(len(c.token_ids) == 1 for c in chunks)

    def run(
        self, chunks: Sequence[SeqChunk], feed: torch.Tensor | None = None, feed_rows: Sequence[int] | None = None
    ) -> torch.Tensor:  # logits [S, V]
        """Replay the bucket's graph. `feed` (ids [R] int64 on the device, from the step queued
        before): chunk i's token is feed[feed_rows[i]], and its own token_ids[0] is a placeholder."""
        s = len(chunks)
        bs = next(b for b in self.sizes if b >= s)
        host, copied = self.hosts[self._turn], self._copied[self._turn]
        self._turn ^= 1
        copied.synchronize()  # the copies that read this set last (two steps back: long done)
        host.fill(chunks, bs, self.block_size, self.kv.trash_slot)
        self.rows.copy_(host.rows, non_blocking=True)
        self.block_tables[:bs].copy_(host.tables[:bs], non_blocking=True)
        if feed is not None:
            assert feed_rows is not None and len(feed_rows) == s
            if list(feed_rows) == list(range(s)):  # the same sequences in the same order: one copy
                self.input_ids[:s].copy_(feed[:s])
            else:
                host.fill_feed(feed_rows)
                self.feed_rows[:s].copy_(host.feed[:s], non_blocking=True)
                torch.index_select(feed, 0, self.feed_rows[:s], out=self.input_ids[:s])
        copied.record()
        self.graphs[bs].replay()
        return self.outputs[bs][:s]

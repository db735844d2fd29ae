"""CUDA graphs for decode steps when every weight is resident.

Graphs are captured for bucketed batch sizes (1, 2, 4, 8, then steps of 16 up to
max_num_seqs) from one shared memory pool. A step of S decode tokens replays the
smallest bucket >= S; padding rows write their K/V to the cache's trash slot and see
one key, so they change nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from aioffload.attention.backends import AttentionMetadata
from aioffload.attention.kv_cache import KVCache
from aioffload.model.llama import LlamaModel
from aioffload.worker.inputs import SeqChunk

log = logging.getLogger("aioffload.cuda_graphs")


def bucket_sizes(max_num_seqs: int) -> list[int]:
    sizes = [s for s in (1, 2, 4, 8) if s <= max_num_seqs]
    sizes += list(range(16, max_num_seqs + 1, 16))
    if sizes[-1] != max_num_seqs:
        sizes.append(max_num_seqs)
    return sizes


class CudaGraphRunner:
    def __init__(self, model: LlamaModel, kv: KVCache, max_num_seqs: int, max_blocks_per_seq: int) -> None:
        self.model, self.kv = model, kv
        self.sizes = bucket_sizes(max_num_seqs)
        n, dev = self.sizes[-1], model.device
        i32, i64 = torch.int32, torch.int64
        self.block_size = kv.block_size
        # One pinned host buffer per input kind, copied whole each step (8 KB + the tables).
        self.host_rows = torch.zeros(4, n, dtype=i64, pin_memory=True)  # ids, positions, slots, ctx
        self.host_tables = torch.zeros(n, max_blocks_per_seq, dtype=i32, pin_memory=True)
        self.rows_np, self.tables_np = self.host_rows.numpy(), self.host_tables.numpy()
        self.rows = torch.zeros(4, n, dtype=i64, device=dev)
        self.rows[2].fill_(kv.trash_slot)
        self.rows[3].fill_(1)
        self.input_ids, self.positions, self.slot_mapping, self.row_ctx = self.rows.unbind(0)
        self.block_tables = torch.zeros(n, max_blocks_per_seq, dtype=i32, device=dev)
        self.arange32 = torch.arange(n, dtype=i32, device=dev)
        self.arange64 = torch.arange(n, dtype=i64, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
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
        )

    def _capture(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        for bs in reversed(self.sizes):  # largest first, so smaller graphs reuse its pool memory
            meta = self._meta(bs)
            args = (self.input_ids[:bs], self.positions[:bs], meta, self.kv)
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self.model.forward(*args)  # warm-up: Triton compile, cuBLAS handles
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[bs] = self.model.forward(*args)
            self.graphs[bs] = graph
        torch.cuda.synchronize()
        log.info("CUDA graphs captured for decode batch sizes %s", self.sizes)

    def can_run(self, chunks: Sequence[SeqChunk]) -> bool:
        """Decode-only steps (one token per sequence) of at most the largest bucket."""
        return len(chunks) <= self.sizes[-1] and all(len(c.token_ids) == 1 for c in chunks)

    def run(self, chunks: Sequence[SeqChunk]) -> torch.Tensor:  # logits [S, V]
        s = len(chunks)
        bs = next(b for b in self.sizes if b >= s)
        rows, tables, block = self.rows_np, self.tables_np, self.block_size
        for i, c in enumerate(chunks):
            p = c.start
            rows[0, i], rows[1, i], rows[3, i] = c.token_ids[0], p, p + 1
            rows[2, i] = c.block_table[p // block] * block + p % block
            tables[i, : len(c.block_table)] = c.block_table
        rows[0, s:bs], rows[1, s:bs], rows[2, s:bs], rows[3, s:bs] = 0, 0, self.kv.trash_slot, 1
        self.rows.copy_(self.host_rows, non_blocking=True)
        self.block_tables[:bs].copy_(self.host_tables[:bs], non_blocking=True)
        self.graphs[bs].replay()
        return self.outputs[bs][:s]

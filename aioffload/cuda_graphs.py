"""CUDA graphs for decode steps when every weight is resident.

Graphs are captured for bucketed batch sizes (1, 2, 4, 8, then steps of 16 up to
max_num_seqs) from one shared memory pool. A step of S decode tokens replays the
smallest bucket >= S; padding rows write their K/V to the cache's trash slot and see
one key, so they change nothing.
"""

from __future__ import annotations

import logging

import torch

from aioffload.attention import AttentionMetadata
from aioffload.inputs import StepInputs
from aioffload.kv_cache import KVCache
from aioffload.model.llama import LlamaModel

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
        self.input_ids = torch.zeros(n, dtype=i64, device=dev)
        self.positions = torch.zeros(n, dtype=i64, device=dev)
        self.slot_mapping = torch.full((n,), kv.trash_slot, dtype=i64, device=dev)
        self.block_tables = torch.zeros(n, max_blocks_per_seq, dtype=i32, device=dev)
        self.seq_lens = torch.ones(n, dtype=i32, device=dev)
        self.row_ctx = torch.ones(n, dtype=i32, device=dev)
        self.arange32 = torch.arange(n, dtype=i32, device=dev)
        self.arange64 = torch.arange(n, dtype=i64, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self._capture()

    def _meta(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:bs],
            block_tables=self.block_tables[:bs],
            seq_lens=self.seq_lens[:bs],
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

    def can_run(self, inputs: StepInputs) -> bool:
        m = inputs.meta
        return len(m.query_lens) <= self.sizes[-1] and inputs.input_ids.numel() == len(m.query_lens)

    def run(self, inputs: StepInputs) -> torch.Tensor:  # logits [S, V]
        m = inputs.meta
        s = len(m.query_lens)
        bs = next(b for b in self.sizes if b >= s)
        self.input_ids[:s].copy_(inputs.input_ids)
        self.positions[:s].copy_(inputs.positions)
        self.slot_mapping[:s].copy_(m.slot_mapping)
        self.slot_mapping[s:bs].fill_(self.kv.trash_slot)
        w = m.block_tables.shape[1]
        self.block_tables[:s, :w].copy_(m.block_tables)
        self.seq_lens[:s].copy_(m.seq_lens)
        self.row_ctx[:s].copy_(m.row_ctx)
        self.row_ctx[s:bs].fill_(1)
        self.graphs[bs].replay()
        return self.outputs[bs][:s]

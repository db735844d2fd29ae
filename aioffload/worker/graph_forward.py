"""Which forward runs a step: the decode graph, a mixed graph, a chunk graph beside the decode
graph, or eager (issue 14).

A decode-only step replays a CUDA graph (worker/cuda_graphs.py). A step with decode tokens and
one prefill chunk that a chunk graph takes (worker/chunk_graphs.py) replays the graph captured for
both at once (one pass over the weights), when its decodes fit a captured bucket; with more
decodes, the decode graph for them and a chunk graph for the chunk. Other chunks run eager
behind the decode graph. Measured on the H200 (BENCHMARKS.md, second session): beside 16
decoding requests, a mixed step all eager is launch-bound at 15-30 ms; decode graph + chunk
graph ~12-18 ms (two weight passes).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from aioffload.attention.kv_cache import KVCache
from aioffload.model.llama import LlamaModel
from aioffload.worker.inputs import SeqChunk, build_inputs

if TYPE_CHECKING:
    from aioffload.worker.chunk_graphs import ChunkGraphRunner
    from aioffload.worker.cuda_graphs import CudaGraphRunner


def step_logits(
    chunks: Sequence[SeqChunk], model: LlamaModel, kv: KVCache, block_size: int,
    graphs: CudaGraphRunner | None, chunk_graphs: ChunkGraphRunner | None, mixed: bool,
) -> torch.Tensor:  # fmt: skip
    """Logits [R, V] (R = the chunks' num_logits, in chunk order). `mixed`: graphs may run part
    of a step that also has prefill chunks (not under tensor parallelism)."""
    if graphs is not None and graphs.can_run(chunks):
        return graphs.run(chunks)
    if graphs is not None and mixed:
        is_dec = [len(c.token_ids) == 1 and c.num_logits == 1 for c in chunks]
        dec = [i for i, d in enumerate(is_dec) if d]
        rest = [i for i, d in enumerate(is_dec) if not d]
        dec_chunks = [chunks[i] for i in dec]
        if dec and len(rest) == 1 and chunk_graphs is not None and chunk_graphs.can_run(chunks[rest[0]], dec_chunks):
            logits = chunk_graphs.run(chunks[rest[0]], dec_chunks)  # [D + 1, V]: decodes, then the chunk
            return _in_chunk_order(chunks, dec, rest, [logits[: len(dec)], logits[len(dec) :]])
        one = len(rest) == 1 and chunk_graphs is not None and chunk_graphs.can_run(chunks[rest[0]])
        if (dec or one) and (not dec or graphs.can_run(dec_chunks)):
            return _graphs_and_rest(chunks, dec, rest, model, kv, block_size, graphs, chunk_graphs if one else None)
    return _eager(chunks, model, kv, block_size)


def _eager(chunks: Sequence[SeqChunk], model: LlamaModel, kv: KVCache, block_size: int) -> torch.Tensor:
    inputs = build_inputs(chunks, block_size, model.device, model.attention.dense_min_rows)
    return model.forward(inputs.input_ids, inputs.positions, inputs.meta, kv)


def _graphs_and_rest(
    chunks: Sequence[SeqChunk], dec: list[int], rest: list[int], model: LlamaModel, kv: KVCache,
    block_size: int, graphs: CudaGraphRunner, chunk_graphs: ChunkGraphRunner | None,
) -> torch.Tensor:  # fmt: skip
    """The decode chunks `dec` through the decode graph, the others through `chunk_graphs`
    (exactly one chunk) or eager; rows put back in chunk order."""
    pieces = []
    if dec:
        pieces.append(graphs.run([chunks[i] for i in dec]))  # [D, V], the graph's own buffer
    if chunk_graphs is not None:
        pieces.append(chunk_graphs.run(chunks[rest[0]]))  # [1, V]
    else:
        pieces.append(_eager([chunks[i] for i in rest], model, kv, block_size))
    return _in_chunk_order(chunks, dec, rest, pieces if dec else [pieces[0][:0], pieces[0]])


def _in_chunk_order(
    chunks: Sequence[SeqChunk], dec: list[int], rest: list[int], pieces: list[torch.Tensor]
) -> torch.Tensor:
    """pieces = [the decode chunks' rows, the other chunks' rows] -> logits rows in chunk order."""
    if dec == list(range(len(dec))):  # the scheduler's usual order: decodes first
        return torch.cat(pieces) if dec else pieces[1]
    first = [0]
    for c in chunks:
        first.append(first[-1] + c.num_logits)
    out = pieces[-1].new_empty(first[-1], pieces[-1].shape[1])
    if dec:
        out[[first[i] for i in dec]] = pieces[0]
    out[[r for i in rest for r in range(first[i], first[i + 1])]] = pieces[-1]
    return out

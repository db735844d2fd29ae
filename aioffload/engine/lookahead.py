"""Decode lookahead: the next decode step is launched before this one's tokens reach the host.

A batch-1 decode step on the H200 is a 4.57 ms CUDA graph, and the host's turn between two steps
(the ids' copy back, delivery, scheduling, the next step's inputs and launch) left the GPU idle
for ~0.15 ms of each 4.72 ms step (BENCHMARKS.md, fourth session, call 4). With lookahead the
engine plans step N+1 while step N runs (`Scheduler.lookahead`: the same decoding requests, one
token further) and queues it behind N, its input tokens read on the device from N's ids
(`Worker.launch`'s feed). Then it waits for N's ids, delivers them, and plans N+2 while N+1 runs.

Nothing changes in what is computed: each sequence's row is the step it would have run, and its
sampling keys (seed, output index) are the same. A request that N's token ends (a stop token, a
stop string, an abort) has its N+1 row computed and dropped; its blocks return as usual, and the
dropped row's K/V write lands before any later step's, on the same stream. Whatever
`Scheduler.lookahead` cannot plan without N's tokens (admissions, prefill, proposals, logits
extras) ends the run: the engine waits for N and schedules as before.

`--lookahead auto` turns it on where the worker launches steps without waiting (CUDA graphs, every
weight resident); `on` also runs it on the CPU, synchronously, which is how CI checks it.
"""

from __future__ import annotations

from dataclasses import dataclass

from aioffload.attention.kv_cache import BlockManager
from aioffload.engine.step_plan import StepPlan
from aioffload.worker.inputs import SeqChunk
from aioffload.worker.sampling import SamplingParams

PLACEHOLDER = 0  # a lookahead chunk's token id until the device feeds the real one


@dataclass
class LaunchStep:
    """`Worker.launch`'s arguments for one plan of decoding requests."""

    chunks: list[SeqChunk]
    params: list[SamplingParams]
    seeds: list[int]
    steps: list[int]
    feed_rows: list[int] | None  # per chunk, its row in the feeding step (None: tokens known)


def launch_step(plan: StepPlan, block_manager: BlockManager, feeding: StepPlan | None = None) -> LaunchStep:
    """The launch of `plan`: with `feeding` (the plan still running, whose tokens `plan` takes), each
    request one position past what it has computed, its token the feeding step's row for it; without,
    a plain decode step of the requests' last known tokens."""
    rows = {r.request_id: i for i, r in enumerate(feeding.requests)} if feeding is not None else None
    pending = 1 if rows is not None else 0  # the feeding step's token, not yet in output_token_ids
    chunks, params, seeds, steps = [], [], [], []
    for req in plan.requests:
        start = req.num_computed_tokens + pending
        token = PLACEHOLDER if pending else req.token_ids(start, start + 1)[0]
        chunks.append(SeqChunk([token], start, block_manager.block_table(req.request_id)))
        params.append(req.sampling)
        seeds.append(req.seed)
        steps.append(len(req.output_token_ids) + pending)
    feed_rows = [rows[r.request_id] for r in plan.requests] if rows is not None else None
    return LaunchStep(chunks, params, seeds, steps, feed_rows)


def resolve_mode(mode: str, worker_graphs: bool) -> bool:
    """--lookahead auto|on|off -> whether the engine looks ahead (auto: where decode runs as a graph)."""
    return mode == "on" or (mode == "auto" and worker_graphs)

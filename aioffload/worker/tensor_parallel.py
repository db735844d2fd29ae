"""A worker's tensor parallelism (DESIGN.md section 10): its rank, its shard, and what rank 0 tells
the others.

Rank 0's worker is the one the engine drives. Building it posts `BuildWorker` (the config) so
that every other rank builds its own shard of the same worker; each step posts `RunStep` (the
chunks, with any proposals in them, and rank 0's host share for the hybrid split) before rank 0
runs the forward itself. The other ranks run the same forward, then give their logits columns to
rank 0 (only their argmax in an all-greedy step without proposals); they need nothing back but the
next command. Sampling parameters, seeds and steps never leave rank 0: only it samples.

One tensor-parallel worker at a time: a follower drops its worker when the next one is built.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from aioffload.checkpoint.checkpoint import Checkpoint, CheckpointError
from aioffload.config import EngineConfig, ModelConfig, OffloadConfig
from aioffload.distributed.channel import CommandChannel
from aioffload.distributed.group import TPGroup
from aioffload.distributed.parallel_ops import ShardOps
from aioffload.distributed.sharding import TPShard, check_tensor_parallel, local_model_config, rank_offload_config
from aioffload.worker.inputs import SeqChunk

log = logging.getLogger("aioffload.worker")


@dataclass(frozen=True)
class BuildWorker:
    config: EngineConfig


@dataclass(frozen=True)
class RunStep:
    chunks: tuple[SeqChunk, ...]  # token ids (proposals included), starts, block tables, num_logits
    argmax: bool  # all-greedy and no proposals: only each row's argmax goes to rank 0
    host_share: int | None  # chunks of each offloaded layer's MLP the host computes (hybrid), else None
    block_copies: tuple[tuple[int, int], ...] = ()  # copy-on-write (src, dst) blocks to copy first


def hf_config(ckpt: Checkpoint) -> dict:
    return json.loads((ckpt.path / "config.json").read_text())


def check_parallel_start(config: EngineConfig, devices: bool) -> None:
    """Before any rank starts: one-line ConfigErrors when this host lacks a device per rank
    (`devices`: the ranks would be spawned here) or the model cannot be sharded that many ways.
    A model folder that is not there yet (bench --synthetic) is checked when the worker opens it."""
    size = config.parallel.tensor_parallel_size
    if devices:
        from aioffload.distributed.launch import check_devices
        from aioffload.worker.worker import pick_device

        check_devices(size, pick_device(config.device).type)
    if (Path(config.model) / "config.json").is_file():
        try:
            ckpt = Checkpoint.open(config.model)
        except CheckpointError:
            return  # the command itself reports it
        check_tensor_parallel(ckpt.model_config, size, hf_config(ckpt))


class TPLink:
    """One worker's place in the group: `ops` for its model, `local` (its share of the model)."""

    def __init__(self, group: TPGroup, shard: TPShard, local: ModelConfig, channel: CommandChannel | None) -> None:
        self.group, self.shard, self.local, self.channel = group, shard, local, channel
        self.ops = ShardOps(group, shard)

    @classmethod
    def open(cls, config: EngineConfig, ckpt: Checkpoint, device: torch.device, group: TPGroup | None) -> TPLink:
        """Rank 0 (`group` None): check the model shards, join the running group and tell the other
        ranks to build this worker. The others pass the group they run in."""
        size = config.parallel.tensor_parallel_size
        check_tensor_parallel(ckpt.model_config, size, hf_config(ckpt))
        channel = None
        if group is None:
            group = TPGroup.join(config.parallel, device)
            channel = CommandChannel(group.store)
            channel.post(BuildWorker(config))
        shard = TPShard.of(ckpt.model_config, group.rank, size)
        local = local_model_config(ckpt.model_config, shard)
        m = ckpt.model_config
        log.info("tensor parallel: rank %d of %d holds %d of %d heads, %d of %d KV heads%s, %d of %d MLP units, "
                 "%d of %d vocabulary rows", group.rank, size, local.num_heads, m.num_heads, local.num_kv_heads,
                 m.num_kv_heads, " (replicated)" if shard.kv_replicated else "", local.intermediate_size,
                 m.intermediate_size, local.vocab_size, m.vocab_size)  # fmt: skip
        return cls(group, shard, local, channel)

    @property
    def leader(self) -> bool:
        return self.group.leader

    @property
    def device(self) -> torch.device:
        return self.group.device

    def offload_config(self, offload: OffloadConfig) -> OffloadConfig:
        return rank_offload_config(offload, self.group.size)

    def post_step(self, chunks: Sequence[SeqChunk], argmax: bool, host_share: int | None,
                  block_copies: Sequence[tuple[int, int]] = ()) -> None:  # fmt: skip
        assert self.channel is not None, "only rank 0 posts steps"
        self.channel.post(RunStep(tuple(chunks), argmax, host_share, tuple(block_copies)))

    def collect(self, local: torch.Tensor, argmax: bool) -> torch.Tensor | None:
        """The step's logits columns [R, vocab_rows] from every rank -> on rank 0 the argmax ids [R]
        (argmax) or the whole logits [R, V]; None on the other ranks."""
        return self.ops.argmax(local) if argmax else self.ops.gather_logits(local)

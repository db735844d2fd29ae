"""What a rank other than 0 runs: join the group, then build workers and run their steps as rank 0
posts them (worker/tensor_parallel.py), until rank 0 says stop or goes away.

Any failure here ends the process with status 1 after logging it: rank 0's watchdog (or torchrun's
agent) then stops every rank, where waiting would leave rank 0 in a collective for this rank.
"""

from __future__ import annotations

import gc
import logging

import torch

from aioffload.checkpoint.checkpoint import Checkpoint
from aioffload.config import ParallelConfig
from aioffload.distributed.channel import CommandChannel, RankZeroGone
from aioffload.distributed.group import RankEnv, TPGroup
from aioffload.distributed.launch import share_host_threads
from aioffload.worker.tensor_parallel import BuildWorker, RunStep
from aioffload.worker.worker import Worker

log = logging.getLogger("aioffload.worker")


def follow(env: RankEnv, device_type: str, parallel: ParallelConfig) -> None:
    """Serve rank 0's commands as rank `env.rank`; raises SystemExit(1) on any failure."""
    share_host_threads(env.world_size, device_type)
    try:
        group = TPGroup.start(env, device_type, parallel.timeout_s)
    except Exception:
        log.exception("rank %d could not join the group", env.rank)
        raise SystemExit(1) from None
    channel = CommandChannel(group.store)
    worker: Worker | None = None
    try:
        while True:
            cmd = channel.take()
            if cmd is None:
                break
            if isinstance(cmd, BuildWorker):
                worker = None  # one worker at a time: free the last one before the next one sizes its memory
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                worker = Worker(cmd.config, Checkpoint.open(cmd.config.model), tp=group)
            elif isinstance(cmd, RunStep):
                if worker is None:
                    raise RuntimeError("a step arrived before any worker was built")
                worker.follow(cmd)
            else:
                raise RuntimeError(f"unknown command {type(cmd).__name__}")
    except RankZeroGone as e:
        log.error("rank %d stops: %s", env.rank, e)
        raise SystemExit(1) from None
    except Exception:
        log.exception("rank %d failed", env.rank)
        raise SystemExit(1) from None
    worker = None
    group.close()

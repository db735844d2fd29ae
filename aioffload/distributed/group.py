"""One process's place in the tensor-parallel group, and the collectives a step needs.

Every rank joins torch.distributed's default group (NCCL for CUDA tensors with gloo beside it
for CPU ones; gloo alone on the CPU) with `--distributed-timeout` on every collective, over a
TCPStore that also carries rank 0's commands (distributed/channel.py). A rank learns who it is
from a `RankEnv`: torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), or
the values the spawn launcher (distributed/launch.py) hands its children.

Rank 0's worker does not receive the group from its caller: the launcher started the default
group in this process, and `TPGroup.join` opens a store client at the rendezvous the launcher
wrote into the config (`ParallelConfig.rendezvous`).
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from aioffload.config import ConfigError, ParallelConfig

log = logging.getLogger("aioffload.distributed")

# Set before any process group starts: the lent GPU machines fail with NVLink multicast (NVLS) on.
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
STORE_WAIT_S = 3600.0  # a follower's wait for the next command: an idle server sends none
START_WAIT_S = 600.0  # every rank's start-up (a model load is not in it: that comes after)


def multicast_off(environ: dict[str, str] | os._Environ[str] = os.environ) -> None:
    for key, value in MULTICAST_OFF.items():
        if environ.get(key, value) != value:
            log.warning("%s=%s overridden to %s: NVLink multicast stays off", key, environ[key], value)
        environ[key] = value


@dataclass(frozen=True)
class RankEnv:
    """Who this process is among the ranks, and where their store listens."""

    rank: int
    world_size: int
    local_rank: int
    host: str
    port: int
    agent_store: bool = False  # torchrun's agent hosts the store; no rank does

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> RankEnv | None:
        """torchrun's variables, or None when this process was not started by torchrun."""
        if "RANK" not in environ or "WORLD_SIZE" not in environ:
            return None
        try:
            rank, world = int(environ["RANK"]), int(environ["WORLD_SIZE"])
            local = int(environ.get("LOCAL_RANK", rank))
            port = int(environ.get("MASTER_PORT", "29500"))
        except ValueError as e:
            raise ConfigError(f"torchrun environment: {e}") from None
        if not 0 <= rank < world:
            raise ConfigError(f"torchrun environment: RANK {rank} is not in [0, WORLD_SIZE {world})")
        agent = environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
        return cls(rank, world, local, environ.get("MASTER_ADDR", "127.0.0.1"), port, agent)

    @property
    def rendezvous(self) -> str:
        return f"{self.host}:{self.port}"


def store_prefix(what: str) -> str:
    """Keys of this run in the rendezvous store; a torchrun restart starts over under new ones."""
    return f"aioffload/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{what}"


def backend_for(device_type: str) -> str:
    return "cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo"


def open_store(host: str, port: int, world: int, is_master: bool, timeout_s: float) -> dist.TCPStore:
    return dist.TCPStore(host, port, world, is_master, timeout=datetime.timedelta(seconds=timeout_s),
                         wait_for_workers=False)  # fmt: skip


class TPGroup:
    """This rank's membership: rank, size, its device and the rendezvous store."""

    def __init__(self, rank: int, size: int, device: torch.device, store: dist.Store) -> None:
        self.rank, self.size, self.device, self.store = rank, size, device, store

    @property
    def leader(self) -> bool:
        return self.rank == 0

    @classmethod
    def start(cls, env: RankEnv, device_type: str, timeout_s: float, store: dist.Store | None = None) -> TPGroup:
        """Join the default group as `env.rank` (every rank calls this once; it returns when all have).
        `store`: the rendezvous store when this process already hosts it (the spawn launcher)."""
        multicast_off()
        device = torch.device("cpu")
        if device_type == "cuda":
            torch.cuda.set_device(env.local_rank)
            device = torch.device("cuda", env.local_rank)
        if store is None:
            is_master = env.rank == 0 and not env.agent_store
            store = open_store(env.host, env.port, env.world_size, is_master, STORE_WAIT_S)
        # Every rank checks in first, so the group's own (short) collective timeout never has to
        # cover a rank still starting up (importing torch takes seconds on a loaded machine).
        store.set(store_prefix(f"up/{env.rank}"), "1")
        store.wait([store_prefix(f"up/{r}") for r in range(env.world_size)], datetime.timedelta(seconds=START_WAIT_S))
        dist.init_process_group(
            backend_for(device_type), store=dist.PrefixStore(store_prefix("pg"), store), rank=env.rank,
            world_size=env.world_size, timeout=datetime.timedelta(seconds=timeout_s),
        )  # fmt: skip
        log.info("rank %d of %d joined (%s, %s)", env.rank, env.world_size, backend_for(device_type), device)
        return cls(env.rank, env.world_size, device, store)

    @classmethod
    def join(cls, parallel: ParallelConfig, device: torch.device) -> TPGroup:
        """Rank 0's worker: the group this process's launcher started, with a store client of its own."""
        size = parallel.tensor_parallel_size
        if not dist.is_initialized() or parallel.rendezvous is None:
            raise ConfigError(
                f"--tensor-parallel-size {size}: the ranks are not running (start through the aioffload command "
                "or torchrun)"
            )
        if dist.get_world_size() != size or dist.get_rank() != 0:
            raise ConfigError(
                f"--tensor-parallel-size {size}: this process is rank {dist.get_rank()} of {dist.get_world_size()}"
            )
        host, _, port = parallel.rendezvous.rpartition(":")
        return cls(0, size, device, open_store(host, int(port), size, False, STORE_WAIT_S))

    # ---- collectives (every rank calls each one, in the same order) ---------------------------

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place; returns t."""
        dist.all_reduce(t)
        return t

    def min_int(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())

    def max_int(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def leader_flag(self, flag: bool) -> bool:
        """Rank 0's `flag`, on every rank."""
        t = torch.tensor([int(flag)], dtype=torch.int64)
        dist.broadcast(t, src=0)
        return bool(t.item())

    def gather(self, t: torch.Tensor) -> list[torch.Tensor] | None:
        """Every rank's `t` (same shape everywhere), in rank order, on rank 0; None elsewhere."""
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(self.size)] if self.leader else None
        dist.gather(t, parts, dst=0)
        return parts

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

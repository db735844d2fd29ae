"""Starting the ranks: this process is rank 0; ranks 1..N-1 are spawned children (one host), or
torchrun started every rank (many hosts).

The spawn launcher hosts the rendezvous store, starts the children with torch.multiprocessing's
spawn context, joins the default group and watches the children: one that exits while the ranks
run makes this process exit with a one-line error (a collective would otherwise wait for it until
--distributed-timeout). Under torchrun, its agent watches the ranks instead.

`follower` is the function a child runs (the worker layer's command loop: worker/follower.py);
it is passed in, so this module knows nothing of what the ranks compute.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import threading
import time
from collections.abc import Callable

import torch
import torch.multiprocessing as mp

from aioffload.config import ConfigError, ParallelConfig
from aioffload.distributed.channel import CommandChannel
from aioffload.distributed.group import STORE_WAIT_S, RankEnv, TPGroup, multicast_off, open_store

log = logging.getLogger("aioffload.distributed")

Follower = Callable[[RankEnv, str, ParallelConfig], None]  # (who, device type, parallel config)
OnDeath = Callable[[int, int, int], None]  # (rank, pid, exit code)
WATCH_S = 0.2
FOLLOWER_LOG_LEVEL = logging.WARNING  # rank 0 logs the decisions; the others only their problems


def check_devices(size: int, device_type: str) -> None:
    """One-line error when this host cannot give every rank its own device."""
    if device_type == "cuda" and torch.cuda.device_count() < size:
        raise ConfigError(
            f"--tensor-parallel-size {size}: only {torch.cuda.device_count()} CUDA device(s) here, one per rank needed"
        )


def share_host_threads(local_ranks: int, device_type: str) -> None:
    """On the CPU device, the ranks of one host share its cores (unless OMP_NUM_THREADS says otherwise)."""
    if device_type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        ranks = int(os.environ.get("LOCAL_WORLD_SIZE", local_ranks))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, ranks)))


def exit_status_text(code: int) -> str:
    return f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"


def fail_fast(rank: int, pid: int, code: int) -> None:
    """The default reaction to a dead rank: say so on one line and leave now (os._exit: the other
    threads may sit in a collective that would wait for the dead rank)."""
    msg = f"error: tensor-parallel rank {rank} (pid {pid}) {exit_status_text(code)}; every rank stops"
    log.error(msg.removeprefix("error: "))
    print(msg, file=sys.stderr, flush=True)
    os._exit(1)


class Watchdog:
    """Polls the child ranks; the first that exits before `stop` gets `on_death` (the others are
    terminated first)."""

    def __init__(self, procs: list[mp.Process], on_death: OnDeath) -> None:
        self.procs, self.on_death = procs, on_death
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="aioffload-rank-watchdog", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stopped.wait(WATCH_S):
            for rank, p in enumerate(self.procs, start=1):
                if p.exitcode is not None and not self._stopped.is_set():
                    for other in self.procs:
                        if other.is_alive():
                            other.terminate()
                    self.on_death(rank, p.pid or -1, p.exitcode)
                    return

    def stop(self) -> None:
        self._stopped.set()


class Ranks:
    """The running ranks as rank 0 sees them; `close` stops the followers (and the group)."""

    def __init__(self, group: TPGroup, procs: list[mp.Process], watchdog: Watchdog | None) -> None:
        self.group, self.procs, self.watchdog = group, procs, watchdog
        self.channel = CommandChannel(group.store)

    def close(self, timeout_s: float = 10.0) -> None:
        """Tell the followers to stop, wait up to `timeout_s` for them, then terminate the rest."""
        if self.watchdog is not None:
            self.watchdog.stop()
        try:
            self.channel.post_stop()
        except Exception as e:  # the store is gone with a dead rank: terminate below
            log.warning("could not post the stop command: %s", e)
        deadline = time.monotonic() + timeout_s
        for p in self.procs:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                log.warning("rank process %s did not stop in %.0f s; terminating it", p.pid, timeout_s)
                p.terminate()
                p.join(5.0)
        self.group.close()


def _child(follower: Follower, env: RankEnv, device_type: str, parallel: ParallelConfig, level: int) -> None:
    logging.basicConfig(level=level, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s [rank {env.rank}] %(name)s: %(message)s")  # fmt: skip
    follower(env, device_type, parallel)


def spawn_ranks(parallel: ParallelConfig, device_type: str, follower: Follower,
                on_death: OnDeath = fail_fast) -> tuple[ParallelConfig, Ranks]:  # fmt: skip
    """Start ranks 1..N-1 as children of this process (rank 0) and join the group with them.
    Returns the parallel config with the rendezvous rank 0's workers join at, and the ranks."""
    size = parallel.tensor_parallel_size
    check_devices(size, device_type)
    share_host_threads(size, device_type)
    multicast_off()
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # one host: gloo over loopback (3x faster here)
    host = "127.0.0.1"
    store = open_store(host, 0, size, True, STORE_WAIT_S)  # port 0: any free one
    ctx = mp.get_context("spawn")
    procs: list[mp.Process] = []
    for rank in range(1, size):
        env = RankEnv(rank, size, rank, host, store.port)
        p = ctx.Process(target=_child, args=(follower, env, device_type, parallel, FOLLOWER_LOG_LEVEL), daemon=True,
                        name=f"aioffload-rank-{rank}")  # fmt: skip
        p.start()
        log.info("tensor-parallel rank %d started (pid %d)", rank, p.pid)
        procs.append(p)
    watchdog = Watchdog(procs, on_death)  # before joining: a child that dies starting up must not stall it
    try:
        group = TPGroup.start(RankEnv(0, size, 0, host, store.port), device_type, parallel.timeout_s, store)
    except BaseException:
        watchdog.stop()
        for p in procs:
            p.terminate()
        raise
    return dataclasses.replace(parallel, rendezvous=f"{host}:{store.port}"), Ranks(group, procs, watchdog)


def join_torchrun(env: RankEnv, parallel: ParallelConfig, device_type: str) -> tuple[ParallelConfig, Ranks]:
    """Rank 0 of a torchrun job: join the group torchrun's ranks form (its agent watches them)."""
    group = TPGroup.start(env, device_type, parallel.timeout_s)
    return dataclasses.replace(parallel, rendezvous=env.rendezvous), Ranks(group, [], None)

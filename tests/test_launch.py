"""Starting and watching ranks: torchrun's environment, NVLink multicast off before any group starts,
the command channel's order and clean-up, a collective that times out instead of hanging, and the
watchdog that reports a child rank exiting (the server's reaction, exiting, is in test_tp_cli.py)."""

from __future__ import annotations

import datetime
import json
import os
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from aioffload.config import ConfigError, ParallelConfig
from aioffload.distributed.channel import KEEP, CommandChannel
from aioffload.distributed.group import MULTICAST_OFF, RankEnv, TPGroup, multicast_off
from aioffload.distributed.launch import exit_status_text, spawn_ranks

pytestmark = pytest.mark.timeout(120)


def test_torchrun_environment_names_the_rank():
    env = RankEnv.from_environ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "node0",
                                "MASTER_PORT": "29400", "TORCHELASTIC_USE_AGENT_STORE": "True"})  # fmt: skip
    assert env == RankEnv(3, 4, 1, "node0", 29400, agent_store=True)
    assert env.rendezvous == "node0:29400"
    assert RankEnv.from_environ({"PATH": "/bin"}) is None
    with pytest.raises(ConfigError, match=r"RANK 4 is not in \[0, WORLD_SIZE 4\)"):
        RankEnv.from_environ({"RANK": "4", "WORLD_SIZE": "4"})


def test_multicast_is_forced_off():
    env = {"NCCL_NVLS_ENABLE": "1"}
    multicast_off(env)
    assert env == MULTICAST_OFF == {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}


def test_commands_arrive_in_order_and_old_keys_are_dropped():
    master = dist.TCPStore("127.0.0.1", 0, 1, True, timeout=datetime.timedelta(seconds=5), wait_for_workers=False)
    client = dist.TCPStore("127.0.0.1", master.port, 1, False, timeout=datetime.timedelta(seconds=5))
    leader, follower = CommandChannel(master), CommandChannel(client)
    for n in range(KEEP + 6):
        leader.post({"n": n})
    leader.post_stop()
    prefixed = dist.PrefixStore("aioffload/0/cmd", master)
    assert not prefixed.check(["0"]) and not prefixed.check([str(6)]) and prefixed.check([str(7)])
    follower.next = 7  # the dropped ones were taken long ago in a real run
    assert [follower.take()["n"] for _ in range(KEEP - 1)] == list(range(7, KEEP + 6))
    assert follower.take() is None


def test_a_dead_ranks_status_is_said_in_words() -> None:
    assert exit_status_text(-9) == "was killed by signal 9" and exit_status_text(3) == "exited with status 3"


def scripted_rank(env: RankEnv, device_type: str, parallel: ParallelConfig) -> None:
    """A child rank running the test's commands: report its environment, stall, exit with a status."""
    group = TPGroup.start(env, device_type, parallel.timeout_s)
    channel = CommandChannel(group.store)
    while (cmd := channel.take()) is not None:
        what, arg = cmd
        if what == "report":
            keys = (*MULTICAST_OFF, "GLOO_SOCKET_IFNAME")
            Path(arg).write_text(json.dumps({"rank": dist.get_rank(), "world": dist.get_world_size(),
                                             "env": {k: os.environ.get(k) for k in keys}}))  # fmt: skip
            group.all_reduce_(torch.ones(3))
        elif what == "hang":
            time.sleep(arg)
        elif what == "exit":
            os._exit(arg)


def test_a_stalled_rank_times_out_a_collective_and_an_exiting_one_is_reported(tmp_path: Path):
    deaths: list[tuple[int, int, int]] = []
    died = threading.Event()

    def on_death(rank: int, pid: int, code: int) -> None:
        deaths.append((rank, pid, code))
        died.set()

    parallel, ranks = spawn_ranks(ParallelConfig(2, timeout_s=2.0), "cpu", scripted_rank, on_death)
    try:
        assert parallel.rendezvous == f"127.0.0.1:{ranks.group.store.port}"
        ranks.channel.post(("report", str(tmp_path / "child.json")))
        t = torch.ones(3)
        ranks.group.all_reduce_(t)  # the child reported, then joins this sum
        assert torch.equal(t, torch.full((3,), 2.0))
        report = json.loads((tmp_path / "child.json").read_text())
        assert report == {"rank": 1, "world": 2, "env": {"NCCL_NVLS_ENABLE": "0",
                          "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "GLOO_SOCKET_IFNAME": "lo"}}  # fmt: skip
        ranks.channel.post(("hang", 4.0))
        start = time.monotonic()
        with pytest.raises(RuntimeError, match="(?i)timed? ?out"):
            ranks.group.all_reduce_(t)  # the child sleeps: the 2 s timeout ends the wait
        assert 1.5 < time.monotonic() - start < 3.9
        ranks.channel.post(("exit", 3))
        assert died.wait(20)
        assert deaths == [(1, ranks.procs[0].pid, 3)]
    finally:
        ranks.close(timeout_s=2.0)
    assert not dist.is_initialized()

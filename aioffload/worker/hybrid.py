"""Whether offloaded layers are split between host and GPU (`--hybrid auto|on|off`), and how.

Decided at start-up, before the weights load (the split needs its own host layout):
calibrate the host's MLP-share speed with the real layer shapes, build the cost model
(offload/split_cost.py) and, in `auto`, keep the split only when it pays at some batch size
on a CUDA device. Every decision and the chosen split per batch size go to the log.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

import torch

from aioffload.config import ModelConfig, OffloadConfig
from aioffload.distributed.group import TPGroup
from aioffload.model.layout import LayerLayout, layer_layout
from aioffload.offload.calibrate import calibrate_host, default_host_threads
from aioffload.offload.split_cost import (
    SplitChooser,
    SplitCostModel,
    format_table,
    hybrid_off_reason,
    plan_down_copies,
)
from aioffload.offload.split_layout import SplitLayout, split_layout
from aioffload.offload.split_mlp import HostCompute

log = logging.getLogger("aioffload.worker")

LOG_BATCHES = (1, 8, 64, 256)


@dataclass
class HybridPlan:
    split: SplitLayout
    cost: SplitCostModel
    chooser: SplitChooser
    host: HostCompute
    last_share: float = 0.0  # host share of the last step (0..1), for stats

    def before_step(self, tokens: int) -> int:
        """The host share (chunks) for a step of `tokens` tokens."""
        k = self.chooser(tokens)
        self.last_share = k / self.split.num_chunks
        return k

    def after_step(self) -> None:
        """Raise a failed host share; feed the measured host times back into the chooser."""
        self.host.check()
        obs = self.host.observed
        self.chooser.observe_step([obs.popleft() for _ in range(len(obs))])

    def discard_step(self) -> None:
        """after_step for a warm-up step: failures raise, its (cold) host times are not learnt from."""
        self.host.check()
        self.host.observed.clear()


def plan_hybrid(
    offload: OffloadConfig,
    mcfg: ModelConfig,
    layout: LayerLayout,
    num_offloaded: int,
    dtype: torch.dtype,
    device: torch.device,
    h2d_bytes_per_s: float,
    follower: bool = False,
) -> HybridPlan | None:
    """The split to run with, or None (every offloaded layer streams whole); logs why. A `follower`
    (a tensor-parallel rank other than 0) runs the shares rank 0 chooses: its down copies hold every chunk."""
    if not num_offloaded:
        return None
    reason = hybrid_off_reason(offload.hybrid, mcfg.is_moe, device.type == "cuda")
    if reason is not None:
        log.info("hybrid: off (%s)", reason)
        return None
    split = split_layout(layout, mcfg.hidden_size, mcfg.intermediate_size)
    threads = offload.host_threads or default_host_threads()
    t = time.perf_counter()
    rates = calibrate_host(split, dtype, threads, device=device)
    elem = torch.empty((), dtype=dtype).element_size()
    cost = SplitCostModel.for_layout(split, elem, h2d_bytes_per_s, rates, gpu_is_host=device.type != "cuda")
    # The host reads its share's down projection from a copy of its own (split_mlp.host_down_columns):
    # every chunk that fits in half the host memory left once the offloaded layers are pinned, so the
    # chooser can grow a share the calibration underrated (split_cost.host_copy_chunks).
    copies = plan_down_copies(split, elem, num_offloaded, follower)
    cap = copies.chunks
    table = format_table(dataclasses.replace(cost, max_host_chunks=cap or None), LOG_BATCHES, num_offloaded)
    log.info("hybrid: host calibrated in %.1f s\n%s", time.perf_counter() - t, table)
    if cap == 0:
        log.info("hybrid: off (no host memory for the host's down copies: %.1f GB available)",
                 (copies.available_bytes or 0) / 1e9)  # fmt: skip
        return None
    cost = dataclasses.replace(cost, max_host_chunks=cap)
    chooser = SplitChooser(cost)
    if offload.hybrid == "auto" and not chooser.pays:
        log.info("hybrid: off (auto: the host is slower than streaming at every batch size)")
        return None
    why = "every chunk" if cap == split.num_chunks else "all that fit in half the host memory left"
    log.info("hybrid: host shares of at most %d of %d chunks (%s; the largest chosen now is %d): the host's down "
             "copies take %.2f GB of host memory", cap, split.num_chunks, why, chooser.largest_share,
             copies.nbytes / 1e9)  # fmt: skip
    log.info("hybrid: on (%s): the host computes a share of each of the %d offloaded layers' MLP, chosen per step",
             offload.hybrid, num_offloaded)  # fmt: skip
    host = HostCompute(rates.max_tokens, mcfg.hidden_size, dtype, device, threads, max_in_flight=num_offloaded,
                       max_chunks=cap)  # fmt: skip
    log.info("hybrid: the GPU waits for host shares %s", "on a word in mapped memory (cuStreamWaitValue32)"
             if host.asynchronous else "through the step thread (no stream wait available)")  # fmt: skip
    return HybridPlan(split, cost, chooser, host)


def plan_hybrid_ranks(
    offload: OffloadConfig,
    mcfg: ModelConfig,
    num_offloaded: int,
    dtype: torch.dtype,
    device: torch.device,
    h2d_bytes_per_s: float,
    group: TPGroup | None,
) -> HybridPlan | None:
    """plan_hybrid for this rank's model `mcfg` (its share under tensor parallelism). With a group,
    rank 0 decides for every rank, since it chooses each step's host share; the others then
    calibrate their own host, each with its share of the host's cores."""

    def plan(o: OffloadConfig, follower: bool = False) -> HybridPlan | None:
        return plan_hybrid(o, mcfg, layer_layout(mcfg), num_offloaded, dtype, device, h2d_bytes_per_s, follower)

    if group is None:
        return plan(offload)
    if offload.host_threads is None:
        offload = dataclasses.replace(offload, host_threads=max(1, default_host_threads() // group.size))
    mine = plan(offload) if group.leader else None
    on = group.leader_flag(mine is not None)
    if group.leader or not on:
        return mine
    return plan(dataclasses.replace(offload, hybrid="on"), follower=True)

"""The worker's idle budget (worker.idle_token_budget): how many tokens a step with nobody decoding
may take, so a lone long prompt runs in one step. Raised only on a CUDA worker with every weight
resident, on one rank, with its KV cache sized from measured activations, and only where the
longer step's activations take at most a tenth of what the KV cache would get."""

from __future__ import annotations

import pytest
import torch

from aioffload.checkpoint.checkpoint import Checkpoint
from aioffload.config import CacheConfig, EngineConfig, SchedulerConfig
from aioffload.worker.worker import IDLE_ACTIVATION_SHARE, Worker
from tests.tiny_models import make_checkpoint

GB = 1e9


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Worker:
    path = make_checkpoint(tmp_path_factory.mktemp("idle"), "llama", seed=2, layers=2)
    cfg = EngineConfig(
        model=str(path), dtype="float32", device="cpu", cache=CacheConfig(num_blocks=64, block_size=16),
        scheduler=SchedulerConfig(max_model_len=512, max_num_batched_tokens=64, max_prefill_tokens=32768),
    ).validate()  # fmt: skip
    return Worker(cfg, Checkpoint.open(str(path)))


def test_a_cpu_worker_keeps_its_token_budget_with_nobody_decoding(worker: Worker) -> None:
    assert worker.token_budget == 64 and worker.idle_token_budget == 64
    assert worker._idle_budget_refused(fixed_blocks=True) == "CPU device"
    assert worker._idle_budget_wanted(fixed_blocks=True) is None


def test_only_a_resident_single_rank_worker_with_a_measured_cache_asks_for_it(
    worker: Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(worker, "device", torch.device("cuda"))  # the decision only: no tensor is made
    assert worker._idle_budget_wanted(fixed_blocks=False) == 512  # capped at max_model_len
    assert worker._idle_budget_refused(fixed_blocks=False) is None
    assert "--num-kv-blocks" in str(worker._idle_budget_refused(fixed_blocks=True))
    assert worker._idle_budget_wanted(fixed_blocks=True) is None
    monkeypatch.setattr(worker, "offload_active", True)
    assert "offload is active" in str(worker._idle_budget_refused(fixed_blocks=False))
    monkeypatch.setattr(worker, "offload_active", False)
    monkeypatch.setattr(worker, "tp", object())
    assert worker._idle_budget_refused(fixed_blocks=False) == "tensor parallel"
    monkeypatch.setattr(worker, "tp", None)
    monkeypatch.setattr(worker, "token_budget", 512)
    assert worker._idle_budget_wanted(fixed_blocks=False) is None  # nothing to raise


@pytest.mark.parametrize(("usable_gb", "raised"), [(100.0, True), (40.0, True), (39.0, False), (12.0, False)])
def test_the_longer_step_is_taken_only_where_its_activations_fit_a_tenth_of_the_kv_memory(
    worker: Worker, monkeypatch: pytest.MonkeyPatch, usable_gb: float, raised: bool
) -> None:
    peaks = {64: 10 * GB, 512: 13 * GB}  # the idle step needs 3 GB more
    monkeypatch.setattr(worker, "_profile_peak_bytes", lambda tokens: peaks[tokens])
    monkeypatch.setattr(worker, "idle_token_budget", 64)
    peak = worker._take_idle_budget(512, peaks[64], usable_gb * GB)
    # 3 GB against a tenth of (usable - 10 GB): fits from 40 GB up
    assert IDLE_ACTIVATION_SHARE == 0.1
    assert (worker.idle_token_budget, peak) == ((512, 13 * GB) if raised else (64, 10 * GB))

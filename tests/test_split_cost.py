"""The split chooser on fake rates: balanced shares, no host share where the host is slower than
streaming, and the calibration's fit on a synthetic timer."""

from __future__ import annotations

import dataclasses
import math

import pytest

from aioffload.offload.split_cost import (
    HostRates,
    SplitChooser,
    SplitCostModel,
    down_copy_budget,
    format_table,
    host_copy_chunks,
)

C = 112  # Llama-3-8B: 14336 / 128
CHUNK_BYTES = 3 * 128 * 4096 * 2  # 3.1 MB
LAYER_BYTES = C * CHUNK_BYTES + (84 << 20)  # + attention


def model(per_chunk_ms: dict[int, float], fixed_ms: float = 0.0, sync_ms: float = 0.0, h2d: float = 55e9,
          gpu_is_host: bool = False) -> SplitCostModel:  # fmt: skip
    b = tuple(sorted(per_chunk_ms))
    rates = HostRates(b, tuple(per_chunk_ms[x] / 1e3 for x in b), tuple(fixed_ms / 1e3 for _ in b), threads=15)
    return SplitCostModel(num_chunks=C, chunk_bytes=CHUNK_BYTES, chunk_params=CHUNK_BYTES // 2,
                          layer_bytes=LAYER_BYTES, layer_params=LAYER_BYTES // 2, h2d_bytes_per_s=h2d, host=rates,
                          sync_s=sync_ms / 1e3, gpu_is_host=gpu_is_host)  # fmt: skip


def test_balanced_split_equalises_copy_and_host_time() -> None:
    # Host moves a chunk as fast as the link: the copy of the rest and the host share meet near the middle,
    # slightly past it because the attention weights always stream.
    per = CHUNK_BYTES / 55e9 * 1e3
    m = model({1: per, 64: 10 * per})
    k = m.best_k(1)
    copy = (LAYER_BYTES - k * CHUNK_BYTES) / 55e9
    host = m.host.seconds(1, k)
    assert C // 2 < k < C
    assert abs(copy - host) <= CHUNK_BYTES / 55e9 + 1e-12  # within one chunk of equal
    assert m.layer_s(1, k) < 0.6 * m.layer_s(1, 0)


def test_no_host_share_where_the_host_is_slower_than_streaming_the_whole_layer() -> None:
    per1 = CHUNK_BYTES / 55e9 * 1e3 / 2  # twice the link's speed at batch 1
    m = model({1: per1, 256: 1000 * per1}, fixed_ms=0.05, sync_ms=0.25)
    assert m.best_k(1) > C // 2
    assert m.best_k(256) == 0  # the host would take longer than the whole copy: stream it all
    assert m.best_k(257) == 0  # beyond the calibrated batches: no share offered
    assert math.isinf(m.host.seconds(257, 1))


def test_sync_overhead_can_make_splitting_not_pay() -> None:
    per = CHUNK_BYTES / 55e9 * 1e3
    copy_ms = LAYER_BYTES / 55e9 * 1e3
    m = model({1: per}, sync_ms=copy_ms * 1.01)  # waiting for the host costs more than the whole copy
    assert m.best_k(1) == 0
    assert not SplitChooser(m).pays


def test_interpolates_between_calibrated_batches() -> None:
    m = model({8: 0.02, 16: 0.04})
    assert m.host.seconds(12, 10) == pytest.approx(10 * 0.03e-3)
    assert m.host.seconds(1, 10) == pytest.approx(10 * 0.02e-3)  # below the first: the first's rate


def test_cpu_device_balances_host_against_host() -> None:
    m = model({1: 0.01, 4: 0.01}, h2d=1e15, gpu_is_host=True)
    assert m.best_k(1) in (C // 2, C // 2 + 1)


def test_chooser_table_and_format() -> None:
    per = CHUNK_BYTES / 55e9 * 1e3
    m = model({1: per, 8: 1.3 * per, 64: 3 * per, 256: 30 * per}, sync_ms=0.25)
    ch = SplitChooser(m)
    assert ch(1) == m.best_k(1) and ch(300) == 0 and ch.pays
    ks = [ch(t) for t in (1, 8, 64, 256)]
    assert ks == sorted(ks, reverse=True)  # bigger batches, smaller host share
    text = format_table(m, (1, 8, 64, 256), 24)
    assert "batch    1:" in text and "batch  256:" in text and "x the copy floor" in text
    rows = m.table((1, 256))
    assert rows[0]["layer_ms"] < rows[0]["stream_ms"] and rows[1]["host_chunks"] == ch(256)


def test_host_share_never_passes_the_cap_of_its_down_copies() -> None:
    per1 = CHUNK_BYTES / 55e9 * 1e3 / 2  # the host twice the link's speed: it wants most of the layer
    free = model({1: per1, 256: 1000 * per1})
    capped = dataclasses.replace(free, max_host_chunks=40)
    assert free.best_k(1) > 40
    assert capped.best_k(1) == 40  # the best share the copies allow
    assert capped.best_k(256) == free.best_k(256) == 0
    ch = SplitChooser(capped)
    assert ch.largest_share == 40
    ch.factor[1] = 0.1  # the host measured ten times faster than calibrated: still no more than the cap
    ch.rechoose(1)
    assert ch(1) == 40


def test_host_down_copies_hold_every_chunk_the_memory_budget_allows() -> None:
    assert host_copy_chunks(C, 1 << 20, None) == C  # no budget (a tensor-parallel follower): every chunk
    assert host_copy_chunks(C, 1 << 20, 10 * C << 20) == C  # never more than the layer has
    assert host_copy_chunks(C, 1 << 20, (30 << 20) + 5) == 30  # only 30 chunks' copies fit
    assert host_copy_chunks(C, 1 << 20, 0) == 0


def test_the_down_copy_budget_is_half_the_memory_left_beside_the_pinned_layers() -> None:
    assert down_copy_budget(100 << 30, 60 << 30) == 20 << 30
    assert down_copy_budget(50 << 30, 60 << 30) == 0  # the pinned layers alone do not fit
    assert down_copy_budget(None, 60 << 30) is None


def test_the_host_memory_available_is_read_from_meminfo() -> None:
    from aioffload.offload.split_cost import host_memory_available

    n = host_memory_available()
    with open("/proc/meminfo") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    assert n is not None and abs(n - kb * 1024) < 1 << 30  # read moments apart


def test_aioffload_plan_prints_the_split_and_the_host_down_copies(tmp_path, capsys) -> None:
    import re

    from aioffload.bench.synthetic import make_synthetic_checkpoint
    from aioffload.cli import main

    path = make_synthetic_checkpoint(tmp_path / "d", "tiny", device="cpu")  # bf16, 4 layers
    rc = main(["plan", "--model", str(path), "--dtype", "bfloat16", "--gpu-memory-gb", "80", "--cpu-offload-gb",
               "0.0001", "--hybrid", "on", "--host-threads", "1"])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0
    assert "host cores of this machine calibrated" in out
    m = re.search(r"host down copies: shares of at most (\d+) of (\d+) chunks, ([0-9.]+) GB", out)
    assert m is not None, out
    cap, chunks = int(m.group(1)), int(m.group(2))
    assert cap == chunks  # this machine's memory holds the tiny model's copies of every chunk


def test_plan_down_copies_takes_every_chunk_within_the_budget_of_this_host(monkeypatch) -> None:
    from aioffload.model.layout import layer_layout
    from aioffload.offload import split_cost
    from aioffload.offload.split_layout import split_layout
    from tests.test_split_layout import cfg as split_cfg

    cfg = split_cfg(512)  # 4 chunks of 128
    split = split_layout(layer_layout(cfg), cfg.hidden_size, cfg.intermediate_size)
    per_chunk, pinned = 3 * 128 * cfg.hidden_size * 2, 3 * split.numel * 2  # 3 layers, bf16
    monkeypatch.setattr(split_cost, "host_memory_available", lambda: pinned + 2 * 3 * per_chunk)
    c = split_cost.plan_down_copies(split, 2, 3)
    assert (c.chunks, c.bytes_per_chunk, c.nbytes) == (3, per_chunk, 3 * per_chunk)  # half the rest holds 3
    assert split_cost.plan_down_copies(split, 2, 3, follower=True).chunks == 4  # no budget on a follower
    monkeypatch.setattr(split_cost, "host_memory_available", lambda: None)
    assert split_cost.plan_down_copies(split, 2, 3).chunks == 4  # unknown memory: every chunk

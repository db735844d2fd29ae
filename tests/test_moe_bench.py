"""The MoE synthetic checkpoints and `aioffload bench offload` on an MoE shape, on the CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from aioffload.bench.synthetic import BENCH_LAYERS, SHAPES, hf_config, make_synthetic_checkpoint
from aioffload.checkpoint.checkpoint import Checkpoint
from aioffload.cli import main
from aioffload.config import ModelConfig
from tests.helpers import one_torch_thread
from tests.test_model import PROMPTS, hf_model, run_ours


@pytest.fixture(autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


def test_qwen3_30b_shape_is_61_gb_and_benchmarks_write_12_layers() -> None:
    cfg = ModelConfig.from_hf(hf_config("qwen3-30b-a3b"))
    assert (cfg.num_layers, cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size) == (48, 128, 8, 768)
    assert cfg.hidden_size == 2048 and cfg.norm_topk_prob and cfg.qk_norm and cfg.moe_layers == tuple(range(48))
    assert BENCH_LAYERS["qwen3-30b-a3b"] == 12 and SHAPES["qwen3-30b-a3b"]["num_hidden_layers"] == 48
    assert hf_config("qwen3-30b-a3b", num_layers=12)["num_hidden_layers"] == 12


def test_synthetic_moe_checkpoint_is_what_transformers_reads(tmp_path: Path) -> None:
    path = make_synthetic_checkpoint(tmp_path / "m", "tiny-moe", dtype=torch.float32, device="cpu", num_layers=2)
    ckpt = Checkpoint.open(path)  # every per-expert tensor present with its shape
    assert ckpt.model_config.num_layers == 2 and ckpt.model_config.num_experts == 8
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in ckpt.entries
    hf = hf_model(path)
    pre, dec, gen = run_ours(path, PROMPTS[:2], decode_steps=2)
    with torch.no_grad():
        for i, p in enumerate(PROMPTS[:2]):
            ref = hf(torch.tensor([p + gen[i]])).logits[0].float()
            assert (pre[i] - ref[len(p) - 1]).abs().max().item() < 1e-4
            assert (dec[-1][i] - ref[-1]).abs().max().item() < 1e-4


def test_bench_offload_on_an_moe_shape(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    rc = main([
        "bench", "offload", "--synthetic", "tiny-moe", "--synthetic-dir", str(tmp_path / "synth"), "--device", "cpu",
        "--gpu-memory-gb", "1", "--trigger", "0.001", "--num-kv-blocks", "64", "--batch-sizes", "1,4",
        "--context-len", "8", "--steps", "2", "--warmup", "1", "--check-prompts", "2", "--check-tokens", "4",
    ])  # fmt: skip
    data = json.loads((tmp_path / "out" / "offload-moe.json").read_text())
    assert rc == 0, data["errors"]
    eb = data["expert_mb"] * 1e6
    full = data["plan_full"]
    assert data["layers_written"] == data["layers_full"] == 4 and full["offloaded_experts"] > 0
    assert data["plan_written"]["offloaded_experts"] == full["offloaded_experts"]  # nothing to scale
    assert data["stream"]["offloaded_experts"] == full["offloaded_experts"]
    for key in ("uniform", "skewed"):
        rows = data[key]
        assert [r["batch"] for r in rows] == [1, 4]
        for r in rows:
            assert r["routed_layers"] + r["full_layers"] == data["stream"]["streamed_layers"]
            copy_all_ms = data["stream"]["copy_all_bytes"] / 1e6 / data["h2d_GBps"]
            assert r["copy_floor_ms"] == pytest.approx(copy_all_ms, rel=1e-2)
            assert r["routed_mb"] * 1e6 <= full["offloaded_experts"] * eb * 1.001
            assert r["x_copy_floor"] == pytest.approx(r["step_ms"] / r["copy_floor_ms"], rel=1e-2)
    assert data["greedy"]["identical"] is True
    assert [(d["tokens"], d["grouped_mm_ms"] > 0, d["loop_ms"] > 0) for d in data["expert_gemm"]] == [
        (1, True, True),
        (4, True, True),
    ]
    assert data["resident_b1_ms"] > 0

"""`aioffload bench prefill` on the CPU with the tiny synthetic shape: every non-CUDA phase
(resident and offloaded TTFT, decode, ITL under a prefill through the Engine, transformers),
the JSON it writes, and its floor arithmetic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from aioffload.bench.prefill import compute_floor_s, long_context_view
from aioffload.bench.synthetic import make_synthetic_checkpoint
from aioffload.checkpoint.checkpoint import Checkpoint
from aioffload.cli import main
from aioffload.config import ModelConfig
from aioffload.model.layout import layer_layout


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    make_synthetic_checkpoint(root / "tiny", "tiny")
    return root


def test_prefill_bench_on_the_cpu(synth_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OUT", str(tmp_path))
    torch.set_num_threads(1)
    rc = main(["bench", "prefill", "--synthetic", "tiny", "--synthetic-dir", str(synth_dir), "--device", "cpu",
               "--num-kv-blocks", "64", "--prompt-lens", "12,24", "--decode-contexts", "10,30", "--decode-steps", "2",
               "--itl-streams", "2", "--itl-prompt-len", "20", "--itl-tokens", "3", "--gpu-memory-gb", "1",
               "--resident-layers", "2", "--offload-prefetch", "1"])  # fmt: skip
    data = json.loads((tmp_path / "prefill.json").read_text())
    assert rc == 0 and data["errors"] == {}
    assert "kernels" not in data  # the attention kernels are a GPU phase
    assert data["rates"]["dense_flops"] > 0 and data["rates"]["h2d_GBps"] is None
    hf = {e["tokens"]: e["ms"] for e in data["hf"]["ttft"]}
    assert set(hf) == {12, 24} and data["hf"]["attn"] == "sdpa"
    res, off = data["resident"], data["offloaded"]
    assert res["offloaded_layers"] == 0 and off["offloaded_layers"] == 2 and off["copy_floor_ms"] > 0
    for e in res["ttft"]:
        assert e["ms"] > 0 and e["steps"] == 1 and e["hf_ms"] == hf[e["tokens"]]
        assert e["x_hf"] == pytest.approx(e["ms"] / e["hf_ms"], rel=1e-2, abs=1e-3)
        assert e["x_compute_floor"] == pytest.approx(e["ms"] / e["compute_floor_ms"], rel=1e-2, abs=1e-3)
    assert [e["tokens"] for e in off["ttft"]] == [12, 24] and all(e["copy_floors"] > 0 for e in off["ttft"])
    for W in (res, off):
        assert [e["context"] for e in W["decode"]] == [10, 30]
        assert all(e["step_ms"] > 0 and e["floor_ms"] > 0 for e in W["decode"])
        itl = W["itl"]
        assert W["itl_cold"]["streams"] == 2 and W["itl_cold"]["gaps_during"] >= 1  # the untimed-shape round
        assert itl["streams"] == 2 and itl["ttft_ms"] > 0 and itl["gaps_during"] >= 1 and itl["gaps_alone"] >= 2
        assert itl["p99_ratio"] == pytest.approx(itl["during_ms"]["p99"] / itl["alone_ms"]["p99"], rel=1e-2, abs=1e-3)


def test_long_context_view_raises_the_position_limit_only(synth_dir: Path) -> None:
    src = str(synth_dir / "tiny")
    assert long_context_view(src, 2048) == src  # the tiny shape already allows 2048
    view = Path(long_context_view(src, 40000))
    assert view != Path(src) and json.loads((view / "config.json").read_text())["max_position_embeddings"] == 40000
    assert (view / "model.safetensors.index.json").is_symlink()
    a, b = Checkpoint.open(src), Checkpoint.open(view)
    assert b.model_config.max_position_embeddings == 40000
    assert a.model_config.hidden_size == b.model_config.hidden_size and a.model_config.num_layers == 4
    assert long_context_view(src, 40000) == str(view)  # reused


def test_compute_floor_counts_layers_and_causal_attention() -> None:
    # Llama-3-8B: 218.1M parameters per layer (norm weights included); 8000 tokens at 650 TFLOP/s
    cfg = ModelConfig("LlamaForCausalLM", 128256, 4096, 14336, 32, 32, 8, 128, 1e-5, 5e5, 8192, False, False, False,
                      "bfloat16")  # fmt: skip
    params = layer_layout(cfg).numel
    assert 218_100_000 < params < 218_130_000
    dense = 2 * 32 * params * 8000
    attention = 4 * 32 * 32 * 128 * 8000 * 8001 / 2  # QK^T and PV over 8000 x 8001 / 2 visible pairs
    floor = compute_floor_s(cfg, 8000, 650e12)
    assert floor == pytest.approx((dense + attention) / 650e12)
    assert 0.19 < floor < 0.2  # ~172 ms of matmuls + ~26 ms of attention

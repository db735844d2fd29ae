"""Benchmarks on the CPU with the tiny synthetic shape: every non-CUDA code path of
`aioffload bench latency | throughput | offload`, and the JSON each writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from aioffload.bench import common
from aioffload.bench.offload import trigger_for
from aioffload.bench.synthetic import MARKER, hf_config, make_synthetic_checkpoint
from aioffload.checkpoint.checkpoint import Checkpoint
from aioffload.checkpoint.safetensors_io import read_tensor
from aioffload.checkpoint.tokenizer import Tokenizer
from aioffload.cli import main
from aioffload.config import CacheConfig, ModelConfig, OffloadConfig, SchedulerConfig
from aioffload.offload.placement import plan_placement

# Small KV pool and context: the CPU attention path and the block pool stay cheap.
SMALL = ["--device", "cpu", "--max-model-len", "64", "--num-kv-blocks", "64"]


@pytest.fixture(autouse=True)
def one_thread():
    # On a busy 2-core machine, OpenMP teams in the main thread spin against each other.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    make_synthetic_checkpoint(root / "tiny", "tiny")
    return root


def _bench(kind: str, synth_dir: Path, out: Path, monkeypatch: pytest.MonkeyPatch, *extra: str) -> dict:
    monkeypatch.setenv("OUT", str(out))
    rc = main(["bench", kind, "--synthetic", "tiny", "--synthetic-dir", str(synth_dir), *SMALL, *extra])
    data = json.loads((out / f"{kind}.json").read_text())
    assert rc == 0, data.get("errors")
    return data


def test_synthetic_checkpoint_loads_and_is_reused(synth_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = synth_dir / "tiny"
    ckpt = Checkpoint.open(path)
    assert ckpt.model_config.num_layers == 4 and ckpt.model_config.vocab_size == 512
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(index) == 2 + 1 + 4 * 9  # embed, norm, lm_head, 9 tensors per layer
    tok = Tokenizer.from_dir(path)
    assert tok.encode("t5 t7 t511") == [5, 7, 511]
    assert tok.decode([1, 2, 300]) == "t1 t2 t300"
    stamp = (path / MARKER).stat().st_mtime_ns
    make_synthetic_checkpoint(path, "tiny")
    assert "reusing" in capsys.readouterr().out
    assert (path / MARKER).stat().st_mtime_ns == stamp
    # Another seed in our folder rewrites it; a foreign non-empty folder is never touched.
    other = make_synthetic_checkpoint(synth_dir / "tiny-other", "tiny", seed=1)
    first = read_tensor(Checkpoint.open(other).entries["lm_head.weight"])
    make_synthetic_checkpoint(other, "tiny", seed=2)
    assert not torch.equal(first, read_tensor(Checkpoint.open(other).entries["lm_head.weight"]))
    foreign = synth_dir / "foreign"
    foreign.mkdir()
    (foreign / "model-00001-of-00001.safetensors").write_text("mine")
    with pytest.raises(ValueError, match="refusing"):
        make_synthetic_checkpoint(foreign, "tiny")
    assert (foreign / "model-00001-of-00001.safetensors").read_text() == "mine"


def test_stats_and_table(capsys: pytest.CaptureFixture[str]) -> None:
    s = common.summarize([0.004, 0.001, 0.002, 0.003], scale=1e3)
    assert s == {"avg": 2.5, "p10": 1.3, "p50": 2.5, "p90": 3.7, "p99": 3.97}
    common.print_table([["name", "ms"], ["decode", 1.5], ["x", None], ["ok", True]])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["name", "ms"] and lines[2].split() == ["decode", "1.5"]
    assert lines[4].split() == ["ok", "yes"]
    assert len({len(line) for line in lines[:3]}) == 1  # aligned


def test_trigger_for_reproduces_placement() -> None:
    mcfg = ModelConfig.from_hf(hf_config("llama3-8b"))
    trigger, r = trigger_for(mcfg, 2, 24e9, 2, False, resident_gb=6.0)
    assert r == 8  # embed + lm_head (2.1 GB) + 8 layers (3.5 GB) <= 6 GB
    p = plan_placement(mcfg, 2, OffloadConfig(trigger=trigger), CacheConfig(), SchedulerConfig(max_num_seqs=256),
                       4096, int(24e9), 55e9)  # fmt: skip
    assert len(p.resident_layers) == 8 and len(p.offloaded_layers) == 24
    assert 5.5e9 < p.gpu_weight_bytes < 6e9 and 10e9 < p.host_weight_bytes < 11e9
    tiny = ModelConfig.from_hf(hf_config("tiny"))
    with pytest.raises(ValueError, match="no trigger stops at 2"):
        trigger_for(tiny, 4, 1e9, 2, False, 0.0, resident_layers=2)  # the 2-slot ring costs what 2 layers do


def test_latency_bench(synth_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = _bench("latency", synth_dir, tmp_path, monkeypatch, "--batch-sizes", "1,3", "--input-len", "5",
                  "--output-len", "4", "--num-iters", "2", "--num-iters-warmup", "0", "--check-graphs",
                  "--check-tokens", "3")  # fmt: skip
    assert [r["batch"] for r in data["runs"]] == [1, 3]
    for r in data["runs"]:
        assert r["step_ms"]["p50"] > 0 and r["step_ms"]["p10"] <= r["step_ms"]["p50"] <= r["step_ms"]["p99"]
        assert r["request_s"]["avg"] > 0 and r["floor_ms"] > 0 and r["step_over_floor"] > 0
        assert r["weight_bytes_read"] > 0 and r["kv_bytes_read"] > 0
        assert r["copy_floor_ms"] == 0 and r["floor_ms"] == r["hbm_floor_ms"]  # nothing offloaded
    assert data["d2d_GBps"] > 0 and data["graphs"] is False
    assert data["check_graphs"]["identical"] is True and data["check_graphs"]["tokens"] == 12


def test_throughput_bench(synth_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = _bench("throughput", synth_dir, tmp_path, monkeypatch, "--num-prompts", "5", "--input-len", "6",
                  "--output-len", "3")  # fmt: skip
    assert data["all_full_length"] is True and data["output_tokens"] == 15 and data["prompt_tokens"] == 30
    assert data["elapsed_s"] > 0 and data["requests_per_s"] > 0 and data["output_tok_s"] > 0
    assert data["total_tok_s"] > data["output_tok_s"]


def test_offload_bench(synth_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = _bench("offload", synth_dir, tmp_path, monkeypatch, "--gpu-memory-gb", "1", "--resident-layers", "2",
                  "--offload-prefetch", "1", "--batch-sizes", "1,3", "--context-len", "6", "--steps", "2",
                  "--warmup", "1", "--num-prompts", "4", "--input-len", "5", "--output-len", "3",
                  "--check-prompts", "2", "--check-tokens", "4", "--resident-steps", "2")  # fmt: skip
    assert data["errors"] == {}
    assert data["plan"]["resident_layers"] == 2 and data["plan"]["offloaded_layers"] == 2
    assert data["plan"]["trigger"] == pytest.approx(data["derived"]["trigger"])
    assert data["h2d_measured"] is False and data["copy_floor_ms"] > 0
    assert [d["batch"] for d in data["decode"]] == [1, 3]
    assert all(d["step_ms"] > 0 and d["ratio"] > 0 and d["floor_ms"] > 0 for d in data["decode"])
    e = data["engine"]
    assert e["all_full_length"] is True and e["output_tokens"] == 12 and e["ratio_to_target"] > 0
    g = data["greedy"]
    assert g["identical"] is True and g["mismatched_tokens"] == 0 and len(g["offload"]) == 2
    f = data["fit_vs_trigger1"]
    assert f["trigger_1_offloaded_layers"] == 0 and f["trigger_fit_offloaded_layers"] == 0
    assert f["trigger_1_step_ms"] > 0 and f["trigger_fit_step_ms"] > 0 and f["ratio"] > 0
    assert "no CUDA device" in data["accelerate"]["skipped"]
    assert data["hybrid"] == {"mode": "auto", "on": False, "decode": []}  # auto: no split on the CPU device


def test_offload_bench_hybrid_phase(synth_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = _bench("offload", synth_dir, tmp_path, monkeypatch, "--gpu-memory-gb", "1", "--resident-layers", "2",
                  "--offload-prefetch", "1", "--batch-sizes", "1,3", "--context-len", "6", "--steps", "2",
                  "--warmup", "1", "--check-prompts", "2", "--check-tokens", "6", "--hybrid", "on",
                  "--host-threads", "1", "--skip-engine", "--skip-resident", "--skip-accelerate")  # fmt: skip
    assert data["errors"] == {}
    h = data["hybrid"]
    assert h["on"] is True and h["mode"] == "on" and h["threads"] == 1 and h["num_chunks"] >= 1
    assert [d["batch"] for d in h["decode"]] == [1, 3]
    for d in h["decode"]:
        assert d["step_ms"] > 0 and d["ratio_to_off"] > 0 and d["ratio_to_floor"] > 0
        assert d["predicted_split_ms"] > 0 and d["host_only_floor_ms"] > 0 and 0 <= d["host_share"] <= 1
    assert h["greedy"]["identical"] is True and h["greedy"]["tokens"] == 6
    assert "engine" not in data and "trigger_1_step_ms" not in data["fit_vs_trigger1"]
    # The hybrid worker came first in the process, and each worker's peak RSS is its own.
    assert data["hybrid_order"] == "first"
    phases = list(data["phase_s"])
    assert phases.index("hybrid_worker") < phases.index("offload_worker")
    m = h["host_memory"]
    assert m["down_copies_bytes"] > 0 and h["max_host_chunks"] == h["num_chunks"]  # every chunk fits here
    assert m["rss_limit_gb"] == pytest.approx(1.1 * m["offloaded_gb"] + m["down_copies_gb"] + 2, abs=2e-3)
    assert 0 < m["peak_rss_gb"] < m["rss_limit_gb"] and 0 < data["host_memory"]["peak_rss_gb"]


def test_offload_bench_hybrid_order_last(synth_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = _bench("offload", synth_dir, tmp_path, monkeypatch, "--gpu-memory-gb", "1", "--resident-layers", "2",
                  "--offload-prefetch", "1", "--batch-sizes", "1", "--context-len", "6", "--steps", "1",
                  "--warmup", "0", "--check-prompts", "2", "--check-tokens", "4", "--hybrid", "on",
                  "--host-threads", "1", "--hybrid-order", "last", "--skip-engine", "--skip-resident",
                  "--skip-accelerate")  # fmt: skip
    assert data["errors"] == {} and data["hybrid_order"] == "last"
    phases = list(data["phase_s"])
    assert phases.index("offload_worker") < phases.index("hybrid_worker")
    h = data["hybrid"]
    assert h["decode"][0]["ratio_to_off"] > 0 and h["greedy"]["identical"] is True


def test_offload_bench_records_a_failed_phase_and_goes_on(
    synth_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OUT", str(tmp_path))
    # With a 2-slot ring no trigger keeps exactly 2 of 4 layers: the offloaded phases fail, the rest runs.
    rc = main(["bench", "offload", "--synthetic", "tiny", "--synthetic-dir", str(synth_dir), *SMALL,
               "--gpu-memory-gb", "1", "--resident-layers", "2", "--context-len", "4", "--steps", "1",
               "--warmup", "0", "--resident-steps", "1"])  # fmt: skip
    data = json.loads((tmp_path / "offload.json").read_text())
    assert rc == 1
    assert set(data["errors"]) == {"derive_trigger", "offload_worker"}
    assert "no trigger stops at 2" in data["errors"]["derive_trigger"]
    assert "greedy" not in data and "decode" not in data
    assert data["fit_vs_trigger1"]["trigger_1_step_ms"] > 0 and data["fit_vs_trigger1"]["ratio"] > 0


def test_speculative_bench(synth_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OUT", str(tmp_path))
    rc = main(["bench", "speculative", "--synthetic", "tiny", "--synthetic-dir", str(synth_dir), "--device", "cpu",
               "--max-model-len", "512", "--num-kv-blocks", "256", "--gpu-memory-gb", "1", "--resident-layers", "2",
               "--offload-prefetch", "1", "--batch-sizes", "1,2", "--extra-rows", "0,3", "--steps", "2",
               "--warmup", "1", "--agree-k", "3", "--num-prompts", "2", "--output-len", "8"])  # fmt: skip
    data = json.loads((tmp_path / "speculative.json").read_text())
    assert rc == 0, data["errors"]
    assert data["plan"]["offloaded_layers"] == 2 and data["floor_ms"] > 0
    assert [(v["batch"], v["extra_rows"]) for v in data["verification"]] == [(1, 0), (1, 3), (2, 0), (2, 3)]
    assert all(v["step_ms"] > 0 for v in data["verification"])
    for a in data["agreeing"]:  # the target's own continuation as proposals: all k accepted, plus one
        assert a["identical"] is True and a["tokens_per_step"] == 4 and a["upper_bound"] is True
        assert a["all_accepted"] is True and a["probe_steps"] == [1, 1, 1]  # float32: 1-row greedy already agrees
        assert a["ms_per_token"] == pytest.approx(a["step_ms"] / 4, rel=1e-3)
    n = data["ngram_synthetic"]
    assert n["identical"] is True and n["off"]["proposed"] == 0 and n["off"]["steps"] >= 8
    d = data["demo"]
    assert d["ngram"]["identical"] is True and d["draft"]["identical"] is True
    assert d["draft"]["accepted"] == d["draft"]["proposed"]  # an identical draft: every proposal accepted


def test_agreeing_proposals_are_found_by_probing_and_probes_commit_nothing(synth_dir: Path) -> None:
    """The agreeing draft's proposals: from a wrong guess, probe steps (rolled back) reach the
    verification forward's own greedy continuation in at most k + 1 probes, which a timed step
    then accepts in full; it equals plain greedy here (float32, no ties)."""
    from aioffload.bench import common
    from aioffload.bench.speculative import _Driver
    from aioffload.config import CacheConfig, EngineConfig, SchedulerConfig

    cfg = EngineConfig(model=str(synth_dir / "tiny"), device="cpu", cache=CacheConfig(num_blocks=64),
                       scheduler=SchedulerConfig(max_model_len=64)).validate()
    worker = common.build_worker(cfg)
    prompts = common.random_prompts(2, 12, worker.model_config.vocab_size, seed=3)
    want = common.greedy_tokens(worker, prompts, 6)
    d = _Driver(worker, prompts, 8)
    d.prefill()
    seqs, done = [list(x) for x in d.seqs], list(d.done)
    guess = [[(t + 1) % worker.model_config.vocab_size for t in w[1:5]] for w in want]  # every proposal wrong
    props, probes = d.fixed_point(guess)
    assert (d.seqs, d.done) == (seqs, done)  # probing committed nothing
    assert props == [w[1:5] for w in want] and 2 <= probes <= 5
    _, out = d.spec_step(props)
    assert out == [w[1:6] for w in want]  # k accepted plus the bonus token


def test_synthetic_checkpoint_is_synced_to_disk_once_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    import aioffload.bench.synthetic as synthetic

    calls: list[int] = []
    monkeypatch.setattr(synthetic.os, "sync", lambda: calls.append(1))
    make_synthetic_checkpoint(tmp_path / "t", "tiny", num_layers=1)
    assert calls == [1] and "synced to disk" in capsys.readouterr().out
    make_synthetic_checkpoint(tmp_path / "t", "tiny", num_layers=1)  # reused: nothing written, nothing synced
    assert calls == [1]

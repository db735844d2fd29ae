"""--tensor-parallel-size through the command line: generate at TP 2 (spawned ranks, and torchrun's)
prints TP 1's text, plan shows each rank's placement and a halved copy floor, bad sizes are
one-line errors, and a server whose rank dies exits with a clear error instead of hanging, while
a rank whose rank 0 dies leaves."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from helpers import wait_for
from server_proc import DEMO, REPO, free_port, start_server

from aioffload.checkpoint.checkpoint import Checkpoint
from aioffload.cli import main

pytestmark = pytest.mark.timeout(180)

PROMPTS = ["--prompt", "The Python tutorial", "--prompt", "A list is"]
# 1.5 demo layers (float32) on the host, all ranks together: layers 2-3 offloaded at TP 1 and on each rank at TP 2.
OFFLOAD = ["--cpu-offload-gb", f"{1.5 * Checkpoint.open(DEMO).layout.nbytes(torch.float32) / 1e9:.6f}"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def run(*argv: str, launcher: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, *launcher, "-m", "aioffload.cli", *argv]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=REPO, timeout=150)


@pytest.fixture(scope="module")
def tp1_text() -> str:
    proc = run("generate", *PROMPTS, "--max-tokens", "12", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_generate_at_tp2_with_offload_prints_tp1s_text(tp1_text: str) -> None:
    proc = run("generate", *PROMPTS, "--max-tokens", "12", "--device", "cpu", "--tensor-parallel-size", "2", *OFFLOAD)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == tp1_text and tp1_text.count("--- ") == 2
    assert "rank 0 of 2 joined (gloo, cpu)" in proc.stderr
    assert "2 resident, 2 offloaded" in proc.stderr  # rank 0's shard: layers 2-3 stream


def test_generate_under_torchrun_prints_tp1s_text(tp1_text: str) -> None:
    torchrun = ("-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()))
    proc = run("generate", *PROMPTS, "--max-tokens", "12", "--device", "cpu", launcher=torchrun)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == tp1_text  # rank 1 prints nothing: it only follows
    assert "rank 0 of 2 joined (gloo, cpu)" in proc.stderr


def test_plan_shows_each_ranks_placement_and_half_the_copy_floor(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["plan", "--model", DEMO, "--gpu-memory-gb", "1", "--h2d-gbps", "0.1", *OFFLOAD]  # floors in ms
    assert main(args) == 0
    one = capsys.readouterr().out
    assert main([*args, "--tensor-parallel-size", "2"]) == 0
    two = capsys.readouterr().out
    floor1 = float(re.search(r"step floor\s+([\d.]+) ms", one).group(1))  # type: ignore[union-attr]
    floor2 = float(re.search(r"per-rank floor\s+([\d.]+) ms", two).group(1))  # type: ignore[union-attr]
    assert floor2 == pytest.approx(floor1 / 2, rel=2e-3) and floor1 > 50
    assert "tensor parallel  2 ranks" in two and "4 of 8 attention heads, 2 of 4 KV heads (sharded)" in two
    assert "2048 of 4096 vocabulary rows" in two
    assert re.search(r"layers 2-3\s+host", one) and re.search(r"layers 2-3\s+host", two)
    kv1 = int(re.search(r"KV cache\s+(\d+) blocks", one).group(1))  # type: ignore[union-attr]
    kv2 = int(re.search(r"KV cache\s+(\d+) blocks", two).group(1))  # type: ignore[union-attr]
    assert kv2 > 2 * kv1  # half the KV bytes per block, and half the weights leave more room


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["plan", "--tensor-parallel-size", "3", "--gpu-memory-gb", "1"],
         "--tensor-parallel-size 3 does not divide the model's 8 attention heads"),
        (["plan", "--tensor-parallel-size", "0"], "--tensor-parallel-size: must be an integer > 0, got 0"),
        (["bench", "offload", "--tensor-parallel-size", "2"], "bench offload compares workers side by side"),
        (["generate", "--prompt", "x", "--tensor-parallel-size", "2", "--device", "cuda"], "no CUDA device"),
    ],
)  # fmt: skip
def test_a_bad_tensor_parallel_size_is_a_one_line_error(argv: list[str], fragment: str,
                                                       capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    try:  # argparse refuses typed flags (SystemExit); configuration errors return the status
        code = main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and fragment in err.strip().splitlines()[-1], err


def rank_pid(log: str, rank: int) -> int:
    m = re.search(rf"tensor-parallel rank {rank} started \(pid (\d+)\)", log)
    assert m, log[-3000:]
    return int(m.group(1))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def test_a_server_whose_rank_dies_exits_with_a_clear_error() -> None:
    with start_server("--max-model-len", "128", "--tensor-parallel-size", "2") as server:
        r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "A list is", "max_tokens": 4,
                                                             "temperature": 0}, timeout=30)  # fmt: skip
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        pid = rank_pid(server.stderr_text(), 1)
        os.kill(pid, signal.SIGKILL)
        assert server.proc.wait(20) == 1
        last = server.stderr_text().strip().splitlines()[-1]
        assert last == f"error: tensor-parallel rank 1 (pid {pid}) was killed by signal 9; every rank stops"


def test_a_rank_leaves_when_its_rank_zero_dies() -> None:
    with start_server("--max-model-len", "128", "--tensor-parallel-size", "2") as server:
        pid = rank_pid(server.stderr_text(), 1)
        assert alive(pid)
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(10)
        assert wait_for(lambda: not alive(pid), timeout=20), f"rank 1 (pid {pid}) outlived rank 0"
        assert "rank 1 stops: the rank-0 store is gone" in server.stderr_text()


def test_bench_latency_at_tp2_times_steps_and_counts_one_ranks_bytes(tmp_path: Path) -> None:
    """Two TP 2 workers one after the other (--check-graphs builds the second once the first is gone):
    the follower replaces its shard, and both give the same greedy tokens."""
    proc = subprocess.run(
        [sys.executable, "-m", "aioffload.cli", "bench", "latency", "--synthetic", "tiny", "--synthetic-dir",
         str(tmp_path / "synth"), "--device", "cpu", "--tensor-parallel-size", "2", "--batch-sizes", "1,2",
         "--input-len", "5", "--output-len", "4", "--num-iters", "1", "--num-iters-warmup", "0", "--check-graphs",
         "--check-tokens", "3", "--num-kv-blocks", "64", "--max-model-len", "64"],
        capture_output=True, text=True, env={**ENV, "OUT": str(tmp_path)}, cwd=REPO, timeout=150,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "latency.json").read_text())
    assert [r["batch"] for r in data["runs"]] == [1, 2] and all(r["step_ms"]["p50"] > 0 for r in data["runs"])
    assert data["check_graphs"]["identical"] is True and data["check_graphs"]["tokens"] == 12
    # tiny: 4 layers, hidden 64, 128 MLP units, 4 heads / 2 KV heads of 16, 512 tokens; float32 on the CPU.
    # One rank: per layer 2 norms (64, padded to 128 elements) + qkv (32 + 16 + 16 rows of 64) + o (64 x 32)
    # + gate_up (2 x 64 rows) + down (64 x 64); then lm_head's 256 of 512 rows + the final norm.
    layer = 2 * 128 + 64 * 64 + 64 * 32 + 128 * 64 + 64 * 64
    assert data["runs"][0]["weight_bytes_read"] == (4 * layer + 257 * 64) * 4

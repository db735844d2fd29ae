"""The command line: flags, errors with exit status 2, plan and generate."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from aioffload.cli import main
from tests.tiny_models import add_word_tokenizer, make_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(add_word_tokenizer(make_checkpoint(tmp_path_factory.mktemp("cli"), "llama", seed=2)))


def test_serve_help_documents_every_flag_with_default() -> None:
    proc = subprocess.run([sys.executable, "-m", "aioffload.cli", "serve", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())  # argparse wraps lines
    for flag in ("--model", "--trigger", "--cpu-offload-gb", "--host", "--port", "--served-model-name", "--api-key",
                 "--max-model-len", "--max-num-seqs", "--max-num-batched-tokens", "--gpu-memory-utilization",
                 "--dtype", "--enforce-eager", "--max-queue", "--gpu-memory-gb", "--offload-prefetch",
                 "--lookahead"):  # fmt: skip
        assert flag in text, flag
    assert "(default: 127.0.0.1)" in text and "(default: 8000)" in text


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--trigger", "1.5"], "--trigger: must be a number in [0, 1] or 'auto', got 1.5"),
        (["--trigger", "fast"], "--trigger: must be a number in [0, 1] or 'auto'"),
        (["--cpu-offload-gb", "-1"], "--cpu-offload-gb: must be >= 0, got -1"),
        (["--gpu-memory-utilization", "0"], "--gpu-memory-utilization: must be in (0, 1]"),
        (["--max-num-seqs", "0"], "--max-num-seqs: must be an integer > 0, got 0"),
        (["--gpu-memory-gb", "-3"], "--gpu-memory-gb: must be a number > 0, got -3"),
        (["--dtype", "int3"], "--dtype: invalid choice"),
        (["--lookahead", "maybe"], "--lookahead: invalid choice"),
        (["--trigger", "0.95", "--gpu-memory-utilization", "0.9"], "above --gpu-memory-utilization"),
        (["--trigger", "0.5", "--cpu-offload-gb", "3"], "give only one"),
    ],
)
def test_bad_flags_exit_2_with_one_line(argv: list[str], fragment: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "aioffload.cli", "plan", *argv], capture_output=True, text=True)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert fragment in last, proc.stderr


def test_plan_prints_placement_without_loading(tiny: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--model", tiny, "--gpu-memory-gb", "80", "--cpu-offload-gb", "0.00005"]) == 0
    out = capsys.readouterr().out
    assert "host" in out and "GPU" in out and "floor" in out


def test_generate_batch_prints_each_prompt(tiny: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["generate", "--model", tiny, "--prompt", "w1 w5 w9", "--prompt", "w3 w3", "--max-tokens", "5",
               "--num-kv-blocks", "64"])  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out
    assert out.count("--- ") == 2
    lines = [ln for ln in out.splitlines() if ln.startswith("w1 w5 w9")]
    assert lines and len(lines[0].split()) == 3 + 5


def test_missing_model_folder_is_a_one_line_config_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'nope'}: model folder does not exist\n"


def test_bench_offload_without_a_gpu_refuses_before_writing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the benchmark would run")
    synth = tmp_path / "synth"
    assert main(["bench", "offload", "--synthetic-dir", str(synth)]) == 2
    err = capsys.readouterr().err
    assert err == (
        "error: bench offload: no CUDA device here, and the llama3-8b synthetic checkpoint holds 16.1 GB of "
        "weights: run it on a GPU machine; on the CPU, --synthetic tiny --device cpu checks every code path in "
        "seconds\n"
    )
    assert not synth.exists()  # nothing written


def test_lookahead_flag_reaches_the_scheduler_config() -> None:
    from aioffload.cli import build_parser, engine_config

    parse = build_parser().parse_args
    assert engine_config(parse(["serve", "--model", "m"])).scheduler.lookahead == "auto"
    assert engine_config(parse(["serve", "--model", "m", "--lookahead", "off"])).scheduler.lookahead == "off"

"""`aioffload plan` without a GPU (issue 10): the plan the CPU worker would make, with its assumed
figures stated; advice that really fixes a failing plan; units that never round to 0.00 GB."""

from __future__ import annotations

import re

import pytest
import torch

from aioffload.checkpoint.checkpoint import Checkpoint, resolve_max_model_len
from aioffload.cli import DEMO_MODEL, engine_config, main
from aioffload.model.layout import layer_layout
from aioffload.offload.device import CPU_STAND_IN_BYTES, device_facts, place
from aioffload.offload.units import gb, round_up_2
from aioffload.worker.worker import Worker

needs_no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only plan")


def plan_text(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(["plan", *argv]) == 0, capsys.readouterr().err
    return capsys.readouterr().out


def plan_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(["plan", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1, captured
    return captured.err.removeprefix("error: ").strip()


@needs_no_gpu
def test_cpu_offload_plan_has_a_floor_and_states_its_assumptions(capsys: pytest.CaptureFixture[str]) -> None:
    out = plan_text(["--cpu-offload-gb", "0.008"], capsys)
    assert "device           CPU (no CUDA device): weights and KV cache stay in host memory" in out
    assert "device memory    1099.5 GB stand-in: no limit on the CPU" in out
    assert "host-to-device   25.0 GB/s (assumed: on the CPU a streamed layer is a host memcpy" in out
    # A demo layer is 3.15 MB in fp32 (the CPU's dtype): 0.008 GB needs a tail of 3 of them.
    layer = layer_layout(Checkpoint.open(DEMO_MODEL).model_config).nbytes(torch.float32)
    assert 2 * layer < 8e6 <= 3 * layer
    assert re.search(r"layers 1-3\s+host\s+3\.1 MB each\s+9\.4 MB", out)
    floor_us = 3 * layer / 25e9 * 1e6
    assert f"step floor       {floor_us:.1f} us per decode step (9.4 MB at 25.0 GB/s host->GPU)" in out
    assert "KV pool          fixed by --cpu-kv-cache-gb 0.25" in out
    assert "KV cache         3814 blocks x 16 tokens = 61024 tokens (0.25 GB)" in out  # 0.25e9 // 65536
    assert "trigger          none applies on the CPU" in out
    assert "0.00 GB" not in out


@needs_no_gpu
def test_plan_is_the_plan_the_worker_makes(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["plan", "--cpu-offload-gb", "0.008", "--cpu-kv-cache-gb", "0.1"]
    from aioffload.cli import build_parser

    config = engine_config(build_parser().parse_args(argv))
    ckpt = Checkpoint.open(config.model)
    facts = device_facts(config, torch.device("cpu"))
    assert (facts.total_bytes, facts.h2d_bytes_per_s, facts.h2d_source) == (CPU_STAND_IN_BYTES, 25e9, "assumed")
    planned = place(config, ckpt.model_config, 4, resolve_max_model_len(config, ckpt), facts)
    worker = Worker(config, ckpt)
    assert worker.placement == planned
    assert worker.num_blocks == planned.kv_blocks == int(0.1e9 // 65536)
    assert worker.h2d_bytes_per_s == 25e9 and len(planned.offloaded_layers) == 3
    out = plan_text(argv[1:], capsys)
    assert f"KV cache         {planned.kv_blocks} blocks" in out and planned.reason in out


@needs_no_gpu
def test_device_cpu_plans_without_a_size(capsys: pytest.CaptureFixture[str]) -> None:
    out = plan_text(["--device", "cpu"], capsys)
    assert "device           CPU (no CUDA device)" in out
    assert "step floor       no offload: step bound by the CPU's compute" in out


@needs_no_gpu
@pytest.mark.parametrize("card", [[], ["--gpu-memory-gb", "0.5"]], ids=["stand-in", "emulated card"])
def test_trigger_auto_on_the_cpu_predicts_no_throughput(card: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    out = plan_text(["--trigger", "auto", *card], capsys)
    # KV from --cpu-kv-cache-gb: 61024 tokens hold 59 sequences of 1024, not the 64 a 1 TiB stand-in would.
    assert ("reason           auto: 4 of 4 layers resident -> 59 seqs x 1024 tokens (no tok/s prediction on the "
            "CPU: its steps are bound by its compute, which the plan does not model)") in out  # fmt: skip
    assert "tok/s," not in out and "step bound by the CPU's compute" in out


def test_trigger_auto_on_a_card_states_a_bound(capsys: pytest.CaptureFixture[str]) -> None:
    from aioffload.config import CacheConfig, OffloadConfig, SchedulerConfig
    from aioffload.offload.placement import plan_placement
    from tests.test_placement import LLAMA3_8B

    p = plan_placement(LLAMA3_8B, 2, OffloadConfig(trigger="auto"), CacheConfig(), SchedulerConfig(), 8192,
                       int(24e9), 55.4e9, 750_000_000)  # fmt: skip
    assert re.search(r"step >= \d+\.\d ms, predicted <= \d+ tok/s; runner-up \d+ resident: <= \d+ tok/s", p.reason)


def test_no_room_advice_names_the_activation_reserve_and_the_fix_works(capsys: pytest.CaptureFixture[str]) -> None:
    msg = plan_error(["--trigger", "0.5", "--gpu-memory-gb", "0.02"], capsys)
    assert "lower --max-model-len or raise --gpu-memory-utilization" not in msg  # the old advice fixes nothing
    reserve = "the 0.32 GB activation reserve (0.27 GB of it workspace and logits, the rest for 2048 batched tokens)"
    assert reserve in msg
    fix = re.search(r"a card of at least (\S+) GB \((--trigger 0 --gpu-memory-gb \S+) plans for one\)$", msg)
    assert fix is not None, msg
    out = plan_text(fix.group(2).split(), capsys)
    assert "step floor" in out


@pytest.mark.parametrize(
    "argv",
    [
        ["--gpu-memory-gb", "0.33"],  # fewer batched tokens fit
        ["--gpu-memory-gb", "0.4", "--gpu-memory-utilization", "0.8"],  # a higher utilization fits too
    ],
)
def test_every_suggested_fix_makes_a_valid_plan(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    msg = plan_error(argv, capsys)
    fixes = re.findall(r"--trigger 0 --(?:max-num-batched-tokens|gpu-memory-utilization|gpu-memory-gb) [\d.]+", msg)
    assert len(fixes) >= 2, msg
    for fix in fixes:
        flags = dict(zip(argv[::2], argv[1::2]))  # every flag here takes a value
        words = fix.split()
        flags.update(zip(words[::2], words[1::2]))  # the fix sets or replaces these
        plan_text([w for kv in flags.items() for w in kv], capsys)


def test_cpu_kv_pool_too_small_for_one_sequence(capsys: pytest.CaptureFixture[str]) -> None:
    if torch.cuda.is_available():
        pytest.skip("the CPU's KV pool")
    msg = plan_error(["--cpu-kv-cache-gb", "0.001"], capsys)
    assert msg == (
        "--cpu-kv-cache-gb 0.001 holds 240 tokens, fewer than one --max-model-len 1024 sequence (4.2 MB): give "
        "--cpu-kv-cache-gb 0.005 or more, or --max-model-len 240 or less"
    )
    assert "KV cache         76 blocks" in plan_text(["--cpu-kv-cache-gb", "0.005"], capsys)  # both fixes work
    assert "KV cache         15 blocks" in plan_text(["--cpu-kv-cache-gb", "0.001", "--max-model-len", "240"], capsys)


@pytest.mark.parametrize(
    "n, text",
    [(0, "0 GB"), (1e3, "1.0 kB"), (16.8e6, "16.8 MB"), (99.9e6, "99.9 MB"), (0.1e9, "0.10 GB"), (14.19e9, "14.19 GB")],
)
def test_units_adapt_below_a_tenth_of_a_gb(n: float, text: str) -> None:
    assert gb(n) == text


@pytest.mark.parametrize("x, up", [(0.3394, 0.34), (0.38, 0.38), (123.4, 130.0), (0.0201, 0.021)])
def test_round_up_to_two_digits(x: float, up: float) -> None:
    assert round_up_2(x) == pytest.approx(up)

"""Speculative decoding end to end on the demo model (CPU): greedy output identical to
--speculative off with prompt lookup and with draft models (stop strings, max_tokens, preemption,
abort), every block back after every request, sampled tokens reproducible, clear start-up errors."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from aioffload.cli import main
from aioffload.config import (
    DEMO_MODEL,
    CacheConfig,
    ConfigError,
    EngineConfig,
    OffloadConfig,
    SchedulerConfig,
    SpeculativeConfig,
)
from aioffload.engine.async_engine import Engine
from aioffload.engine.outputs import RequestOutput
from aioffload.worker.sampling import SamplingParams
from tests.test_engine import spy_preemptions
from tests.tiny_models import add_word_tokenizer, make_checkpoint

DEMO = DEMO_MODEL
PROMPTS = [
    "The list. The list is a list. The list",
    "def f(x):\n    return x + 1\n\ndef f(x):\n    return",
    "Python is a programming language. Python is a",
    "The",
    "A module is a file containing Python definitions and statements. A module is a",
]


@pytest.fixture(scope="module")
def perturbed(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The demo model with one weight tensor doubled: a draft that agrees about half the time."""
    path = tmp_path_factory.mktemp("draft") / "perturbed"
    shutil.copytree(DEMO, path)
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.3.mlp.down_proj.weight"] *= 2.0
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return str(path)


def engine(method: str = "off", draft: str | None = None, num_blocks: int = 512, budget: int = 256,
           seqs: int = 16, cap: int = 16, **offload: object) -> Engine:  # fmt: skip
    cfg = EngineConfig(
        model=DEMO,
        device="cpu",  # the CPU acceptance figures (tests/test_speculative_gpu.py is the CUDA side)
        cache=CacheConfig(num_blocks=num_blocks, block_size=4),
        scheduler=SchedulerConfig(max_model_len=192, max_num_batched_tokens=budget, max_num_seqs=seqs),
        offload=OffloadConfig(**offload),  # type: ignore[arg-type]
        speculative=SpeculativeConfig(method=method, draft_model=draft, num_tokens=cap),
    ).validate()
    e = Engine.from_config(cfg)
    if e.speculation is not None:  # k from acceptance alone: a shared machine's timings must not decide it
        e.speculation.draft_step_s = 0.0
    return e


def run(e: Engine, params: list[SamplingParams], abort: str | None = None) -> dict[str, list[RequestOutput]]:
    """Every prompt at once (request ids r0..), to completion; `abort` is aborted after its 3rd output."""

    async def one(i: int, p: SamplingParams) -> list[RequestOutput]:
        outs = []
        async for out in e.generate(PROMPTS[i % len(PROMPTS)], p, f"r{i}"):
            outs.append(out)
            if f"r{i}" == abort and len(outs) == 3:
                e.abort(f"r{i}")
        return outs

    async def go() -> dict[str, list[RequestOutput]]:
        try:
            outs = await asyncio.gather(*(one(i, p) for i, p in enumerate(params)))
            return {f"r{i}": o for i, o in enumerate(outs)}
        finally:
            await e.shutdown(1.0)

    result = asyncio.run(go())
    assert e.block_manager.pool.num_free == e.block_manager.pool.num_blocks  # every block back
    return result


def summary(outs: dict[str, list[RequestOutput]]) -> dict[str, tuple[list[int], str, str | None, int]]:
    """Per request: token ids, text, finish reason, usage's completion tokens."""
    return {
        rid: ([t for o in os_ for t in o.token_ids], "".join(o.text for o in os_), os_[-1].finish_reason,
              os_[-1].num_output_tokens)  # fmt: skip
        for rid, os_ in outs.items()
    }


GREEDY = [
    SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True),
    SamplingParams(max_tokens=13, temperature=0.0, ignore_eos=True),
    SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, stop=("function",)),
    SamplingParams(max_tokens=7, temperature=0.0),
    SamplingParams(max_tokens=60, temperature=0.0, stop=("\n\n", "module is a single")),
    SamplingParams(max_tokens=33, temperature=0.0, ignore_eos=True),
]


@pytest.fixture(scope="module")
def plain() -> dict[str, tuple[list[int], str, str | None, int]]:
    return summary(run(engine("off"), GREEDY))


def test_the_reference_run_exercises_stop_strings(plain: dict) -> None:
    reasons = [plain[f"r{i}"][2] for i in range(len(GREEDY))]
    assert reasons[2] == "stop" and "function" not in plain["r2"][1] and plain["r2"][3] < 40
    assert reasons[0] == reasons[1] == reasons[5] == "length" and len(plain["r1"][0]) == 13


def test_prompt_lookup_greedy_is_identical_to_off(plain: dict) -> None:
    e = engine("ngram")
    assert summary(run(e, GREEDY)) == plain
    s = e.stats()
    assert s["spec_accepted_tokens_total"] > 0 and s["spec_proposed_tokens_total"] > s["spec_accepted_tokens_total"]
    assert s["steps_total"] < sum(len(v[0]) for v in plain.values())  # fewer steps than tokens


def test_identical_draft_accepts_every_token_and_is_identical_to_off(plain: dict) -> None:
    e = engine("draft", DEMO)
    assert summary(run(e, GREEDY)) == plain
    s = e.stats()
    assert s["spec_proposed_tokens_total"] > 50
    assert s["spec_accepted_tokens_total"] == s["spec_proposed_tokens_total"]
    assert s["spec_mean_accepted_length"] > 3


def test_perturbed_draft_accepts_some_and_is_identical_to_off(plain: dict, perturbed: str) -> None:
    e = engine("draft", perturbed)
    assert summary(run(e, GREEDY)) == plain
    s = e.stats()
    assert 0 < s["spec_accepted_tokens_total"] < s["spec_proposed_tokens_total"]


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_preemption_in_a_tiny_pool_keeps_greedy_output(perturbed: str, method: str) -> None:
    # 48 blocks of 4 = the 192-token max_model_len: 18 requests of up to ~80 tokens must take turns.
    params = GREEDY * 3
    want = summary(run(engine("off"), params))
    e = engine(method, perturbed if method == "draft" else None, num_blocks=48)
    preempted = spy_preemptions(e)
    assert summary(run(e, params)) == want
    assert preempted and e.stats()["spec_accepted_tokens_total"] > 0


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_chunked_prefill_under_offload_keeps_greedy_output(plain: dict, perturbed: str, method: str) -> None:
    # A 16-token budget chunks every prompt (the draft runs each chunk too); layers stream from the host.
    e = engine(method, perturbed if method == "draft" else None, budget=16, cpu_offload_gb=0.005)
    assert e.worker.offload_active
    assert summary(run(e, GREEDY)) == plain
    assert e.stats()["spec_accepted_tokens_total"] > 0


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_abort_mid_stream_leaves_the_others_identical(plain: dict, perturbed: str, method: str) -> None:
    e = engine(method, perturbed if method == "draft" else None)
    got = summary(run(e, GREEDY, abort="r0"))
    assert got["r0"][2] == "abort" and len(got["r0"][0]) < 40
    assert got["r0"][0] == plain["r0"][0][: len(got["r0"][0])]
    assert {k: v for k, v in got.items() if k != "r0"} == {k: v for k, v in plain.items() if k != "r0"}


def test_sampled_prompt_lookup_gives_the_plain_runs_tokens_for_a_seed() -> None:
    params = [SamplingParams(max_tokens=30, temperature=0.9, top_p=0.95, top_k=50, seed=i, ignore_eos=True)
              for i in range(5)]  # fmt: skip
    assert summary(run(engine("ngram"), params)) == summary(run(engine("off"), params))


def test_sampled_draft_gives_the_plain_runs_tokens_for_a_seed(perturbed: str) -> None:
    """Seeded requests: the draft draws with the target's noise, so k (which follows timing and
    load) never changes the text."""
    params = [SamplingParams(max_tokens=30, temperature=0.8, seed=7 + i, ignore_eos=True) for i in range(3)]
    e = engine("draft", perturbed)
    assert summary(run(e, params)) == summary(run(engine("off"), params))
    assert 0 < e.stats()["spec_accepted_tokens_total"] < e.stats()["spec_proposed_tokens_total"]


def test_unseeded_sampled_requests_use_standard_rejection_sampling(perturbed: str) -> None:
    params = [SamplingParams(max_tokens=24, temperature=0.8, ignore_eos=True) for _ in range(3)]
    e = engine("draft", DEMO)
    got = summary(run(e, params))
    assert all(len(v[0]) == 24 for v in got.values())
    s = e.stats()  # q = p: u * q(d) < p(d) always holds, up to float rounding
    assert s["spec_accepted_tokens_total"] >= 0.98 * s["spec_proposed_tokens_total"] > 0
    e = engine("draft", perturbed)
    run(e, params)
    assert 0 < e.stats()["spec_accepted_tokens_total"] < e.stats()["spec_proposed_tokens_total"]


def test_auto_speculates_only_while_offload_is_active(plain: dict) -> None:
    assert engine("auto").speculation is None
    e = engine("auto", cpu_offload_gb=0.005)  # a few layers stream from host memory
    assert e.worker.offload_active and e.speculation is not None and e.speculation.method == "ngram"
    assert summary(run(e, GREEDY)) == plain
    assert e.stats()["spec_accepted_tokens_total"] > 0


def test_a_draft_with_another_vocabulary_is_refused(tmp_path: Path) -> None:
    tiny = str(add_word_tokenizer(make_checkpoint(tmp_path, "llama", seed=1, layers=2)))
    with pytest.raises(ConfigError, match=r"^--draft-model .*: vocabulary of 256 tokens, the target's has 4096"):
        engine("draft", tiny)
    # Same size, another tokenizer: two tokens swapped.
    other = tmp_path / "swapped"
    shutil.copytree(DEMO, other)
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = list(vocab)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ConfigError, match=r"maps 2 tokens differently from the target's"):
        engine("draft", str(other))


def test_cli_flags_are_checked_at_the_edge(capsys: pytest.CaptureFixture[str]) -> None:
    """Configuration errors are one line and exit status 2 (main returns it)."""
    cases = [
        (["--speculative", "draft"], "--speculative draft needs --draft-model DIR"),
        (["--draft-model", DEMO], "--draft-model is only used with --speculative draft"),
        (["--speculative", "ngram", "--ngram-min", "3", "--ngram-max", "2"], "need 1 <= --ngram-min <= --ngram-max"),
        (["--num-speculative-tokens", "65"], "--num-speculative-tokens must be in [1, 64], got 65"),
    ]
    for extra, message in cases:
        assert main(["generate", "--prompt", "x", *extra]) == 2
        assert message in capsys.readouterr().err


def test_generate_with_a_draft_prints_the_plain_greedy_text(capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    args = ["generate", "--prompt", PROMPTS[2], "--max-tokens", "24", "--device", "cpu"]
    assert main(args) == 0
    want = capsys.readouterr().out
    assert main([*args, "--speculative", "draft", "--draft-model", DEMO, "--num-speculative-tokens", "5"]) == 0
    assert capsys.readouterr().out == want and want.startswith(PROMPTS[2])

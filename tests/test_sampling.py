"""Sampling: determinism per (seed, step), support of top-k/top-p, distribution, stop strings, validation."""

from __future__ import annotations

import pytest
import torch

from aioffload.worker.sampling import (
    SamplingParams,
    SamplingTensors,
    find_stop_string,
    sample,
    uniform_noise,
    validate,
)

M32 = 0xFFFFFFFF


def tensors(params: list[SamplingParams], seeds: list[int], steps: list[int]) -> SamplingTensors:
    return SamplingTensors.build(params, seeds, steps, "cpu")


def draws(logits_row: torch.Tensor, params: SamplingParams, n: int, seed: int = 1234) -> torch.Tensor:
    """n draws from one distribution: the same row n times, one per step (= n positions of one request)."""
    logits = logits_row[None, :].expand(n, -1)  # [n, V]
    return sample(logits, tensors([params] * n, [seed] * n, list(range(n))))


# --- the hash, checked against plain Python integers ------------------------------------------------------


def py_fmix32(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & M32
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & M32
    return x ^ (x >> 16)


def py_uniform(seed: int, step: int, token: int) -> float:
    seed &= 2**64 - 1
    k = py_fmix32((seed >> 32) + 0x9E3779B9 & M32)
    k = py_fmix32(k ^ (seed & M32))
    k1 = py_fmix32(k ^ (step & M32))
    k2 = py_fmix32((k1 + 0x9E3779B9) & M32)
    h = py_fmix32((py_fmix32(token ^ k1) + k2) & M32)
    return ((h >> 9) * 2 + 1) / 2**24


def test_noise_matches_python_reference_including_extreme_seeds():
    seeds = [0, 1, -1, 2**63 - 1, -(2**63), 0xDEADBEEFCAFEF00D - 2**64, 123456789]
    t = tensors([SamplingParams()] * len(seeds), seeds, [0, 5, 7, 2**31 - 1, 3, 100000, 42])
    token_ids = torch.tensor([0, 1, 2, 255, 65535, 151935, 2**31 + 17])[None, :].expand(len(seeds), -1)
    got = uniform_noise(t.seed, t.step, token_ids.contiguous())
    steps = t.step.tolist()
    want = [[py_uniform(s, st, v) for v in token_ids[0].tolist()] for s, st in zip(seeds, steps, strict=True)]
    assert got.dtype == torch.float32
    assert got.tolist() == want


def test_noise_is_uniform():
    n = 20000
    seed = torch.tensor([7, 8, -9])
    u = uniform_noise(seed, torch.tensor([0, 1, 0]), torch.arange(n).expand(3, -1).contiguous())  # [3, n]
    assert 0 < u.min() and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.01
    assert abs(u.var().item() - 1 / 12) < 0.005
    counts = torch.histc(u, bins=10, min=0, max=1)  # expected 3n/10 per bin
    chi2 = ((counts - 3 * n / 10) ** 2 / (3 * n / 10)).sum().item()
    assert chi2 < 30  # 9 degrees of freedom: p < 0.001 above ~27.9
    # Neighbouring seeds and steps are not correlated.
    assert abs(torch.corrcoef(u)[0, 1:].abs().max().item()) < 0.03


def test_build_types_and_seed_wrapping():
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.7, top_k=5, top_p=0.9)]
    t = tensors(params, [2**64 - 1, -5], [0, 3])
    assert t.temperature.dtype == torch.float32 and t.top_p.dtype == torch.float32
    assert t.top_k.dtype == torch.int64 and t.seed.dtype == torch.int64 and t.step.dtype == torch.int64
    assert t.seed.tolist() == [-1, -5]  # 2**64 - 1 has the same 64 bits as -1
    assert t.top_k.tolist() == [0, 5] and t.step.tolist() == [0, 3]
    assert not t.all_greedy
    assert tensors([SamplingParams(temperature=0.0)] * 2, [1, 2], [0, 0]).all_greedy


# --- determinism ------------------------------------------------------------------------------------------


def test_same_seed_same_tokens_regardless_of_batch():
    torch.manual_seed(0)
    vocab = 1000
    logits = torch.randn(6, vocab)
    params = [SamplingParams(temperature=1.3, top_k=50 * i, top_p=0.95) for i in range(6)]
    seeds, steps = [11, 22, 33, 44, 55, 66], [0, 4, 9, 1, 2, 3]
    alone = torch.stack([sample(logits[i : i + 1], tensors([params[i]], [seeds[i]], [steps[i]]))[0]
                         for i in range(6)])
    batched = sample(logits, tensors(params, seeds, steps))
    perm = [5, 2, 0, 4, 1, 3]
    shuffled = sample(logits[perm], tensors([params[i] for i in perm], [seeds[i] for i in perm],
                                            [steps[i] for i in perm]))
    assert batched.dtype == torch.int64 and batched.shape == (6,)
    assert batched.tolist() == alone.tolist()
    assert shuffled.tolist() == batched[perm].tolist()
    assert sample(logits, tensors(params, seeds, steps)).tolist() == batched.tolist()  # again: same
    # Different company in the batch (greedy rows, other seeds) does not matter either.
    mixed = sample(torch.cat([torch.randn(3, vocab), logits[2:3]]),
                   tensors([SamplingParams(temperature=0.0)] * 2 + [params[0], params[2]],
                           [1, 2, 3, seeds[2]], [0, 0, 0, steps[2]]))
    assert mixed[3].item() == batched[2].item()


def test_different_seeds_and_steps_differ_on_flat_distribution():
    flat = torch.zeros(64, 1000)
    by_seed = sample(flat, tensors([SamplingParams()] * 64, list(range(64)), [0] * 64))
    by_step = sample(flat, tensors([SamplingParams()] * 64, [5] * 64, list(range(64))))
    assert len(set(by_seed.tolist())) > 55  # 64 uniform draws from 1000: ~62 distinct on average
    assert len(set(by_step.tolist())) > 55


# --- greedy, top-k, top-p ---------------------------------------------------------------------------------


def test_temperature_zero_is_argmax_in_a_mixed_batch():
    torch.manual_seed(1)
    logits = torch.randn(8, 500, dtype=torch.bfloat16)
    greedy = SamplingParams(temperature=0.0, top_k=3, top_p=0.5)
    params = [greedy, SamplingParams(temperature=2.0)] * 4
    out = sample(logits, tensors(params, list(range(8)), [0] * 8))
    want = logits.float().argmax(-1)
    assert out[0::2].tolist() == want[0::2].tolist()
    assert sample(logits, tensors([greedy] * 8, list(range(8)), [0] * 8)).tolist() == want.tolist()


def test_top_k_one_is_greedy():
    torch.manual_seed(2)
    logits = torch.randn(32, 300)
    logits[0, 7] = logits[0, 9] = logits[0].max() + 1  # a tie: both pick the first index
    out = sample(logits, tensors([SamplingParams(temperature=1.5, top_k=1)] * 32, list(range(32)), [3] * 32))
    assert out.tolist() == logits.argmax(-1).tolist()
    assert out[0].item() == 7


def test_top_k_restricts_support():
    torch.manual_seed(3)
    logits = torch.randn(50)
    got = draws(logits, SamplingParams(temperature=2.0, top_k=5), 2000)
    assert set(got.tolist()) == set(logits.topk(5).indices.tolist())


def test_top_p_restricts_support_to_nucleus():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])  # sorted: 0.5, 0.3 | 0.15, 0.05
    got = draws(probs.log(), SamplingParams(top_p=0.7), 4000)
    assert set(got.tolist()) == {1, 3}
    assert abs((got == 1).float().mean().item() - 0.5 / 0.8) < 0.03  # renormalised within the nucleus
    assert set(draws(probs.log(), SamplingParams(top_p=0.9), 4000).tolist()) == {1, 2, 3}
    assert set(draws(probs.log(), SamplingParams(top_p=0.3), 500).tolist()) == {1}  # top token always kept


def test_top_p_one_and_top_k_zero_keep_the_whole_vocabulary():
    got = draws(torch.zeros(20), SamplingParams(top_p=1.0, top_k=0), 2000)
    assert set(got.tolist()) == set(range(20))


# --- the distribution -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [SamplingParams(temperature=1.0), SamplingParams(temperature=0.6), SamplingParams(top_k=4)],
)
def test_empirical_distribution_matches_softmax(params: SamplingParams):
    torch.manual_seed(4)
    logits = torch.randn(10)
    n = 20000
    got = draws(logits, params, n, seed=99)
    freq = torch.bincount(got, minlength=10).float() / n
    scaled = logits / params.temperature
    if params.top_k:
        scaled = scaled.masked_fill(scaled < scaled.topk(params.top_k).values[-1], float("-inf"))
    want = scaled.softmax(-1)
    assert (freq - want).abs().max().item() < 0.02
    assert (freq[want == 0] == 0).all()


# --- stop strings -----------------------------------------------------------------------------------------


def test_find_stop_string():
    assert find_stop_string("hello world", ["wor"]) == 6
    assert find_stop_string("hello world", ["xyz"]) is None
    assert find_stop_string("hello world", []) is None
    assert find_stop_string("abcSTOPdefEND", ["END", "STOP"]) == 3  # the earliest, not the first listed
    assert find_stop_string("aaXYbb", ["XY", "aXYb"]) == 1  # overlapping: the one that begins first


def test_find_stop_string_incremental():
    stops = ["</s>", "\n\n"]
    pieces = ["Hello", " there<", "/", "s> and more"]
    text, found = "", None
    for piece in pieces:
        prev_len = len(text)
        text += piece
        found = find_stop_string(text, stops, start=prev_len)
        if found is not None:
            break
    assert text[:found] == "Hello there"
    # A match lying wholly before `start` was already seen: it is not reported again...
    assert find_stop_string("ab</s>cd", stops, start=6) is None
    # ...but one that straddles `start` is.
    assert find_stop_string("ab</s>cd", stops, start=5) == 2
    assert find_stop_string("ab</s>cd", stops, start=2) == 2
    assert find_stop_string("x\n\n", stops, start=2) == 1


# --- validation -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"stop": ("ok", "")}, "stop"),
        ({"stop_token_ids": (2, -3)}, "stop_token_ids"),
    ],
)
def test_validate_names_the_field(kwargs: dict, field: str):
    with pytest.raises(ValueError, match=rf"^{field}: "):
        validate(SamplingParams(**kwargs))


def test_validate_accepts_good_params():
    validate(SamplingParams())
    validate(SamplingParams(max_tokens=1, temperature=0.0, top_p=1.0, top_k=1, stop=("\n",),
                            stop_token_ids=(0,)))


def test_tiny_positive_temperature_samples_greedy() -> None:
    from aioffload.worker.sampling import MIN_TEMPERATURE

    logits = torch.randn(4, 50)
    params = [SamplingParams(temperature=t) for t in (1e-30, 1e-38, MIN_TEMPERATURE / 2, 0.0)]
    assert all(p.is_greedy for p in params)
    t = SamplingTensors.build(params, seeds=[1, 2, 3, 4], steps=[0, 0, 0, 0], device=torch.device("cpu"))
    mixed = [*params[:3], SamplingParams(temperature=1.0)]
    tm = SamplingTensors.build(mixed, seeds=[1, 2, 3, 4], steps=[0, 0, 0, 0], device=torch.device("cpu"))
    assert sample(logits, t).tolist() == logits.argmax(-1).tolist()
    assert sample(logits, tm)[:3].tolist() == logits.argmax(-1)[:3].tolist()  # no NaN garbage from 1/t


def test_top_k_and_seed_bounds() -> None:
    from aioffload.worker.sampling import MAX_TOP_K

    with pytest.raises(ValueError, match="^top_k: "):
        validate(SamplingParams(top_k=2**63))
    validate(SamplingParams(top_k=MAX_TOP_K))
    with pytest.raises(ValueError, match="^seed: "):
        validate(SamplingParams(seed=2**64))


def test_sample_tokens_greedy_shortcut_agrees_with_sample() -> None:
    from aioffload.worker.sampling import sample_tokens

    logits = torch.randn(3, 40)
    greedy = [SamplingParams(temperature=0.0)] * 3
    assert sample_tokens(logits, greedy, [1, 2, 3], [0, 0, 0]) == logits.argmax(-1).tolist()
    mixed = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.7, top_k=5), SamplingParams(temperature=1.0)]
    t = SamplingTensors.build(mixed, [1, 2, 3], [4, 4, 4], torch.device("cpu"))
    assert sample_tokens(logits, mixed, [1, 2, 3], [4, 4, 4]) == sample(logits, t).tolist()

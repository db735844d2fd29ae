"""Penalties, logit_bias and min_tokens on the logits: each does exactly what its definition says."""

from __future__ import annotations

import pytest
import torch

from aioffload.worker.penalties import RowHistory, apply_penalties
from aioffload.worker.sampling import SamplingParams, validate

V = 12


def logits(rows: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return torch.randn(rows, V, generator=g) * 3  # positive and negative values


def test_presence_and_frequency_penalties_follow_openai() -> None:
    x = logits()
    out = x.clone()
    p = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    apply_penalties(out, [RowHistory(1, p, prompt_token_ids=[7, 7, 8], output_token_ids=[3, 5, 3, 3])])
    expected = x.clone()
    counts = torch.zeros(V)
    counts[3], counts[5] = 3, 1  # outputs only: the prompt's 7 and 8 are not penalised
    expected[1] -= 0.25 * counts + 0.5 * (counts > 0).float()
    assert torch.equal(out, expected)
    assert torch.equal(out[0], x[0])  # a row not listed is untouched


def test_negative_presence_penalty_encourages() -> None:
    x = logits(1)
    out = x.clone()
    apply_penalties(out, [RowHistory(0, SamplingParams(presence_penalty=-1.0), [1], [4, 4])])
    assert out[0, 4] == pytest.approx(float(x[0, 4]) + 1.0)
    assert torch.equal(out[0, :4], x[0, :4]) and torch.equal(out[0, 5:], x[0, 5:])


def test_repetition_penalty_divides_positive_and_multiplies_negative_over_prompt_and_output() -> None:
    x = torch.tensor([[2.0, -2.0, 3.0, -1.0, 0.0, 4.0] + [1.0] * (V - 6)])
    out = x.clone()
    apply_penalties(out, [RowHistory(0, SamplingParams(repetition_penalty=2.0), [0, 1], [3, 4, 0])])
    assert out[0, :6].tolist() == [1.0, -4.0, 3.0, -2.0, 0.0, 4.0]  # ids 0, 1 (prompt), 3, 4 (outputs)
    assert torch.equal(out[0, 6:], x[0, 6:])


def test_logit_bias_adds_and_plus_100_forces_the_argmax() -> None:
    x = logits()
    out = x.clone()
    p = SamplingParams(logit_bias=((2, 100.0), (9, -3.5)))
    apply_penalties(out, [RowHistory(0, p, [1], [])])
    assert out[0, 2] == pytest.approx(float(x[0, 2]) + 100.0)
    assert out[0, 9] == pytest.approx(float(x[0, 9]) - 3.5)
    keep = [i for i in range(V) if i not in (2, 9)]
    assert torch.equal(out[0, keep], x[0, keep]) and torch.equal(out[1], x[1])
    assert int(out[0].argmax()) == 2


def test_min_tokens_masks_eos_and_stop_ids_until_enough_are_out() -> None:
    x = logits(3)
    out = x.clone()
    p = SamplingParams(min_tokens=3, stop_token_ids=(5,))
    apply_penalties(out, [
        RowHistory(0, p, [1], [4, 4], eos_token_ids=(1, 2)),  # 2 out: masked
        RowHistory(1, p, [1], [4, 4, 4], eos_token_ids=(1, 2)),  # 3 out: free
        RowHistory(2, SamplingParams(min_tokens=3, ignore_eos=True, stop_token_ids=(5,)), [1], [], (1, 2)),
    ])  # fmt: skip
    assert out[0, [1, 2, 5]].tolist() == [float("-inf")] * 3
    keep = [i for i in range(V) if i not in (1, 2, 5)]
    assert torch.equal(out[0, keep], x[0, keep])
    assert torch.equal(out[1], x[1])
    assert out[2, 5] == float("-inf") and torch.equal(out[2, :5], x[2, :5])  # ignore_eos: eos stays allowed


def test_processors_compose_in_the_documented_order() -> None:
    x = torch.full((1, V), 2.0)
    out = x.clone()
    p = SamplingParams(repetition_penalty=2.0, frequency_penalty=1.0, logit_bias=((3, 0.5),))
    apply_penalties(out, [RowHistory(0, p, [], [3, 3])])
    assert float(out[0, 3]) == pytest.approx(2.0 / 2.0 - 2 * 1.0 + 0.5)  # repetition, frequency, then bias


def test_validate_names_the_field() -> None:
    bad = {
        "n": SamplingParams(n=0),
        "best_of": SamplingParams(n=3, best_of=2),
        "logprobs": SamplingParams(logprobs=21),
        "prompt_logprobs": SamplingParams(prompt_logprobs=-1),
        "presence_penalty": SamplingParams(presence_penalty=2.5),
        "frequency_penalty": SamplingParams(frequency_penalty=float("nan")),
        "repetition_penalty": SamplingParams(repetition_penalty=0.0),
        "logit_bias": SamplingParams(logit_bias=((1, 101.0),)),
        "min_tokens": SamplingParams(max_tokens=4, min_tokens=5),
        "logits_mask": SamplingParams(logits_mask=3),  # type: ignore[arg-type]
    }
    for field, params in bad.items():
        with pytest.raises(ValueError, match=rf"^{field}: "):
            validate(params)
    with pytest.raises(ValueError, match="^logit_bias: token ids must be >= 0 and distinct"):
        validate(SamplingParams(logit_bias=((1, 1.0), (1, 2.0))))
    validate(SamplingParams(n=2, best_of=4, logprobs=20, prompt_logprobs=0, presence_penalty=-2.0,
                            frequency_penalty=2.0, repetition_penalty=1.3, logit_bias=((0, -100.0),), min_tokens=16))

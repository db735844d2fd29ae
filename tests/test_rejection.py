"""Speculative verification (worker/rejection.py): the emitted tokens follow the target's distribution
exactly (chi-square over many seeds on a tiny vocabulary), acceptance rates are the textbook ones,
greedy accepts exactly the argmax prefix, and one-hot proposals reproduce the plain sampler's draws."""

from __future__ import annotations

import pytest
import torch

from aioffload.worker.rejection import ProposalIndex, rejection_sample, verify
from aioffload.worker.sampling import SamplingParams, SamplingTensors, probs, sample

CPU = torch.device("cpu")
N = 40_000  # sequences, one seed each
# Upper 0.1% points of chi-square by degrees of freedom: a correct sampler fails such a test once
# in 1000 sets of seeds; the seeds are fixed, so each test is deterministic.
CHI2_P001 = {3: 16.266, 4: 18.467, 5: 20.515}

P0 = torch.tensor([0.05, 0.30, 0.10, 0.25, 0.20, 0.10])  # target, row 0
P1 = torch.tensor([0.40, 0.05, 0.05, 0.20, 0.10, 0.20])  # target, row 1 (the bonus)
Q = torch.tensor([0.30, 0.10, 0.30, 0.10, 0.15, 0.05])  # draft


def fits(tokens: torch.Tensor, expected: torch.Tensor) -> bool:
    """Pearson's chi-square test of `tokens` against the distribution `expected` at p = 0.001; a
    token of probability 0 must never appear."""
    counts = torch.bincount(tokens, minlength=expected.numel()).double()
    support = expected > 0
    assert counts[~support].sum() == 0, "a token outside the distribution's support was emitted"
    want = expected[support].double() / expected.sum() * tokens.numel()
    stat = float(((counts[support] - want) ** 2 / want).sum())
    return stat < CHI2_P001[int(support.sum()) - 1]


def one_proposal_batch(
    n: int, params: SamplingParams, seed0: int = 0
) -> tuple[torch.Tensor, SamplingTensors, ProposalIndex, torch.Tensor]:
    """n sequences with one proposal each: logits rows (log P0, log P1) per sequence, proposals ~ Q."""
    logits = torch.stack([P0.log(), P1.log()]).repeat(n, 1)  # [2n, 6]
    seeds = [seed0 + i for i in range(n) for _ in range(2)]
    t = SamplingTensors.build([params] * 2 * n, seeds, [5, 6] * n, CPU)
    g = torch.Generator().manual_seed(1)
    draft = torch.multinomial(Q, n, replacement=True, generator=g)  # [n]
    return logits, t, ProposalIndex.build([1] * n, CPU), draft


def test_full_draft_rejection_sampling_preserves_the_target_distribution() -> None:
    logits, t, index, draft = one_proposal_batch(N, SamplingParams(temperature=1.0))
    q = Q.expand(N, -1).clone()
    tokens, accepted = rejection_sample(logits, t, index, draft, q, torch.ones(N, dtype=torch.bool))
    assert fits(tokens[:, 0], P0)
    # Accepted with probability sum(min(p, q)) (= 1 - total variation distance).
    assert accepted.float().mean().item() == pytest.approx(torch.minimum(P0, Q).sum().item(), abs=0.01)
    assert torch.equal(tokens[accepted == 1, 0], draft[accepted == 1])
    # After an acceptance the bonus comes from the next row's distribution.
    assert fits(tokens[accepted == 1, 1], P1)


def test_one_hot_proposals_preserve_the_target_distribution() -> None:
    logits, t, index, draft = one_proposal_batch(N, SamplingParams(temperature=1.0))
    tokens, accepted = rejection_sample(logits, t, index, draft)
    assert fits(tokens[:, 0], P0)
    # q = one-hot(d): accepted with probability p(d).
    assert accepted.float().mean().item() == pytest.approx(P0[draft].mean().item(), abs=0.01)
    assert fits(tokens[accepted == 1, 1], P1)
    # Rejected: the replacement is p conditioned on "not the proposal".
    rejected = accepted == 0
    for d in range(6):
        rows = rejected & (draft == d)
        cond = P0.clone()
        cond[d] = 0
        assert fits(tokens[rows, 0], cond)


def test_one_hot_tokens_are_the_plain_samplers_draws() -> None:
    """The same seed gives the same tokens with or without proposals, whatever they were."""
    logits, t, index, draft = one_proposal_batch(2000, SamplingParams(temperature=0.8, top_p=0.9))
    plain = sample(logits, t).view(-1, 2)  # [n, 2]: what a plain run draws at output indices 5 and 6
    tokens, accepted = rejection_sample(logits, t, index, draft)
    assert torch.equal(tokens[:, 0], plain[:, 0])
    assert torch.equal(tokens[accepted == 1, 1], plain[accepted == 1, 1])
    assert torch.equal(accepted == 1, plain[:, 0] == draft)


def test_temperature_and_top_k_are_applied_to_the_target_before_verifying() -> None:
    params = SamplingParams(temperature=0.7, top_k=4)
    logits, t, index, draft = one_proposal_batch(N, params, seed0=10**6)
    q = Q.expand(N, -1).clone()
    tokens, _ = rejection_sample(logits, t, index, draft, q, torch.ones(N, dtype=torch.bool))
    want = (P0.log() / 0.7).softmax(-1)
    want[[0, 5]] = 0  # outside the top 4 (tokens 2 and 5 tie: the lower id ranks first)
    want /= want.sum()
    assert torch.allclose(probs(P0.log()[None], SamplingTensors.build([params], [0], [0], CPU))[0], want)
    assert fits(tokens[:, 0], want)  # 4 tokens in the support


def test_greedy_accepts_the_argmax_prefix_then_the_argmax() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4 + 1 + 5, 50)  # sequences of k = 3, 0, 4 proposals own k + 1 rows each
    top = logits.argmax(-1).tolist()
    proposals = [
        [top[0], top[1], (top[2] + 1) % 50],  # two accepted, the third replaced by the argmax
        [],  # no proposals: just the argmax
        [top[5], top[6], top[7], top[8]],  # all accepted, plus the bonus
    ]
    greedy = SamplingParams(temperature=0.0)
    out = verify(logits, proposals, [greedy] * 3, [1, 2, 3], [0, 0, 0])
    assert out == [[top[0], top[1], top[2]], [top[4]], [top[5], top[6], top[7], top[8], top[9]]]


def test_mixed_batch_greedy_and_sampled_rows() -> None:
    torch.manual_seed(1)
    logits = torch.randn(2 + 3, 30)
    top = logits.argmax(-1).tolist()
    greedy, hot = SamplingParams(temperature=0.0), SamplingParams(temperature=1.0)
    out = verify(logits, [[top[0]], [7, 8]], [greedy, hot], [4, 9], [3, 11])
    assert out[0] == [top[0], top[1]]
    t = SamplingTensors.build([hot] * 3, [9] * 3, [11, 12, 13], CPU)
    plain = sample(logits[2:], t).tolist()
    n = 0
    while n < 2 and plain[n] == [7, 8][n]:
        n += 1
    assert out[1] == [*[7, 8][:n], plain[n]]

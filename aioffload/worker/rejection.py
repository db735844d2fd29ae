"""Verify proposed tokens against the target in one step: speculative rejection sampling on the device.

A sequence with k proposals d_1..d_k owns k + 1 consecutive logits rows; row j holds the target's
distribution p_j for the token after d_1..d_j, to be sampled as output index step + j. Proposal
d_{j+1} is checked at row j; the first rejection ends the sequence's tokens with a replacement drawn
from the residual, and when all k are accepted row k gives one more token (the bonus).

Two proposal kinds, both leaving every emitted token distributed exactly as the target's:
- one-hot (prompt lookup, greedy drafts, a draft's draw with the target's own noise for seeded
  requests): the target draws x_j from p_j with the very noise the plain sampler uses for
  (seed, step + j); d_{j+1} is accepted iff x_j == d_{j+1}, otherwise x_j is emitted. For a
  proposal independent of that noise this is standard rejection sampling for q = one-hot(d):
  accepted with probability p(d), and on rejection x ~ p(. | x != d) = norm(max(0, p - q)). Either
  way every emitted token is the plain sampler's draw: a seed gives the same tokens as a plain
  run, whatever k the scheduler picked.
- full (a draft model's independent draw from its q_j, for requests without a seed): standard
  rejection sampling: accept iff u * q(d) < p(d), u keyed by (seed, step + j, ACCEPT_KEY); on
  rejection draw from norm(max(0, p - q)) with the plain noise.

Greedy rows are one-hot targets: accept iff d is the target's argmax, which then replaces it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from aioffload.worker.sampling import SamplingParams, SamplingTensors, probs, sample, sample_weights, uniform_noise

ACCEPT_KEY = 0xFFFFFFFF  # the "token id" keying the acceptance uniforms: no vocabulary reaches it


@dataclass(frozen=True)
class ProposalIndex:
    """Where each sequence's proposals sit among a step's logits rows (sequence s owns k_s + 1 rows)."""

    num_proposed: torch.Tensor  # [S] int64: k_s
    prop_rows: torch.Tensor  # [P] int64: the logits row that checks each proposal (P = sum k_s)
    prop_seq: torch.Tensor  # [P] int64: its sequence
    prop_pos: torch.Tensor  # [P] int64: its index among that sequence's proposals
    last_rows: torch.Tensor  # [S] int64: each sequence's last row (its bonus token)
    max_k: int

    @classmethod
    def build(cls, num_proposed: Sequence[int], device: torch.device | str) -> ProposalIndex:
        rows, seq, pos, last = [], [], [], []
        r = 0
        for s, k in enumerate(num_proposed):
            rows.extend(range(r, r + k))
            seq.extend([s] * k)
            pos.extend(range(k))
            last.append(r + k)
            r += k + 1

        def t(v: list[int]) -> torch.Tensor:
            return torch.tensor(v, dtype=torch.int64).to(device, non_blocking=True)

        return cls(t(list(num_proposed)), t(rows), t(seq), t(pos), t(last), max(num_proposed, default=0))


def rejection_sample(
    logits: torch.Tensor,  # [R, V] target logits, R = sum(k_s + 1)
    t: SamplingTensors | None,  # per row (step = the output index each row samples); None = all greedy
    index: ProposalIndex,
    draft_ids: torch.Tensor,  # [P] int64 proposals, sequence-major
    draft_probs: torch.Tensor | None = None,  # [P, V] q of each proposal where `full`, else ignored
    full: torch.Tensor | None = None,  # [P] bool: the proposal was drawn from draft_probs (not one-hot)
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (tokens [S, K + 1], num_accepted [S]); sequence s emits tokens[s, : num_accepted[s] + 1]."""
    x = logits.argmax(dim=-1) if t is None else sample(logits, t)  # [R]: the target's own draws
    xp = x[index.prop_rows]  # [P]
    accept = xp == draft_ids  # [P]
    emit = xp  # [P]: what the sequence emits if its chain stops at this proposal
    if draft_probs is not None and full is not None and t is not None:
        tp = t.select(index.prop_rows)
        p = probs(logits[index.prop_rows], tp)  # [P, V]
        pd = p.gather(-1, draft_ids[:, None]).squeeze(-1)  # [P]
        qd = draft_probs.gather(-1, draft_ids[:, None]).squeeze(-1)  # [P]
        key = torch.full_like(draft_ids[:, None], ACCEPT_KEY)
        u = uniform_noise(tp.seed, tp.step, key).squeeze(-1)  # [P]
        residual = (p - draft_probs).clamp_min_(0.0)  # [P, V]; all zero only where q == p: then u * q < p
        accept = torch.where(full, u * qd < pd, accept)
        emit = torch.where(full, sample_weights(residual, tp.seed, tp.step), emit)
    s, k = index.last_rows.numel(), index.max_k
    dev = logits.device
    accepted = torch.zeros(s, k, dtype=torch.bool, device=dev)
    accepted[index.prop_seq, index.prop_pos] = accept
    num_accepted = accepted.int().cumprod(dim=1).sum(dim=1)  # [S]: the leading run of acceptances
    tokens = torch.zeros(s, k + 1, dtype=torch.int64, device=dev)
    tokens[index.prop_seq, index.prop_pos] = draft_ids
    stop = torch.zeros_like(tokens)  # [S, K + 1]
    stop[index.prop_seq, index.prop_pos] = emit
    seqs = torch.arange(s, device=dev)
    stop[seqs, index.num_proposed] = x[index.last_rows]
    tokens[seqs, num_accepted] = stop[seqs, num_accepted]
    return tokens, num_accepted


def verify(
    logits: torch.Tensor,  # [R, V]
    proposals: Sequence[Sequence[int]],  # per sequence, its k_s proposed tokens
    params: Sequence[SamplingParams],
    seeds: Sequence[int],
    steps: Sequence[int],  # per sequence: the output index of its first row
    draft_probs: torch.Tensor | None = None,  # [P, V]
    full: Sequence[bool] | None = None,  # per sequence: its proposals were drawn from draft_probs
) -> list[list[int]]:
    """Host wrapper: the tokens each sequence emits (accepted proposals, then one more). One host sync."""
    dev = logits.device
    num_proposed = [len(p) for p in proposals]
    index = ProposalIndex.build(num_proposed, dev)
    flat = [tok for p in proposals for tok in p]
    draft_ids = torch.tensor(flat, dtype=torch.int64).to(dev, non_blocking=True)
    t = None
    if not all(p.is_greedy for p in params):
        rows = [(p, sd, st + j) for p, sd, st, k in zip(params, seeds, steps, num_proposed) for j in range(k + 1)]
        t = SamplingTensors.build([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], dev)
    full_t = None
    if draft_probs is not None and full is not None and any(full):
        full_t = torch.tensor([f for f, k in zip(full, num_proposed) for _ in range(k)], dtype=torch.bool).to(dev)
    tokens, num_accepted = rejection_sample(logits, t, index, draft_ids, draft_probs, full_t)
    host = torch.cat([num_accepted[:, None], tokens], dim=1).tolist()
    return [row[1 : row[0] + 2] for row in host]

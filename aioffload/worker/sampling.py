"""Sampling: greedy, temperature, top-k, top-p, per-request seeds, stop conditions.

What a request may add on top (each costs nothing for requests without it): penalties and
logit_bias (`worker/penalties.py`), logits masks (`worker/masks.py`), logprobs
(`worker/logprobs.py`), all run by `worker/step_extras.py`; n / best_of are the engine's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from aioffload.worker.masks import LogitsMaskProvider


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling and stopping choices (validated at the edge, trusted inside).

    Order on the logits of a step: repetition_penalty, frequency/presence penalties, logit_bias,
    min_tokens, the logits mask, then temperature, top-k, top-p. Logprobs are of the raw model
    distribution, before any of these (what vLLM returns by default).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    n: int = 1  # choices returned
    best_of: int | None = None  # candidates sampled (>= n; None = n); the n of highest cumulative logprob return
    # Per output token: its logprob and the `logprobs` most likely (id, logprob) of log_softmax(raw logits)
    logprobs: int | None = None  # 0..MAX_LOGPROBS; None = off
    # Per prompt token given its prefix (the first is None), with as many alternatives; in the first output
    prompt_logprobs: int | None = None
    presence_penalty: float = 0.0  # OpenAI: logit -= presence_penalty if the token is among the outputs
    frequency_penalty: float = 0.0  # OpenAI: logit -= frequency_penalty * its count among the outputs
    repetition_penalty: float = 1.0  # HF/vLLM, over prompt + outputs: positive logits / p, negative * p
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit); +100 forces it
    min_tokens: int = 0  # eos and stop_token_ids masked (stop strings not matched) until this many are out
    # False: the output text keeps special tokens (tool-call formats open calls with one), leaving
    # out the ids that end generation (eos unless ignore_eos, stop_token_ids)
    skip_special_tokens: bool = True
    # Called once per sequence (each of n / best_of gets its own) for a fresh provider of allowed ids
    logits_mask: Callable[[], LogitsMaskProvider] | None = None

    @property
    def is_greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE

    @property
    def num_candidates(self) -> int:
        return self.best_of if self.best_of is not None else self.n

    @property
    def changes_logits(self) -> bool:
        """A penalty, bias, min_tokens or mask applies (the step then runs worker/step_extras.py)."""
        return (
            self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0
            or bool(self.logit_bias) or self.min_tokens > 0 or self.logits_mask is not None
        )  # fmt: skip


MAX_TOP_K = 1 << 20  # beyond any vocabulary: as good as off, and safely an int64
MIN_TEMPERATURE = 1e-5  # smaller positive temperatures sample as greedy (1/t would overflow)
MAX_LOGPROBS = 20  # OpenAI's bound for top_logprobs
MAX_LOGIT_BIAS = 100.0  # OpenAI's bound: |bias| <= 100


def validate(params: SamplingParams) -> None:
    """Raise ValueError("<field>: <problem>") for the first invalid field; the HTTP layer maps it to a 400."""
    p = params
    if p.max_tokens < 1:
        raise ValueError(f"max_tokens: must be >= 1, got {p.max_tokens}")
    if not p.temperature >= 0:  # also rejects NaN
        raise ValueError(f"temperature: must be >= 0, got {p.temperature}")
    if not 0 < p.top_p <= 1:
        raise ValueError(f"top_p: must be in (0, 1], got {p.top_p}")
    if not 0 <= p.top_k <= MAX_TOP_K:
        raise ValueError(f"top_k: must be in [0, {MAX_TOP_K}] (0 = off), got {p.top_k}")
    if p.seed is not None and not -(2**63) <= p.seed < 2**64:
        raise ValueError(f"seed: must fit in 64 bits, got {p.seed}")
    if any(len(s) == 0 for s in p.stop):
        raise ValueError("stop: stop strings must not be empty")
    if any(t < 0 for t in p.stop_token_ids):
        raise ValueError(f"stop_token_ids: token ids must be >= 0, got {list(p.stop_token_ids)}")
    if p.n < 1:
        raise ValueError(f"n: must be >= 1, got {p.n}")
    if p.best_of is not None and p.best_of < p.n:
        raise ValueError(f"best_of: must be >= n ({p.n}), got {p.best_of}")
    for name in ("logprobs", "prompt_logprobs"):
        v = getattr(p, name)
        if v is not None and not 0 <= v <= MAX_LOGPROBS:
            raise ValueError(f"{name}: must be in [0, {MAX_LOGPROBS}], got {v}")
    for name in ("presence_penalty", "frequency_penalty"):
        v = getattr(p, name)
        if not -2.0 <= v <= 2.0:  # also rejects NaN
            raise ValueError(f"{name}: must be in [-2, 2], got {v}")
    if not (p.repetition_penalty > 0 and math.isfinite(p.repetition_penalty)):
        raise ValueError(f"repetition_penalty: must be a positive number, got {p.repetition_penalty}")
    ids = [t for t, _ in p.logit_bias]
    if any(t < 0 for t in ids) or len(set(ids)) != len(ids):
        raise ValueError("logit_bias: token ids must be >= 0 and distinct")
    if any(not -MAX_LOGIT_BIAS <= b <= MAX_LOGIT_BIAS for _, b in p.logit_bias):
        raise ValueError(f"logit_bias: biases must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]")
    if not 0 <= p.min_tokens <= p.max_tokens:
        raise ValueError(f"min_tokens: must be in [0, max_tokens={p.max_tokens}], got {p.min_tokens}")
    if p.logits_mask is not None and not callable(p.logits_mask):
        raise ValueError("logits_mask: must be a callable returning a LogitsMaskProvider")


def find_stop_string(text: str, stops: Sequence[str], start: int = 0) -> int | None:
    """Index where the earliest stop string begins, or None.

    Only matches that end at or after `start` are looked for: an engine that checked the text before
    each new piece passes start=len(previous text) (any smaller start is also correct, just slower).
    """
    best: int | None = None
    for stop in stops:
        if not stop:
            continue
        i = text.find(stop, max(0, start - len(stop) + 1))
        if i >= 0 and (best is None or i < best):
            best = i
    return best


@dataclass(frozen=True)
class SamplingTensors:
    """One batch's sampling parameters, already on the device."""

    temperature: torch.Tensor  # [S] float32; 0 = greedy
    top_k: torch.Tensor  # [S] int64; 0 = off
    top_p: torch.Tensor  # [S] float32; 1 = off
    seed: torch.Tensor  # [S] int64
    step: torch.Tensor  # [S] int64: index of the output token being sampled
    all_greedy: bool  # fast path: plain argmax

    @classmethod
    def build(
        cls,
        params: Sequence[SamplingParams],
        seeds: Sequence[int],
        steps: Sequence[int],
        device: torch.device | str,
    ) -> SamplingTensors:
        """Build on the host (one tensor per field), then copy to `device` without blocking: from
        pinned memory on CUDA, since a copy from pageable memory may wait for the stream (a
        lookahead step would wait for the step before it)."""
        pin = torch.device(device).type == "cuda"

        def put(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, pin_memory=pin).to(device, non_blocking=True)

        return cls(
            temperature=put([p.temperature for p in params], torch.float32),
            top_k=put([p.top_k for p in params], torch.int64),
            top_p=put([p.top_p for p in params], torch.float32),
            seed=put([(s + 2**63) % 2**64 - 2**63 for s in seeds], torch.int64),  # any int -> its 64 bits
            step=put(list(steps), torch.int64),
            all_greedy=all(p.is_greedy for p in params),
        )

    def select(self, rows: torch.Tensor) -> SamplingTensors:
        """The same parameters for a subset (or repetition) of rows: rows [N] int64 on the device."""
        return SamplingTensors(
            self.temperature[rows], self.top_k[rows], self.top_p[rows], self.seed[rows], self.step[rows],
            self.all_greedy,
        )


# --- counter-based noise ----------------------------------------------------------------------------------
# 32-bit arithmetic carried in int64 tensors: every value stays in [0, 2^32) and every product below 2^63,
# so nothing relies on signed overflow (torch has no uint64 arithmetic).
_MASK32 = 0xFFFFFFFF
_GOLDEN32 = 0x9E3779B9


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for x in [0, 2^32) and a 32-bit constant c, split so no product passes 2^48."""
    hi = (x * (c >> 16)).bitwise_and_(0xFFFF).bitwise_left_shift_(16)
    return (x * (c & 0xFFFF)).add_(hi).bitwise_and_(_MASK32)


def _fmix32(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's finalizer: a bijection on [0, 2^32) with full avalanche."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x.bitwise_xor_(x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x.bitwise_xor_(x >> 16)


def _row_keys(seed: torch.Tensor, step: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two 32-bit keys per row from (seed, step). seed, step: [S] int64 -> ([S], [S])."""
    seed_lo = seed & _MASK32
    seed_hi = (seed >> 32) & _MASK32  # arithmetic shift, then mask: the high 32 bits of the int64
    k = _fmix32((seed_hi + _GOLDEN32) & _MASK32)
    k = _fmix32(k ^ seed_lo)
    k1 = _fmix32(k ^ (step & _MASK32))
    k2 = _fmix32((k1 + _GOLDEN32) & _MASK32)
    return k1, k2


def uniform_noise(seed: torch.Tensor, step: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Uniform (0, 1) noise that depends only on (seed, step, token id), never on the rest of the batch.

    seed, step: [S] int64; token_ids: [S, N] int64 in [0, 2^32) -> [S, N] float32.
    """
    k1, k2 = _row_keys(seed, step)  # [S], [S]
    h = _fmix32(_fmix32(token_ids ^ k1[:, None]).add_(k2[:, None]).bitwise_and_(_MASK32))  # [S, N]
    # Top 23 bits as an odd 24-bit integer: exact in float32, and u stays strictly inside (0, 1).
    return ((h >> 9) * 2 + 1).to(torch.float32) * (1.0 / (1 << 24))


def sample_tokens(
    logits: torch.Tensor, params: Sequence[SamplingParams], seeds: Sequence[int], steps: Sequence[int]
) -> list[int]:
    """One step's token ids (a host sync): `sample_ids`, read back."""
    return sample_ids(logits, params, seeds, steps).tolist()


def sample_ids(
    logits: torch.Tensor, params: Sequence[SamplingParams], seeds: Sequence[int], steps: Sequence[int]
) -> torch.Tensor:
    """One step's token ids [S] int64 on logits' device, without waiting for them. An all-greedy
    batch is a plain argmax: no sampling tensors are built, which matters for a 5 ms decode step."""
    if all(p.is_greedy for p in params):
        if logits.is_cuda:  # two short Triton launches instead of torch's one long reduction
            from aioffload.worker.argmax import argmax_rows

            return argmax_rows(logits)
        return logits.argmax(dim=-1)
    return sample(logits, SamplingTensors.build(params, seeds, steps, logits.device))


def _filtered_sorted(logits: torch.Tensor, t: SamplingTensors) -> tuple[torch.Tensor, torch.Tensor]:
    """Temperature, top-k, top-p. logits: [S, V] float32 -> (scaled logits in descending order with
    -inf outside top-k and the nucleus [S, V], their token ids [S, V])."""
    vocab = logits.shape[-1]
    is_greedy = t.temperature < MIN_TEMPERATURE  # [S]
    scaled = logits / torch.where(is_greedy, 1.0, t.temperature)[:, None]  # [S, V]
    # Stable, so ties keep index order and top_k=1 agrees with argmax.
    sorted_logits, sorted_ids = scaled.sort(dim=-1, descending=True, stable=True)  # [S, V], [S, V]

    ranks = torch.arange(vocab, device=logits.device)  # [V]
    k = torch.where(t.top_k > 0, t.top_k, vocab)  # [S]
    sorted_logits.masked_fill_(ranks[None, :] >= k[:, None], float("-inf"))

    probs = sorted_logits.softmax(dim=-1)  # [S, V]
    mass_before = probs.cumsum(dim=-1).sub_(probs)  # [S, V]; exactly 0 at rank 0, so the top token stays
    outside_nucleus = (mass_before >= t.top_p[:, None]) & (t.top_p < 1)[:, None]  # [S, V]
    sorted_logits.masked_fill_(outside_nucleus, float("-inf"))
    return sorted_logits, sorted_ids


def _gumbel(seed: torch.Tensor, step: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """-log(-log u) with u = uniform_noise(seed, step, token id): [S, N] float32."""
    return uniform_noise(seed, step, token_ids).log_().neg_().log_().neg_()


def sample(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """Pick one token per row. logits: [S, V] (any float dtype) -> token ids [S] int64 on logits' device.

    Order: temperature, top-k, top-p, then Gumbel-max with hash noise keyed by (seed, step, token id).
    """
    logits = logits.float()  # [S, V]
    greedy_ids = logits.argmax(dim=-1)  # [S]; first index among ties
    if t.all_greedy:
        return greedy_ids
    sorted_logits, sorted_ids = _filtered_sorted(logits, t)
    # Gumbel-max (the exponential race in log space): argmax(logit - log(-log u)) ~ softmax(logit).
    choice = sorted_logits.add_(_gumbel(t.seed, t.step, sorted_ids)).argmax(dim=-1, keepdim=True)  # [S, 1]
    sampled = sorted_ids.gather(-1, choice).squeeze(-1)  # [S]
    return torch.where(t.temperature < MIN_TEMPERATURE, greedy_ids, sampled)


def probs(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """The distribution `sample` draws from, in vocabulary order: [S, V] -> [S, V] float32
    (one-hot at the argmax for greedy rows)."""
    logits = logits.float()
    sorted_logits, sorted_ids = _filtered_sorted(logits, t)
    out = torch.zeros_like(logits).scatter_(-1, sorted_ids, sorted_logits.softmax(dim=-1))  # [S, V]
    one_hot = torch.zeros_like(logits).scatter_(-1, logits.argmax(dim=-1, keepdim=True), 1.0)  # [S, V]
    return torch.where((t.temperature < MIN_TEMPERATURE)[:, None], one_hot, out)


def sample_weights(weights: torch.Tensor, seed: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """One token per row with probability proportional to `weights` (>= 0, not all zero), by the
    same Gumbel race and noise as `sample`. weights: [S, V]; seed, step: [S] -> [S] int64."""
    ids = torch.arange(weights.shape[-1], device=weights.device).expand_as(weights)  # [S, V]
    return weights.log().add_(_gumbel(seed, step, ids)).argmax(dim=-1)

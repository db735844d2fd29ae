"""Logprobs on the device: log_softmax of the raw model logits, the chosen token's value and the top n.

Raw means before penalties, logit_bias, masks, temperature, top-k and top-p: the model's own
distribution, which is what vLLM returns by default and what evaluation harnesses score with.
`PendingLogprobs` starts the device work when the logits are ready (before the in-place
processors touch them) and reads everything back in one copy once the tokens are known.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenLogprob:
    """One token's logprob, and the `num_top` most likely alternatives at its position."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), most likely first


class PendingLogprobs:
    """Log-softmax and top-n of some logits rows, computed now; `resolve` adds the chosen ids."""

    def __init__(self, logits: torch.Tensor, num_top: Sequence[int]) -> None:
        """logits: [N, V] (raw; a copy is taken, so the caller may modify them afterwards);
        num_top: [N] alternatives wanted per row (0..20)."""
        self.num_top = list(num_top)
        self.lp = logits.float().log_softmax(dim=-1)  # [N, V]; a new tensor
        k = max(self.num_top, default=0)
        self.top = self.lp.topk(k, dim=-1) if k else None  # values, ids: [N, k]

    def resolve(self, token_ids: Sequence[int]) -> list[TokenLogprob]:
        """The chosen token per row: [N] ids (host) -> one TokenLogprob per row (one host sync)."""
        ids = torch.tensor(list(token_ids), dtype=torch.int64).to(self.lp.device, non_blocking=True)
        chosen = self.lp.gather(-1, ids[:, None]).squeeze(-1).tolist()  # [N]
        if self.top is None:
            return [TokenLogprob(t, v) for t, v in zip(token_ids, chosen)]
        values, top_ids = self.top.values.tolist(), self.top.indices.tolist()
        return [
            TokenLogprob(t, v, tuple(zip(i[:k], x[:k])))
            for t, v, i, x, k in zip(token_ids, chosen, top_ids, values, self.num_top)
        ]

"""The decoder's tensor-parallel operations: row-parallel sums, the vocabulary-parallel embedding,
and the logits of a vocabulary-parallel lm_head brought to rank 0 (whole, or only their argmax).

Each rank's vocabulary shard has `vocab_rows` rows, the last rank's zero-padded; padded columns
of the local logits are never read.
"""

from __future__ import annotations

import torch

from aioffload.distributed.group import TPGroup
from aioffload.distributed.sharding import TPShard


class ShardOps:
    """What LlamaModel asks of the group: `all_reduce_` after o and down, `embed` for the input."""

    def __init__(self, group: TPGroup, shard: TPShard) -> None:
        self.group, self.shard = group, shard
        self.vocab_lo, self.vocab_hi = shard.vocab
        self.vocab_widths = [hi - lo for lo, hi in (shard.of_rank(r).vocab for r in range(group.size))]

    def all_reduce_(self, x: torch.Tensor) -> torch.Tensor:  # [T, H] partial sums -> the sum
        return self.group.all_reduce_(x)

    def embed(self, table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Rows of token ids [T] from the rank-sharded table [vocab_rows, H] (on the device or the host):
        each rank looks up the ids it holds, zeros elsewhere, and the sum is the embedding. [T, H]"""
        local = ids - self.vocab_lo  # [T]
        mine = (local >= 0) & (local < self.vocab_hi - self.vocab_lo)  # [T]
        idx = torch.where(mine, local, torch.zeros_like(local))
        if table.device != ids.device:  # host-resident table: gather the rows there, copy only them
            rows = table[idx.to(table.device)].to(ids.device, non_blocking=True)
        else:
            rows = table[idx]  # [T, H]
        rows = rows * mine[:, None].to(rows.dtype)
        return self.group.all_reduce_(rows)

    def gather_logits(self, local: torch.Tensor) -> torch.Tensor | None:
        """local [R, vocab_rows] -> the full logits [R, V] on rank 0; None on the other ranks."""
        parts = self.group.gather(local)
        if parts is None:
            return None
        return torch.cat([p[:, :w] for p, w in zip(parts, self.vocab_widths, strict=True)], dim=-1)

    def argmax(self, local: torch.Tensor) -> torch.Tensor | None:
        """The argmax over the whole vocabulary of each row [R] on rank 0 (None elsewhere), the
        first index among equal maxima as torch.argmax gives it: each rank sends its (max, index)."""
        real = local[:, : self.vocab_hi - self.vocab_lo].double()  # [R, n]
        if real.shape[1] == 0:  # a tiny vocabulary leaves the last ranks none
            real = torch.full((local.shape[0], 1), float("-inf"), dtype=torch.float64, device=local.device)
        idx = real.argmax(dim=-1, keepdim=True)  # [R, 1]
        best = torch.cat([real.gather(-1, idx), (idx + self.vocab_lo).double()], dim=-1)  # [R, 2]
        parts = self.group.gather(best)
        if parts is None:
            return None
        stacked = torch.stack(parts)  # [N, R, 2]; ranks hold ascending vocabulary ranges
        winner = stacked[:, :, 0].argmax(dim=0)  # [R]: the lowest rank among equal maxima
        rows = torch.arange(stacked.shape[1], device=stacked.device)
        return stacked[winner, rows, 1].long()

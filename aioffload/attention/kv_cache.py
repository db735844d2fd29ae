"""Paged KV cache: a block pool, per-sequence block tables, slot mapping, and the tensors.

The allocator (`BlockPool`, `BlockManager`) is plain Python, testable without torch;
`KVCache` owns the per-layer tensors. The scheduler asks only "slots for N tokens?"
(`BlockManager.allocate_slots`) and gets True or False; it never sees a tensor.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


class BlockPool:
    """Fixed-size pool of KV blocks handed out by id, with reference counts."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._ref_counts = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def allocate(self, n: int) -> list[int] | None:
        """Return n fresh block ids (ref count 1), or None when fewer than n are free."""
        if n > len(self._free):
            return None
        blocks = [self._free.popleft() for _ in range(n)]
        for b in blocks:
            self._ref_counts[b] = 1
        return blocks

    def incref(self, block_ids: Sequence[int]) -> None:
        for b in block_ids:
            assert self._ref_counts[b] > 0, f"block {b} is not allocated"
            self._ref_counts[b] += 1

    def free(self, block_ids: Sequence[int]) -> None:
        """Drop one reference from each block; blocks reaching zero return to the pool."""
        for b in block_ids:
            assert self._ref_counts[b] > 0, f"double free of block {b}"
            self._ref_counts[b] -= 1
            if self._ref_counts[b] == 0:
                self._free.append(b)


class BlockManager:
    """Per-sequence block tables on top of a BlockPool."""

    def __init__(self, pool: BlockPool) -> None:
        self.pool = pool
        self.block_size = pool.block_size
        self._tables: dict[Hashable, list[int]] = {}

    def blocks_needed(self, seq_id: Hashable, num_tokens: int) -> int:
        """Extra blocks seq_id needs so its table covers num_tokens tokens in total."""
        have = len(self._tables.get(seq_id, ()))
        return max(0, -(-num_tokens // self.block_size) - have)

    def can_allocate(self, seq_id: Hashable, num_tokens: int) -> bool:
        return self.blocks_needed(seq_id, num_tokens) <= self.pool.num_free

    def allocate_slots(self, seq_id: Hashable, num_tokens: int) -> bool:
        """Grow seq_id's table to cover num_tokens tokens. All or nothing: False = no space."""
        need = self.blocks_needed(seq_id, num_tokens)
        if need == 0:
            self._tables.setdefault(seq_id, [])
            return True
        blocks = self.pool.allocate(need)
        if blocks is None:
            return False
        self._tables.setdefault(seq_id, []).extend(blocks)
        return True

    def fork(self, parent: Hashable, child: Hashable) -> None:
        """child shares every block of parent (ref counts rise)."""
        table = list(self._tables[parent])
        self.pool.incref(table)
        self._tables[child] = table

    def truncate(self, seq_id: Hashable, num_tokens: int) -> int:
        """Shrink seq_id's table to the blocks that cover its first num_tokens tokens (rolling back
        rejected speculative slots); blocks past that end return to the pool. Returns how many."""
        table = self._tables.get(seq_id)
        keep = -(-num_tokens // self.block_size)
        if table is None or len(table) <= keep:
            return 0
        dropped = table[keep:]
        del table[keep:]
        self.pool.free(dropped)
        return len(dropped)

    def free(self, seq_id: Hashable) -> None:
        """Return every block of seq_id at once; unknown ids are a no-op."""
        table = self._tables.pop(seq_id, None)
        if table:
            self.pool.free(table)

    def block_table(self, seq_id: Hashable) -> list[int]:
        return self._tables.get(seq_id, [])

    def has(self, seq_id: Hashable) -> bool:
        return seq_id in self._tables

    @property
    def usage(self) -> float:
        """Fraction of the pool in use, 0..1."""
        return 1.0 - self.pool.num_free / self.pool.num_blocks


def slot_mapping(block_table: Sequence[int], start: int, end: int, block_size: int) -> list[int]:
    """Flat cache slots of token positions [start, end) of a sequence."""
    return [block_table[p // block_size] * block_size + p % block_size for p in range(start, end)]


def kv_bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, elem_size: int) -> int:
    """Bytes of K and V for one block across all layers."""
    return 2 * num_layers * block_size * num_kv_heads * head_dim * elem_size


class KVCache:
    """Per-layer K and V tensors, each [num_blocks + 1, block_size, Hkv, D].

    The extra last block is a trash block: padding tokens (CUDA-graph padding) write
    to `trash_slot`, so every write is a plain index_put with no masking.
    """

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        import torch

        self.num_blocks = num_blocks
        self.block_size = block_size
        shape = (num_blocks + 1, block_size, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @property
    def trash_slot(self) -> int:
        return self.num_blocks * self.block_size

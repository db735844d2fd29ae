"""Paged KV cache: a block pool, per-sequence block tables, slot mapping, and the tensors.

The allocator (`BlockPool`, `BlockManager`) is plain Python, testable without torch;
`KVCache` owns the per-layer tensors. The scheduler asks only "slots for N tokens?"
(`BlockManager.allocate_slots`) and gets True or False; it never sees a tensor.

Sharing: `fork` gives a child the parent's blocks (reference counts rise). A sequence about to
write into a block it shares (ref count > 1) first gets a private copy of it (copy-on-write): the
manager swaps a fresh block into its table and records `(src, dst)`; the scheduler hands the
pending pairs (`take_copies`) to the worker, which copies the block contents
(`KVCache.copy_blocks`) before the step's forward. The last sharer writes in place.
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
        self._sharing: set[Hashable] = set()  # sequences that took part in a fork: they may hold shared blocks
        self._copies: list[tuple[int, int]] = []  # copy-on-write (src, dst) pairs the worker has yet to copy

    def blocks_needed(self, seq_id: Hashable, num_tokens: int) -> int:
        """Extra blocks seq_id needs so its table covers num_tokens tokens in total."""
        have = len(self._tables.get(seq_id, ()))
        return max(0, -(-num_tokens // self.block_size) - have)

    def can_allocate(self, seq_id: Hashable, num_tokens: int) -> bool:
        return self.blocks_needed(seq_id, num_tokens) <= self.pool.num_free

    def allocate_slots(self, seq_id: Hashable, num_tokens: int, first_write: int | None = None) -> bool:
        """Grow seq_id's table to cover num_tokens tokens. All or nothing: False = no space.

        `first_write`: the first position the step writes. A block of [first_write, num_tokens) that
        seq_id shares with another sequence is replaced by a private copy (copy-on-write; the pair is
        queued for `take_copies`). Only sequences that took part in a fork can share a block.
        """
        shared: list[int] = []
        if self._sharing and first_write is not None and seq_id in self._sharing:
            shared = self._shared_written(seq_id, first_write, num_tokens)
        need = self.blocks_needed(seq_id, num_tokens)
        if need == 0 and not shared:
            self._tables.setdefault(seq_id, [])
            return True
        blocks = self.pool.allocate(need + len(shared))
        if blocks is None:
            return False
        table = self._tables.setdefault(seq_id, [])
        for i, dst in zip(shared, blocks[need:]):
            src = table[i]
            self._copies.append((src, dst))
            table[i] = dst
            self.pool.free([src])  # one reference fewer; the other sharers keep it
        table.extend(blocks[:need])
        return True

    def _shared_written(self, seq_id: Hashable, first_write: int, num_tokens: int) -> list[int]:
        """Indices in seq_id's table of the blocks that [first_write, num_tokens) writes and others share."""
        table = self._tables.get(seq_id, ())
        bs = self.block_size
        end = min(len(table), -(-num_tokens // bs))
        return [i for i in range(first_write // bs, end) if self.pool.ref_count(table[i]) > 1]

    def fork(self, parent: Hashable, child: Hashable, num_tokens: int | None = None) -> None:
        """child shares parent's blocks that cover its first num_tokens tokens (all of them when None);
        ref counts rise. The shared partial last block is copied for whichever writes into it first."""
        table = self._tables[parent]
        if num_tokens is not None:
            table = table[: -(-num_tokens // self.block_size)]
        table = list(table)
        self.pool.incref(table)
        self._tables[child] = table
        self._sharing.update((parent, child))

    def take_copies(self) -> list[tuple[int, int]]:
        """The copy-on-write (src, dst) block pairs queued since the last call, in order, at most one per
        dst (a dst freed and handed out again within the same step keeps only its last copy)."""
        if not self._copies:
            return []
        last = {dst: src for src, dst in self._copies}
        self._copies = []
        return [(src, dst) for dst, src in last.items()]

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
        self._sharing.discard(seq_id)
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


def gather_positions(cache: torch.Tensor, block_table: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """[end - start, Hkv, D]: one sequence's keys (or values) at positions start .. end - 1, in
    position order, from a [num_blocks + 1, block_size, Hkv, D] cache through its block table."""
    bs = cache.shape[1]
    first = start // bs
    blocks = cache[block_table[first : -(-end // bs)].long()].flatten(0, 1)  # [blocks x block_size, Hkv, D]
    return blocks[start - first * bs : end - first * bs]


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

    def copy_blocks(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Copy block src's K and V to block dst in every layer, for each (src, dst). Every read happens
        before any write (one gather, one scatter per tensor), and dsts are distinct."""
        if not pairs:
            return
        import torch

        device = self.k[0].device
        pin = device.type == "cuda"  # a copy from pageable memory may wait for the stream
        src = torch.tensor([p[0] for p in pairs], dtype=torch.int64, pin_memory=pin).to(device, non_blocking=True)
        dst = torch.tensor([p[1] for p in pairs], dtype=torch.int64, pin_memory=pin).to(device, non_blocking=True)
        for t in (*self.k, *self.v):
            t.index_copy_(0, dst, t.index_select(0, src))  # [N + 1, bs, Hkv, D]

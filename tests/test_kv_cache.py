"""Block pool, block manager, slot mapping and the KV tensors."""

from __future__ import annotations

import pytest
import torch

from aioffload.attention.kv_cache import (
    BlockManager,
    BlockPool,
    KVCache,
    gather_positions,
    kv_bytes_per_block,
    slot_mapping,
)


def manager(num_blocks: int = 8, block_size: int = 4) -> BlockManager:
    return BlockManager(BlockPool(num_blocks, block_size))


def state(bm: BlockManager) -> tuple:
    """Everything observable about a manager, for all-or-nothing checks."""
    pool = bm.pool
    return (
        pool.num_free,
        tuple(pool.ref_count(b) for b in range(pool.num_blocks)),
        tuple(sorted((str(k), tuple(v)) for k, v in bm._tables.items())),
    )


def test_pool_rejects_empty_shapes():
    with pytest.raises(ValueError, match="num_blocks >= 1 and block_size >= 1"):
        BlockPool(0, 16)
    with pytest.raises(ValueError, match="got 4, 0"):
        BlockPool(4, 0)


def test_pool_allocate_distinct_blocks_with_ref_one():
    pool = BlockPool(6, 16)
    a = pool.allocate(4)
    assert a is not None and len(set(a)) == 4 and all(0 <= b < 6 for b in a)
    assert pool.num_free == 2
    assert [pool.ref_count(b) for b in a] == [1, 1, 1, 1]
    assert pool.allocate(3) is None and pool.num_free == 2
    b = pool.allocate(2)
    assert b is not None and set(a) | set(b) == set(range(6)) and pool.num_free == 0
    assert pool.allocate(0) == []
    pool.free(a)
    assert pool.num_free == 4 and all(pool.ref_count(x) == 0 for x in a)


def test_allocate_exact_blocks_for_tokens():
    bm = manager(8, 4)
    assert bm.blocks_needed("a", 9) == 3
    assert bm.allocate_slots("a", 9)
    assert len(bm.block_table("a")) == 3 and bm.pool.num_free == 5
    assert bm.blocks_needed("a", 12) == 0 and bm.blocks_needed("a", 13) == 1
    assert bm.allocate_slots("a", 12) and len(bm.block_table("a")) == 3  # still fits
    assert bm.allocate_slots("a", 2) and len(bm.block_table("a")) == 3  # never shrinks


def test_zero_tokens_registers_sequence_without_blocks():
    bm = manager()
    assert not bm.has("a")
    assert bm.allocate_slots("a", 0)
    assert bm.has("a") and bm.block_table("a") == [] and bm.pool.num_free == 8


@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_growth_one_token_at_a_time_allocates_at_block_boundaries(block_size):
    bm = manager(64, block_size)
    grew_at = []
    for n in range(1, 4 * block_size + 2):
        before = len(bm.block_table("s"))
        assert bm.allocate_slots("s", n)
        after = len(bm.block_table("s"))
        assert after - before in (0, 1)
        if after > before:
            grew_at.append(n)
        assert after == -(-n // block_size)
        assert bm.pool.num_free == 64 - after
    # A new block exactly when token n-1 (0-based) starts a block: n - 1 is a multiple of block_size.
    assert grew_at == [k * block_size + 1 for k in range(5)]


def test_free_returns_every_block():
    bm = manager(10, 4)
    assert bm.allocate_slots("a", 13)  # 4 blocks
    assert bm.allocate_slots("b", 5)  # 2 blocks
    a, b = list(bm.block_table("a")), list(bm.block_table("b"))
    assert not set(a) & set(b)
    assert bm.pool.num_free == 4
    bm.free("a")
    assert bm.pool.num_free == 8 and not bm.has("a") and bm.block_table("a") == []
    assert all(bm.pool.ref_count(x) == 0 for x in a) and all(bm.pool.ref_count(x) == 1 for x in b)
    bm.free("b")
    assert bm.pool.num_free == 10 and bm.usage == 0.0
    bm.free("b")  # unknown ids are a no-op
    bm.free("never-seen")
    assert bm.pool.num_free == 10
    # Freed blocks are reusable: the whole pool can be handed out again.
    assert bm.allocate_slots("c", 40) and sorted(bm.block_table("c")) == list(range(10))


def test_truncate_gives_back_blocks_past_the_new_end():
    bm = manager(10, 4)
    assert bm.allocate_slots("a", 13)  # 4 blocks: a decode token plus proposals
    assert bm.allocate_slots("b", 3)
    a = list(bm.block_table("a"))
    assert bm.truncate("a", 9) == 1  # 9 tokens need 3 blocks
    assert bm.block_table("a") == a[:3] and bm.pool.num_free == 6 and bm.pool.ref_count(a[3]) == 0
    assert bm.truncate("a", 12) == 0  # exactly 3 blocks: nothing more
    assert bm.truncate("a", 13) == 0  # never grows
    assert bm.truncate("a", 1) == 2 and bm.block_table("a") == a[:1]
    assert bm.truncate("a", 0) == 1 and bm.block_table("a") == [] and bm.has("a")
    assert bm.truncate("unknown", 0) == 0
    assert bm.allocate_slots("a", 5) and len(bm.block_table("a")) == 2  # grows again from the new end
    bm.free("a")
    bm.free("b")
    assert bm.pool.num_free == 10


def test_double_free_in_pool_is_caught():
    pool = BlockPool(2, 4)
    blocks = pool.allocate(1)
    pool.free(blocks)
    with pytest.raises(AssertionError, match="double free"):
        pool.free(blocks)


def test_fork_shares_blocks_until_both_free():
    bm = manager(8, 4)
    assert bm.allocate_slots("parent", 10)  # 3 blocks
    table = list(bm.block_table("parent"))
    bm.fork("parent", "child")
    assert bm.block_table("child") == table
    assert bm.block_table("child") is not bm.block_table("parent")
    assert [bm.pool.ref_count(b) for b in table] == [2, 2, 2]
    assert bm.pool.num_free == 5
    bm.free("parent")
    assert [bm.pool.ref_count(b) for b in table] == [1, 1, 1]
    assert bm.pool.num_free == 5  # still held by the child
    assert bm.block_table("child") == table
    bm.free("child")
    assert [bm.pool.ref_count(b) for b in table] == [0, 0, 0]
    assert bm.pool.num_free == 8


def test_fork_then_child_grows_own_blocks():
    bm = manager(8, 4)
    assert bm.allocate_slots("p", 8)  # 2 full blocks
    bm.fork("p", "c")
    assert bm.allocate_slots("c", 9)
    shared, own = bm.block_table("c")[:2], bm.block_table("c")[2]
    assert shared == bm.block_table("p") and own not in shared
    assert bm.pool.ref_count(own) == 1 and all(bm.pool.ref_count(b) == 2 for b in shared)
    bm.free("c")
    assert bm.pool.num_free == 6 and all(bm.pool.ref_count(b) == 1 for b in shared)


def test_exhaustion_is_all_or_nothing():
    bm = manager(5, 4)
    assert bm.allocate_slots("a", 12)  # 3 blocks
    assert bm.allocate_slots("b", 4)  # 1 block
    before = state(bm)
    assert not bm.can_allocate("b", 13)  # needs 3 more, 1 free
    assert bm.allocate_slots("b", 13) is False  # no exception
    assert state(bm) == before
    assert bm.allocate_slots("new", 9) is False
    assert state(bm) == before and not bm.has("new")
    assert bm.can_allocate("b", 8) and bm.allocate_slots("b", 8)  # exactly the last block
    assert bm.pool.num_free == 0 and bm.usage == 1.0
    assert bm.allocate_slots("b", 9) is False
    assert bm.pool.allocate(1) is None


def test_usage_fraction():
    bm = manager(8, 2)
    assert bm.usage == 0.0
    bm.allocate_slots("a", 3)  # 2 blocks
    assert bm.usage == pytest.approx(2 / 8)
    bm.allocate_slots("b", 6)  # 3 blocks
    assert bm.usage == pytest.approx(5 / 8)
    bm.fork("b", "c")  # shared blocks do not count twice
    assert bm.usage == pytest.approx(5 / 8)
    bm.free("a")
    assert bm.usage == pytest.approx(3 / 8)


def test_slot_mapping_values():
    table = [7, 2, 5]
    assert slot_mapping(table, 0, 4, 4) == [28, 29, 30, 31]
    assert slot_mapping(table, 3, 9, 4) == [31, 8, 9, 10, 11, 20]
    assert slot_mapping(table, 11, 12, 4) == [23]
    assert slot_mapping(table, 5, 5, 4) == []
    assert slot_mapping([3, 0], 0, 4, 2) == [6, 7, 0, 1]


def test_slot_mapping_is_the_flat_index_of_the_cache():
    """A token written at slot s lands in block table[p // bs], row p % bs of a [N + 1, bs, H, D] cache."""
    kv = KVCache(1, 6, 4, 2, 3, torch.float32, "cpu")
    table = [4, 0, 3]
    slots = slot_mapping(table, 0, 10, 4)
    flat = kv.k[0].view(-1, 2, 3)
    values = torch.arange(10 * 6, dtype=torch.float32).view(10, 2, 3)
    flat[torch.tensor(slots)] = values
    for p in range(10):
        assert torch.equal(kv.k[0][table[p // 4], p % 4], values[p])


def test_kv_cache_shapes_and_trash_slot():
    kv = KVCache(3, 10, 16, 2, 8, torch.float16, "cpu")
    assert len(kv.k) == len(kv.v) == 3
    for t in kv.k + kv.v:
        assert t.shape == (11, 16, 2, 8) and t.dtype == torch.float16 and t.device.type == "cpu"
        assert torch.count_nonzero(t) == 0
    assert len({t.data_ptr() for t in kv.k + kv.v}) == 6  # no aliasing between layers or K/V
    assert kv.trash_slot == 160
    # The trash slot is the first row of the extra block: past every real slot, inside the tensor.
    assert max(slot_mapping(list(range(10)), 0, 160, 16)) == kv.trash_slot - 1
    kv.k[0].view(-1, 2, 8)[kv.trash_slot] = 1.0
    assert torch.count_nonzero(kv.k[0][:10]) == 0 and torch.count_nonzero(kv.k[0][10, 0]) == 16


def test_kv_bytes_per_block():
    assert kv_bytes_per_block(32, 16, 8, 128, 2) == 2 * 32 * 16 * 8 * 128 * 2
    kv = KVCache(2, 3, 4, 2, 8, torch.float32, "cpu")
    one_block = sum(t[0].numel() * t.element_size() for t in kv.k + kv.v)
    assert kv_bytes_per_block(2, 4, 2, 8, 4) == one_block


def test_fork_of_a_prefix_shares_only_the_blocks_covering_it():
    bm = manager(8, 4)
    assert bm.allocate_slots("p", 9)  # 3 blocks; position 8 starts the third
    bm.fork("p", "c", num_tokens=8)  # positions 0..7: two full blocks, the third is not shared
    assert bm.block_table("c") == bm.block_table("p")[:2]
    assert [bm.pool.ref_count(b) for b in bm.block_table("p")] == [2, 2, 1]
    bm.fork("p", "d", num_tokens=6)  # positions 0..5: a full block and a partial one
    assert bm.block_table("d") == bm.block_table("p")[:2]
    assert [bm.pool.ref_count(b) for b in bm.block_table("p")] == [3, 3, 1]


def test_copy_on_write_of_the_shared_partial_block():
    bm = manager(8, 4)
    assert bm.allocate_slots("p", 6)  # block 0 full, block 1 holds positions 4, 5
    p0, p1 = bm.block_table("p")
    bm.fork("p", "a")
    bm.fork("p", "b")
    assert bm.pool.ref_count(p1) == 3
    # "a" writes position 6 into the shared partial block: it gets a private copy first
    assert bm.allocate_slots("a", 7, first_write=6)
    a = bm.block_table("a")
    assert a[0] == p0 and a[1] not in (p0, p1)
    assert bm.take_copies() == [(p1, a[1])]
    assert bm.take_copies() == []  # handed out once
    assert bm.pool.ref_count(p1) == 2 and bm.pool.ref_count(a[1]) == 1 and bm.pool.ref_count(p0) == 3
    # "a" writing on into its own block and a fresh one: nothing shared is written, no copy
    assert bm.allocate_slots("a", 9, first_write=7)
    assert bm.take_copies() == [] and len(bm.block_table("a")) == 3
    # "b" copies too; then "p" is the last holder of p1 and writes in place
    assert bm.allocate_slots("b", 7, first_write=6)
    assert bm.take_copies() == [(p1, bm.block_table("b")[1])]
    assert bm.allocate_slots("p", 7, first_write=6)
    assert bm.take_copies() == [] and bm.block_table("p") == [p0, p1] and bm.pool.ref_count(p1) == 1
    for s in ("a", "b", "p"):
        bm.free(s)
    assert bm.pool.num_free == 8 and all(bm.pool.ref_count(b) == 0 for b in range(8))


def test_copy_on_write_is_all_or_nothing():
    bm = manager(3, 4)
    assert bm.allocate_slots("p", 6)  # 2 blocks, 1 free
    bm.fork("p", "c")
    before = state(bm)
    assert not bm.allocate_slots("c", 9, first_write=6)  # a copy of block 1 and a new block: 2 needed, 1 free
    assert state(bm) == before and bm.take_copies() == []
    assert bm.allocate_slots("c", 7, first_write=6)  # the copy alone fits
    assert bm.pool.num_free == 0 and len(bm.take_copies()) == 1


def test_take_copies_keeps_the_last_copy_of_a_reused_dst():
    bm = manager(6, 4)
    assert bm.allocate_slots("p", 2) and bm.allocate_slots("q", 2)
    bm.fork("p", "a")
    bm.fork("q", "b")
    assert bm.allocate_slots("a", 3, first_write=2)
    dst = bm.block_table("a")[0]
    bm.free("a")  # preempted in the same schedule: its copy's dst goes back to the pool ...
    bm.pool._free.rotate(-bm.pool._free.index(dst))  # ... and is the next block handed out
    assert bm.allocate_slots("b", 3, first_write=2)
    assert bm.block_table("b")[0] == dst
    assert bm.take_copies() == [(bm.block_table("q")[0], dst)]


def test_kv_copy_blocks_copies_every_layer_and_reads_before_writing():
    kv = KVCache(2, 4, 2, 1, 3, torch.float32, "cpu")
    for i, t in enumerate(kv.k + kv.v):
        t.copy_(torch.arange(t.numel(), dtype=torch.float32).view_as(t) + 1000 * i)
    before = [t.clone() for t in kv.k + kv.v]
    kv.copy_blocks([(1, 3), (3, 0)])  # block 0 gets block 3's old contents, not block 1's
    for t, b in zip(kv.k + kv.v, before):
        assert torch.equal(t[3], b[1]) and torch.equal(t[0], b[3])
        assert torch.equal(t[1], b[1]) and torch.equal(t[2], b[2])


def test_gather_positions_reads_the_slots_slot_mapping_names():
    import torch

    cache = torch.arange(10 * 4 * 2 * 3, dtype=torch.float32).reshape(10, 4, 2, 3)  # 10 blocks of 4, Hkv 2, D 3
    table = [7, 2, 5]
    flat = cache.view(-1, 2, 3)
    for start, end in ((0, 12), (3, 9), (4, 8), (11, 12)):
        got = gather_positions(cache, torch.tensor(table), start, end)
        assert torch.equal(got, flat[slot_mapping(table, start, end, 4)]), (start, end)

"""The GPU expert cache's bookkeeping: hits and misses, CLOCK eviction with use counts, pinning, and
why it beats LRU on the layer-cyclic access pattern of MoE decoding."""

from __future__ import annotations

import random

from aioffload.offload.expert_cache import ExpertCache


def test_hits_misses_and_insertion_until_full() -> None:
    c = ExpertCache(3)
    assert c.lookup((0, 1)) is None and (c.hits, c.misses) == (0, 1)
    slots = [c.insert((0, e), pinned=set()) for e in (1, 2, 3)]
    assert sorted(slots) == [0, 1, 2] and c.cached_in_layer(0) == 3
    assert c.lookup((0, 2)) == slots[1] and (c.hits, c.misses) == (1, 1)
    assert c.hit_rate == 0.5


def test_eviction_spares_frequently_used_and_pinned_entries() -> None:
    c = ExpertCache(3)
    for e in range(3):
        c.insert((0, e), set())
    for _ in range(2):
        c.lookup((0, 0))  # count 2: survives two sweeps
    slot = c.insert((1, 9), pinned={(0, 1)})  # (0, 1) pinned, (0, 0) has a count: (0, 2) goes
    assert slot == c.slot_of[(1, 9)] and (0, 2) not in c.slot_of and (0, 1) in c.slot_of
    assert c.cached_in_layer(0) == 2 and c.cached_in_layer(1) == 1
    assert c.count[c.slot_of[(0, 0)]] == 1  # the sweep passed it once


def test_everything_pinned_or_no_capacity_gives_no_slot() -> None:
    c = ExpertCache(2)
    c.insert((0, 0), set())
    c.insert((0, 1), set())
    assert c.insert((0, 2), pinned={(0, 0), (0, 1)}) is None
    assert ExpertCache(0).insert((0, 0), set()) is None


def _replay(use, steps: int, layers: int, hot: int, cold: int, seed: int) -> None:
    """Each step visits layers 0..L-1; per layer one hot expert (of `hot`) and one cold (of `cold`)."""
    rng = random.Random(seed)
    for _ in range(steps):
        for layer in range(layers):
            for e in (rng.randrange(hot), hot + rng.randrange(cold)):
                use((layer, e))


def test_admission_keeps_the_hot_set_where_lru_thrashes() -> None:
    # 12 layers x 4 hot experts = 48 hot entries, plus one-off cold ones, in a 40-slot cache.
    layers, hot, cold, capacity = 12, 4, 500, 40
    clock = ExpertCache(capacity)

    def use_clock(key: tuple[int, int]) -> None:
        if clock.lookup(key) is None:
            clock.insert(key, pinned={key})

    lru: dict[tuple[int, int], None] = {}
    lru_hits = lru_total = 0

    def use_lru(key: tuple[int, int]) -> None:
        nonlocal lru_hits, lru_total
        lru_total += 1
        if key in lru:
            lru_hits += 1
            lru.pop(key)
        elif len(lru) >= capacity:
            lru.pop(next(iter(lru)))
        lru[key] = None

    _replay(use_clock, 200, layers, hot, cold, seed=0)
    _replay(use_lru, 200, layers, hot, cold, seed=0)
    # Half the accesses are cold (never reusable): the best possible is 40 / 48 of the hot half, 0.42.
    # Measured: 0.384 with admission, LRU 0.119 (plain frequency CLOCK without admission: 0.145).
    assert clock.hit_rate > 0.35
    assert lru_hits / lru_total < 0.15


def test_admission_refuses_a_newcomer_routed_less_often_than_its_victim() -> None:
    c = ExpertCache(1)
    for _ in range(3):
        c.lookup((0, 0))
    c.insert((0, 0), set())
    c.count[0] = 0  # its CLOCK count spent: the victim
    assert c.lookup((0, 1)) is None and c.insert((0, 1), set()) is None  # routed once vs three times
    assert c.slot_of == {(0, 0): 0}
    for _ in range(3):
        c.lookup((0, 1))
    assert c.insert((0, 1), set()) == 0 and c.slot_of == {(0, 1): 0}  # now as frequent: admitted


def test_routing_counts_halve_every_window() -> None:
    c = ExpertCache(2)  # window = 64 lookups
    for _ in range(40):
        c.lookup((0, 0))
    for _ in range(24):
        c.lookup((0, 1))
    assert c.freq == {(0, 0): 20, (0, 1): 12}

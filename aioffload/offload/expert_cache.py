"""Bookkeeping of the GPU expert cache: which offloaded (layer, expert) sits in which slot.

No tensors here; the expert stream owns the [capacity, numel] device buffer and asks this
class where an expert is, or where a newly streamed one may go. The policy is a
generalised CLOCK (frequency-aware second chance): a hit raises the entry's count (up
to `max_count`); to make room the hand sweeps the slots, decrementing counts, and takes
the first slot whose count is 0 and which is not pinned by the layer being served.

Why not plain LRU: layers are visited in the same order every step, so with more hot
experts than slots LRU evicts each one just before its layer comes round again (hit rate
0). Under CLOCK with counts, one-off experts (count 0) go at the first sweep while
experts routed step after step keep a count and survive, so a skewed router's hot set
stays resident.
"""

from __future__ import annotations

Key = tuple[int, int]  # (layer, expert)


class ExpertCache:
    def __init__(self, capacity: int, max_count: int = 3) -> None:
        self.capacity = capacity
        self.max_count = max_count
        self.slot_of: dict[Key, int] = {}
        self.key_of: list[Key | None] = [None] * capacity
        self.count = [0] * capacity
        self.per_layer: dict[int, int] = {}  # layer -> cached experts of that layer
        self.hand = 0
        self.hits = 0
        self.misses = 0
        self.freq: dict[Key, int] = {}  # routing counts, cached or not (halved every `window` lookups)
        self.window = max(64, 8 * capacity)
        self._lookups = 0

    def lookup(self, key: Key) -> int | None:
        """`key` is routed: the slot holding it (a hit, its count raised), or None (a miss)."""
        self.freq[key] = self.freq.get(key, 0) + 1
        self._lookups += 1
        if self._lookups >= self.window:
            self._lookups = 0
            self.freq = {k: f // 2 for k, f in self.freq.items() if f > 1}
        slot = self.slot_of.get(key)
        if slot is None:
            self.misses += 1
            return None
        self.hits += 1
        self.count[slot] = min(self.max_count, self.count[slot] + 1)
        return slot

    def peek(self, key: Key) -> int | None:
        """The slot holding `key`, without counting a use (whole-set loads copy every expert)."""
        return self.slot_of.get(key)

    def insert(self, key: Key, pinned: set[Key]) -> int | None:
        """A slot for `key` (not cached), evicting a victim if the cache is full; None when every
        slot is pinned, capacity is 0, or the victim has been routed more often than `key`.
        Entries in `pinned` are never evicted."""
        if self.capacity == 0:
            return None
        for _ in range((self.max_count + 1) * self.capacity + 1):  # every count reaches 0 within this
            slot = self.hand
            self.hand = (self.hand + 1) % self.capacity
            old = self.key_of[slot]
            if old is not None and old in pinned:
                continue
            if old is not None and self.count[slot] > 0:
                self.count[slot] -= 1
                continue
            if old is not None and self.freq.get(key, 0) < self.freq.get(old, 0):
                return None  # not admitted: the victim is the more frequently routed
            if old is not None:
                del self.slot_of[old]
                self.per_layer[old[0]] -= 1
            self.key_of[slot], self.slot_of[key], self.count[slot] = key, slot, 0
            self.per_layer[key[0]] = self.per_layer.get(key[0], 0) + 1
            return slot
        return None

    def cached_in_layer(self, layer: int) -> int:
        return self.per_layer.get(layer, 0)

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 0.0

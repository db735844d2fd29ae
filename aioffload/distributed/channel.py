"""Rank 0's commands to the other ranks, in order, over the rendezvous store.

Not a collective: an idle server sends nothing for hours, and a collective waiting that long
would pass --distributed-timeout. A follower blocks on the store for the next key instead (a
timeout there is harmless and retried) and leaves as soon as the store's host, rank 0 (or
torchrun's agent), goes away. Command n sits under key n; rank 0 numbers them with an atomic
counter in the store, so several of its objects may post, and drops key n - KEEP as it posts n
(the followers are never that far behind: every step and every build waits on all of them).
"""

from __future__ import annotations

import logging
import pickle
from typing import Any

import torch.distributed as dist

from aioffload.distributed.group import store_prefix

log = logging.getLogger("aioffload.distributed")

KEEP = 64
_STOP = b"stop"


class RankZeroGone(RuntimeError):
    """The store went away: rank 0 (or torchrun's agent) has exited."""


class CommandChannel:
    def __init__(self, store: dist.Store) -> None:
        self.store = dist.PrefixStore(store_prefix("cmd"), store)
        self.next = 0  # the command a follower takes next

    def post(self, command: Any) -> None:
        """Rank 0: queue `command` (picklable) for every other rank."""
        self._put(pickle.dumps(command, protocol=pickle.HIGHEST_PROTOCOL))

    def post_stop(self) -> None:
        """Rank 0: the followers' last command (`take` returns None)."""
        self._put(_STOP)

    def _put(self, raw: bytes) -> None:
        n = int(self.store.add("posted", 1)) - 1
        self.store.set(str(n), raw)
        if n >= KEEP:
            self.store.delete_key(str(n - KEEP))

    def take(self) -> Any:
        """Follower: the next command, waiting as long as it takes; None after `post_stop`.
        Raises RankZeroGone when the store's host has exited."""
        key = str(self.next)
        while True:
            try:
                raw = self.store.get(key)
                break
            except dist.DistStoreError as e:
                if "timeout" in str(e).lower():
                    continue  # idle: keep waiting
                raise RankZeroGone(f"the rank-0 store is gone ({str(e).splitlines()[0]})") from e
            except dist.DistError as e:  # a closed connection
                raise RankZeroGone(f"the rank-0 store is gone ({str(e).splitlines()[0]})") from e
        self.next += 1
        return None if raw == _STOP else pickle.loads(raw)

"""A launched step whose token ids are still on the device (decode lookahead, engine/lookahead.py).

`Worker.launch` returns one as soon as the step is queued. Its ids stay on the device, where the
next step can read them as its input tokens (`feed`), and are copied back to pinned host memory
behind the step; `wait` blocks on that copy's event alone, so the host never waits on a step
queued after it.
"""

from __future__ import annotations

import torch


class PendingStep:
    """Token ids [S] int64 of one step, one per chunk, in chunk order."""

    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids  # on the step's device; the next step's feed reads it there
        self._event: torch.cuda.Event | None = None
        if ids.is_cuda:
            self._host = torch.empty(ids.shape, dtype=ids.dtype, pin_memory=True)
            self._host.copy_(ids, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:  # the CPU ran the step already
            self._host = ids
        self._tokens: list[int] | None = None

    def wait(self) -> list[int]:
        """The ids on the host, once the step and its copy back are done."""
        if self._tokens is None:
            if self._event is not None:
                self._event.synchronize()
            self._tokens = self._host.tolist()
        return self._tokens

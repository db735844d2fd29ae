"""Shared pytest fixtures (keep minimal; helpers live in their own modules, e.g. fake_engine.py)."""

from __future__ import annotations

import pytest
import torch

# Tiny models on a 2-core CI machine: one thread is ~10x faster than oversubscribed
# threads when the server under test and pytest share the cores.
torch.set_num_threads(1)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"

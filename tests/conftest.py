"""Shared pytest fixtures (keep minimal; helpers live in their own modules, e.g. fake_engine.py)."""

from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"

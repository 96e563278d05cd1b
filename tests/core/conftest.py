"""Fixtures for the core tests."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _seeded(seed_torch: None) -> None:
    """Every core test starts from its own fixed seed."""

"""Fixtures for the layer tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _seeded(seed_torch: None) -> None:
    """Every layer test starts from its own fixed seed."""


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    """Run the many tiny tensor ops of these tests on one thread.

    Intra-op threads only add hand-off cost at these sizes, and on a busy machine their
    spin-waiting made the grid several times slower. The previous setting is restored.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

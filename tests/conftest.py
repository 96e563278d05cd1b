"""Shared test fixtures: per-test seeding, non-trivial batch-norms, scale-relative closeness.

Helpers are exposed as fixtures (not imports) because ``tests`` is not a package.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

RandomiseBatchNorm = Callable[[nn.Module], None]
AssertScaledClose = Callable[[Tensor, Tensor], None]

TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
}
"""dtype under test -> (rtol, atol relative to the largest |expected|) for "collapsed equals expanded".

The collapse is exact up to rounding, and rounding error is relative to the size of the
values involved, so the absolute tolerance follows the output's magnitude.
"""


@pytest.fixture
def seed_torch(request: pytest.FixtureRequest) -> None:
    """Seed torch from the test id, so every item is reproducible on its own and items differ from each other.

    Not autouse: directories opt in from their own conftest, leaving other tests' RNG alone.
    """
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


def _randomise_batch_norm(module: nn.Module) -> None:
    """Give every batch-norm in ``module`` random running statistics and affine parameters.

    Fresh batch-norms are the identity in eval mode (mean 0, var 1, gamma 1, beta 0),
    which would hide any mistake in how the collapse folds them.
    """
    with torch.no_grad():
        for norm in module.modules():
            if isinstance(norm, nn.modules.batchnorm._BatchNorm):
                norm.running_mean.normal_(0.0, 0.5)
                norm.running_var.uniform_(0.5, 2.0)
                norm.weight.uniform_(0.5, 1.5)
                norm.bias.normal_(0.0, 0.5)


@pytest.fixture
def randomise_batch_norm() -> RandomiseBatchNorm:
    return _randomise_batch_norm


def _assert_scaled_close(actual: Tensor, expected: Tensor) -> None:
    """``assert_close`` with the :data:`TOLERANCES` of ``actual``'s dtype, compared in ``expected``'s dtype.

    A float32 result may be checked against a float64 reference: that isolates its own
    rounding from the reference's.
    """
    rtol, atol_scale = TOLERANCES[actual.dtype]
    scale = expected.detach().abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual.to(expected.dtype), expected, rtol=rtol, atol=atol_scale * scale)


@pytest.fixture
def assert_scaled_close() -> AssertScaledClose:
    return _assert_scaled_close

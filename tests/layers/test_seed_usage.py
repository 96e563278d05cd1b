"""The original research code's usage example runs verbatim (only the imports added) and train == eval outputs."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from epcli import EPConv2d, EPLinear


def test_original_usage_example_runs_and_eval_matches_train(assert_scaled_close: Callable[[Tensor, Tensor], None]) -> None:
    layer = EPLinear(4, 8, width=1, depth=4); x = torch.randn(1, 4)  # noqa: E702
    layer.train(); y1 = layer(x); layer.eval(); y2 = layer(x); print(layer.weight, layer.bias)  # noqa: E702
    assert_scaled_close(y2, y1)

    kernel_sizes = [5, 3, 1]; padding = max((np.sum(kernel_sizes) - len(kernel_sizes) + 1) // 2, 0)  # noqa: E702
    layer = EPConv2d(2, 4, kernel_sizes, padding, depth=len(kernel_sizes)); x = torch.randn(1, 2, 8, 8)  # noqa: E702
    layer.train(); y1 = layer(x); layer.eval(); y2 = layer(x)  # noqa: E702
    assert_scaled_close(y2, y1)
    assert y2.shape == (1, 4, 8, 8)  # "same" padding keeps the map size

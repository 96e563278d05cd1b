"""An independent reference for the collapsed weight and bias: probe the expanded forward.

An EP layer is affine, so its map is fully determined by its response to zero and to
basis inputs (linear) or impulses (conv). Recovering it that way uses only
``layer(x, override=True)`` and never the collapse code.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from epcli import EPConv2d, EPLinear

AssertScaledClose = Callable[[Tensor, Tensor], None]
RandomiseBatchNorm = Callable[[nn.Module], None]

LINEAR_CASES: list[dict[str, Any]] = [
    {"in_features": 4, "out_features": 4, "depth": 1},
    {"in_features": 4, "out_features": 4, "depth": 3, "bias": False},
    {"in_features": 4, "out_features": 3, "depth": 2, "batch_norm": True, "bn_eps": 0.1, "bn_momentum": None},
    {"in_features": 4, "out_features": 4, "depth": 4, "batch_norm": True, "residual": True,
     "residual_intervals": [1, 2]},
    {"in_features": 4, "out_features": 4, "depth": 8, "width": 0.5, "residual": True, "residual_intervals": -1},
    {"in_features": 3, "out_features": 5, "depth": 8, "width": 4, "batch_norm": True, "residual": True,
     "residual_intervals": [2, -1], "residual_mode": "learn"},
    {"in_features": 5, "out_features": 3, "depth": 5, "bias": False, "batch_norm": True, "residual": True,
     "residual_intervals": [1, 2, 4], "residual_mode": "learn"},
]

CONV_CASES: list[dict[str, Any]] = [
    {"in_channels": 2, "out_channels": 3, "kernel_sizes": 3, "padding": 1, "depth": 1},
    {"in_channels": 2, "out_channels": 2, "kernel_sizes": [3, 3], "residual": True, "residual_intervals": 1},
    {"in_channels": 2, "out_channels": 2, "kernel_sizes": [5, 3, 1], "padding": 3, "stride": 2,
     "batch_norm": True, "residual": True, "residual_intervals": [1, 2]},
    {"in_channels": 2, "out_channels": 3, "kernel_sizes": [3] * 8, "padding": 8, "stride": 2, "batch_norm": True,
     "residual": True, "residual_intervals": [2, -1], "residual_mode": "learn"},
    {"in_channels": 3, "out_channels": 2, "kernel_sizes": [1, 3, 5], "bias": False, "residual": True,
     "residual_intervals": 1, "residual_mode": "learn"},
    {"in_channels": 2, "out_channels": 2, "kernel_sizes": 5, "depth": 4, "padding": 2, "width": 0.5,
     "batch_norm": True, "residual": True, "residual_intervals": -1},
    {"in_channels": 2, "out_channels": 2, "kernel_sizes": [3, 3], "padding": 6, "stride": 2, "residual": True,
     "residual_intervals": [1, 2]},
    {"in_channels": 2, "out_channels": 3, "kernel_sizes": [2, 4], "padding": 1, "stride": 2, "batch_norm": True,
     "bn_eps": 0.05},
]


def _case_id(case: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in case.items())


def _prepare(layer: nn.Module, randomise_batch_norm: RandomiseBatchNorm) -> nn.Module:
    randomise_batch_norm(layer)
    return layer.double().eval()


def probe_linear(f: Callable[[Tensor], Tensor], in_features: int) -> tuple[Tensor, Tensor]:
    """(W, b) of an affine map from its response to 0 and to the basis vectors: b = f(0), W[:, i] = f(e_i) - f(0)."""
    inputs = torch.cat([torch.zeros(1, in_features), torch.eye(in_features)]).double()
    response = f(inputs)
    return (response[1:] - response[0]).T, response[0]


@pytest.mark.parametrize("case", LINEAR_CASES, ids=_case_id)
@torch.no_grad()
def test_linear_weight_and_bias_match_probe(
    case: dict[str, Any], randomise_batch_norm: RandomiseBatchNorm, assert_scaled_close: AssertScaledClose
) -> None:
    layer = _prepare(EPLinear(**case), randomise_batch_norm)
    weight, bias = probe_linear(lambda x: layer(x, override=True), case["in_features"])
    assert_scaled_close(layer.weight, weight)
    if layer.bias is None:
        assert torch.count_nonzero(bias) == 0
    else:
        assert_scaled_close(layer.bias, bias)


def probe_conv(layer: EPConv2d, extra: int) -> tuple[Tensor, Tensor]:
    """(kernel, bias map of f(0)) of a conv layer from impulses.

    Output position t0 >= ceil(padding / stride) reads padded-input rows t0 * stride .. + K - 1,
    i.e. input rows from t0 * stride - padding >= 0: wholly inside an input of that many rows
    plus K (plus ``extra``, to vary the size's parity). An impulse at offset (a, b) of that
    window then gives kernel[:, :, a, b] + bias at output (t0, t0).
    """
    k, stride, padding, channels = layer.kernel_size[0], layer.stride[0], layer.padding[0], layer.in_channels
    t0 = math.ceil(padding / stride)
    start = t0 * stride - padding
    size = start + k + extra
    impulses = torch.zeros(channels, k, k, channels, size, size, dtype=torch.float64)
    for c in range(channels):
        for a in range(k):
            for b in range(k):
                impulses[c, a, b, c, start + a, start + b] = 1.0
    inputs = torch.cat([torch.zeros(1, channels, size, size, dtype=torch.float64), impulses.flatten(0, 2)])
    response = layer(inputs, override=True)
    zero = response[0]
    at_t0 = response[1:, :, t0, t0] - zero[:, t0, t0]  # [C_in * K * K, C_out]
    return at_t0.T.reshape(-1, channels, k, k), zero


@pytest.mark.parametrize("extra", [0, 1], ids=["size+0", "size+1"])
@pytest.mark.parametrize("case", CONV_CASES, ids=_case_id)
@torch.no_grad()
def test_conv_weight_and_bias_match_impulse_probe(
    case: dict[str, Any], extra: int, randomise_batch_norm: RandomiseBatchNorm, assert_scaled_close: AssertScaledClose
) -> None:
    layer = _prepare(EPConv2d(**case), randomise_batch_norm)
    kernel, zero_response = probe_conv(layer, extra)
    assert_scaled_close(layer.weight, kernel)
    if layer.bias is None:
        assert torch.count_nonzero(zero_response) == 0
    else:
        # f(0) is the bias at every output position, including those that read zero padding
        assert_scaled_close(layer.bias[:, None, None].expand_as(zero_response), zero_response)

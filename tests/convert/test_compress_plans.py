"""Layer plans and factored copies: the whitened truncation of a conv (its input patches taken with the layer's own
stride, padding mode, dilation and groups) costs exactly the discarded energy on the calibration data."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from epcli.convert.compress import factored_copy, layer_plans
from epcli.layers.lowrank import LowRankConv, LowRankLinear


@pytest.mark.parametrize(
    ("layer", "spatial"),
    [
        (nn.Conv1d(4, 6, 3, stride=2, padding=2, dilation=2, padding_mode="circular"), (19,)),
        (nn.Conv2d(4, 8, (3, 2), stride=(1, 2), padding=1, groups=2, padding_mode="reflect"), (9, 8)),
        (nn.Conv3d(3, 6, 2, padding=1, groups=3, padding_mode="replicate"), (4, 5, 3)),
        (nn.Linear(12, 7), ()),
    ],
    ids=["conv1d", "conv2d-groups", "conv3d-depthwise", "linear"],
)
def test_whitened_output_error_is_the_discarded_energy(layer, spatial):
    model = nn.Sequential(layer).double().eval()
    in_features = layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels
    x = torch.randn(16, in_features, *spatial, dtype=torch.float64)
    plans = layer_plans(model, [(x,)], whiten=True, ridge=0.0)
    plan = plans["0"]
    rank = max(1, plan.full_rank // 2)

    factored = factored_copy(model, plans, {"0": rank})

    assert isinstance(factored[0], (LowRankLinear, LowRankConv)) and isinstance(model[0], type(layer))
    with torch.no_grad():
        error = float((factored(x) - model(x)).square().sum())
    discarded = sum(t.discarded_energy(rank) for t in plan.truncations)
    assert error == pytest.approx(discarded, rel=1e-6)
    assert plan.tails[rank] == pytest.approx(discarded / sum(t.discarded_energy(0) for t in plan.truncations))
    assert sum(p.numel() for p in factored.parameters()) == plan.factored_params(rank)
    with torch.no_grad():
        full = factored_copy(model, plans, {"0": plan.full_rank})(x)
    torch.testing.assert_close(full, model(x), atol=1e-9, rtol=0)


def test_costs_count_every_output_position():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2)).eval()  # 9x9 -> 4x4
    plan = layer_plans(model, [(torch.randn(2, 3, 9, 9),)], whiten=False)["0"]
    assert plan.positions == 16 and plan.macs == 8 * 3 * 9 * 16
    assert plan.factored_macs(2) == (2 * 3 * 9 + 8 * 2) * 16
    assert plan.rank_limit == (8 * 27 - 1) // (27 + 8)  # the largest rank with fewer weights: 6

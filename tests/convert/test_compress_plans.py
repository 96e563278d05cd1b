"""Layer plans and factored models: the whitened truncation of a conv (its input patches taken with the layer's own
stride, padding mode, dilation and groups) costs exactly the discarded energy on the calibration data; a candidate
is measured on views of the kept factors, in the model's place, and the model is put back."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from epcli.convert.compress import factor_in_place, factored, layer_plans
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
    with torch.no_grad():
        want = model(x)

    for rank in sorted({1, max(1, plan.full_rank // 2), plan.rank_limit}):
        with factored(model, plans, {"0": rank}) as candidate, torch.no_grad():
            assert candidate is model and isinstance(model[0], (LowRankLinear, LowRankConv))
            error = float((candidate(x) - want).square().sum())
            params = sum(p.numel() for p in candidate.parameters())
        assert model[0] is layer  # put back
        discarded = sum(f.discarded_energy(rank) for f in plan.factors)
        assert error == pytest.approx(discarded, rel=1e-6)
        assert plan.tails[rank] == pytest.approx(discarded / sum(f.discarded_energy(0) for f in plan.factors))
        assert params == plan.factored_params(rank)
    assert plan.rank_limit < plan.full_rank  # nothing past the rank limit is kept
    with pytest.raises(ValueError, match="rank must be in"):
        plan.factors[0].factors(plan.rank_limit + 1)


def _storage(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def test_a_candidate_holds_views_of_the_factors_and_the_result_owns_copies():
    model = nn.Sequential(nn.Linear(24, 20), nn.ReLU(), nn.Conv1d(20, 16, 1)).eval()
    x = torch.randn(8, 24)
    plans = layer_plans(nn.Sequential(model[0]), [(x,)], whiten=False)
    ranks, kept = {"0": 3}, plans["0"].factors[0]
    with factored(model, plans, ranks):
        assert _storage(model[0].down.weight) == _storage(kept.a)
        assert _storage(model[0].up.weight) == _storage(kept.b)
        assert model[0].up.bias is not None
    result = factor_in_place(model, plans, ranks)
    assert result is model and isinstance(model[0], LowRankLinear) and model[0].rank == 3
    assert plans == {}  # consumed: each plan dropped once its layer is factored
    assert _storage(model[0].down.weight) != _storage(kept.a)
    torch.testing.assert_close(model[0].down.weight, kept.a[:3], rtol=0, atol=0)


def test_a_layer_at_two_places_and_a_plain_root_are_swapped_and_put_back():
    shared = nn.Linear(12, 12)
    model = nn.Sequential(shared, nn.ReLU(), shared).eval()
    x = torch.randn(4, 12)
    plans = layer_plans(model, [(x,)], whiten=False)
    assert list(plans) == ["0"]
    with factored(model, plans, {"0": 2}):
        assert model[0] is model[2] and isinstance(model[0], LowRankLinear)
    assert model[0] is shared and model[2] is shared

    root = nn.Linear(12, 7).eval()
    plans = layer_plans(root, [(x,)], whiten=False)
    with factored(root, plans, {"": 2}) as candidate, torch.no_grad():
        assert isinstance(candidate, LowRankLinear)
        torch.testing.assert_close(candidate(x), x @ candidate.weight.T + root.bias)
    assert isinstance(factor_in_place(root, plans, {"": 2}), LowRankLinear)


def test_costs_count_every_output_position():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2)).eval()  # 9x9 -> 4x4
    plan = layer_plans(model, [(torch.randn(2, 3, 9, 9),)], whiten=False)["0"]
    assert plan.positions == 16 and plan.macs == 8 * 3 * 9 * 16
    assert plan.factored_macs(2) == (2 * 3 * 9 + 8 * 2) * 16
    assert plan.rank_limit == (8 * 27 - 1) // (27 + 8)  # the largest rank with fewer weights: 6

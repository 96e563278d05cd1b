"""``compress_model``: within the budget on the calibration data and on held-out data of the same kind, smaller,
input untouched, rebuildable from its architecture spec."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from epcli import EPConv2d, EPLinear, InputSpec, LowRankConv2d, LowRankLinear, compress_model
from epcli.checkpoint.architecture import build_architecture, describe_architecture
from epcli.errors import ModelInputError, UsageError
from epcli.layers.base import EPLayer


def _low_rank(out: int, inner: int, rank: int, noise: float = 1e-3) -> torch.Tensor:
    return torch.randn(out, rank) @ torch.randn(rank, inner) / inner**0.5 + noise * torch.randn(out, inner)


def _mlp() -> nn.Module:
    """An EP layer and a plain layer, both close to rank 6."""
    torch.manual_seed(0)
    model = nn.Sequential(EPLinear(40, 48, depth=2), nn.ReLU(), nn.Linear(48, 32)).eval()
    with torch.no_grad():
        first, second = model[0].layer_dict["0"][0], model[0].layer_dict["1"][0]
        first.weight.copy_(_low_rank(first.weight.shape[0], 40, 6))
        second.weight.copy_(torch.eye(*second.weight.shape))
        model[2].weight.copy_(_low_rank(32, 48, 6))
    return model


def _data(count: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(40, 40, generator=torch.Generator().manual_seed(7))
    return torch.randn(count, 40, generator=generator) @ mixing / 40**0.5


def _error(reference: nn.Module, candidate: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        want, got = reference(x), candidate(x)
    return float((got - want).abs().max() / want.abs().max())


def test_within_budget_on_calibration_and_held_out_data_and_smaller():
    model = _mlp()
    before = copy.deepcopy(model.state_dict())
    calibration, held_out = _data(512, 1), _data(512, 2)

    compressed, result = compress_model(model, max_error=0.02, calibration=calibration)

    assert result.method == "whitened" and result.samples == 512
    assert result.model_max_rel_error <= 0.02
    assert _error(model, compressed, calibration) == pytest.approx(result.model_max_rel_error, rel=1e-3)
    assert _error(model, compressed, held_out) <= 0.02
    assert result.params_after < result.params_before / 2 and result.macs_after < result.macs_before / 2
    assert {layer.path: layer.rank for layer in result.layers} == {"0": 6, "2": 6}
    assert isinstance(compressed[0], LowRankLinear) and isinstance(compressed[2], LowRankLinear)
    assert not any(isinstance(m, EPLayer) for m in compressed.modules())
    assert sum(p.numel() for p in compressed.parameters()) == result.params_after
    for key, value in model.state_dict().items():  # the input is untouched
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)


def test_a_tighter_budget_keeps_more():
    model = _mlp()
    calibration = _data(128, 1)
    sizes = [compress_model(model, max_error=e, calibration=calibration)[1].params_after for e in (0.5, 0.02, 1e-4)]
    assert sizes[0] <= sizes[1] <= sizes[2]


def test_zero_budget_keeps_every_layer_whole():
    model = _mlp()
    compressed, result = compress_model(model, max_error=0.0, calibration=_data(64, 1))
    assert result.factored == () and result.threshold is None
    assert result.params_after == result.params_before
    assert not any(isinstance(m, LowRankLinear) for m in compressed.modules())


def test_without_calibration_plain_svd_on_random_inputs():
    model = _mlp()
    compressed, result = compress_model(model, max_error=0.02, inputs=[InputSpec((40,))], samples=128)
    assert result.method == "svd" and result.samples == 128
    assert result.model_max_rel_error <= 0.02 and result.params_after < result.params_before
    assert _error(model, compressed, torch.randn(256, 40)) <= 0.05


def test_grouped_conv_model_and_its_architecture_spec():
    torch.manual_seed(0)
    model = nn.Sequential(
        EPConv2d(4, 32, [3, 3], padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1, groups=2),
        nn.Flatten(), nn.Linear(32 * 16, 10),  # the 5x5 collapsed kernel: 6x6 -> 4x4
    ).eval()
    with torch.no_grad():
        model[2].weight.mul_(torch.logspace(0, -4, 32).reshape(32, 1, 1, 1))  # a decaying spectrum per group
    x = torch.randn(64, 4, 6, 6)

    compressed, result = compress_model(model, max_error=0.05, calibration=x)

    assert result.model_max_rel_error <= 0.05 and result.params_after < result.params_before
    grouped = next(layer for layer in result.layers if layer.path == "2")
    assert grouped.rank is not None and grouped.rank < 16
    assert isinstance(compressed[2], LowRankConv2d) and compressed[2].down.groups == 2
    spec = describe_architecture(compressed)
    assert spec is not None
    rebuilt = build_architecture(spec)
    rebuilt.load_state_dict(compressed.state_dict())
    torch.testing.assert_close(rebuilt.eval()(x), compressed(x), rtol=0, atol=0)


@pytest.mark.parametrize("budget", [-1.0, float("nan"), float("inf")])
def test_a_bad_budget_is_refused(budget):
    with pytest.raises(UsageError, match="max_error"):
        compress_model(_mlp(), max_error=budget, calibration=_data(8, 1))


def test_calibration_or_input_specs_are_needed():
    with pytest.raises(UsageError, match="calibration"):
        compress_model(_mlp(), max_error=0.1)


def test_a_compressed_model_is_not_factored_again():
    calibration = _data(256, 1)
    compressed, first = compress_model(_mlp(), max_error=0.02, calibration=calibration)
    assert {layer.path for layer in first.factored} == {"0", "2"}
    again, second = compress_model(compressed, max_error=0.02, calibration=calibration)
    assert second.layers == () and second.factored == ()
    assert isinstance(again[0], LowRankLinear) and again[0].rank == compressed[0].rank


class _Loud(nn.Module):
    """Two branches: ``loud`` (a nearly low-rank weight whose output is 100x larger) and ``quiet`` (a flat spectrum)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.loud, self.quiet = nn.Linear(16, 16), nn.Linear(16, 16)
        with torch.no_grad():
            self.loud.weight.copy_(_low_rank(16, 16, 6, noise=0.05))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([100 * self.loud(x), self.quiet(x)], dim=-1)


def test_a_layer_the_energy_threshold_passes_over_is_factored_alone():
    """``loud`` loses the least energy, so every threshold that factors anything factors it, and the model then
    misses the budget; ``quiet`` alone stays within it. Nothing factored would be the wrong answer."""
    model = _Loud().eval()
    compressed, result = compress_model(model, max_error=0.01, inputs=[InputSpec((16,))])
    assert result.ranks == {"quiet": 7} and result.threshold is None  # 7: the largest rank that saves
    assert isinstance(compressed.quiet, LowRankLinear) and type(compressed.loud) is nn.Linear
    assert result.model_max_rel_error <= 0.01
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(3))
    assert _error(model, compressed, x) <= 0.02


def test_the_factored_modules_weight_is_the_dense_weight_they_compute():
    """Model code reads ``layer.weight`` (ViT: its dtype); it is the product of the factors, as the layer runs."""
    torch.manual_seed(0)
    linear = LowRankLinear(6, 2, 5)
    x = torch.randn(3, 6)
    torch.testing.assert_close(linear(x), x @ linear.weight.T + linear.bias)
    conv = LowRankConv2d(4, 2, 6, 3, padding=1, groups=2)
    image = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(conv(image), nn.functional.conv2d(image, conv.weight, conv.bias, padding=1, groups=2))
    assert conv.weight.shape == (6, 2, 3, 3)


def test_calibration_batches_may_be_plain_tensors_and_a_wrong_shape_is_named():
    model, calibration = _mlp(), _data(128, 1)
    _, as_tensor = compress_model(model, max_error=0.02, calibration=calibration, batch_size=64)
    _, as_batches = compress_model(model, max_error=0.02, calibration=list(calibration.split(64)))
    assert as_batches.ranks == as_tensor.ranks and as_batches.samples == 128
    with pytest.raises(ModelInputError, match=r"the given samples \(torch.float32 \[8, 32\]\)"):
        compress_model(model, max_error=0.02, calibration=torch.randn(8, 32))

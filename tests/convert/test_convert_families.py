"""overparameterize converts every convolution family (1-D/2-D/3-D, groups, dilation, rectangular kernels,
stride, padding and padding modes); collapse_model gives back the same plain geometry, and a checkpoint
of such a model saves and loads without a factory.

Numbers are compared with the EP layers' expanded forward (float64, 1e-10 relative to the output's size).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from epcli import (
    EPConv,
    EPConv1d,
    EPConv2d,
    EPConv3d,
    collapse_model,
    load_checkpoint,
    overparameterize,
    save_checkpoint,
)
from epcli.convert import expanded_eval

GEOMETRY = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode")


def _geometry(conv: _ConvNd) -> tuple[object, ...]:
    return tuple(getattr(conv, name) for name in GEOMETRY)


def _expanded(model: nn.Module, x: Tensor) -> Tensor:
    with expanded_eval(model), torch.no_grad():
        return model(x)


CONVS = [
    (nn.Conv1d(4, 8, 5, stride=2, padding=4, dilation=2, groups=4), (4, 17)),  # depthwise, multiplier 2
    (nn.Conv1d(3, 6, 3, padding="same", dilation=3, padding_mode="circular", bias=False), (3, 12)),
    (nn.Conv2d(8, 8, (3, 5), stride=(2, 1), padding=(1, 2), groups=8), (8, 9, 10)),  # depthwise, rectangular
    (nn.Conv2d(6, 4, (1, 3), padding=(0, 2), dilation=(1, 2), groups=2, padding_mode="reflect"), (6, 7, 8)),
    (nn.Conv2d(4, 4, 4, stride=2), (4, 9, 8)),  # even kernel
    (nn.Conv3d(4, 4, (3, 1, 3), padding=(1, 0, 1), groups=2, padding_mode="replicate"), (4, 5, 4, 6)),
    (nn.Conv3d(2, 4, 3, stride=(1, 2, 2), padding="valid", dilation=(2, 1, 1)), (2, 7, 6, 7)),
]


@pytest.mark.parametrize(("conv", "shape"), CONVS, ids=lambda c: repr(c) if isinstance(c, nn.Module) else "")
@pytest.mark.parametrize("depth", [1, 3])
def test_every_conv_family_converts_and_collapses_to_the_same_geometry(
    conv: _ConvNd, shape: tuple[int, ...], depth: int, randomise_batch_norm, assert_scaled_close
) -> None:
    model = nn.Sequential(conv, nn.ReLU()).double()
    ep = overparameterize(model, depth=depth, batch_norm=True, allow_new_bias=True)  # some convs are bias-free
    layer = ep[0]
    family = {nn.Conv1d: EPConv1d, nn.Conv2d: EPConv2d, nn.Conv3d: EPConv3d}[type(conv)]
    assert type(layer) is family and type(model[0]) is type(conv)
    assert isinstance(layer, EPConv) and layer.depth == depth
    config = layer.config
    assert config.kernel_shapes == (tuple(conv.kernel_size),) + ((1,) * config.ndim,) * (depth - 1)
    assert (config.groups, config.per_dim(config.dilation), config.per_dim(config.stride)) == (
        conv.groups, conv.dilation, conv.stride
    )
    assert config.padding_mode == conv.padding_mode and config.bias == (conv.bias is not None)
    randomise_batch_norm(ep)
    ep.eval()
    collapsed = collapse_model(ep)
    plain = collapsed[0]
    expected = _geometry(conv)
    if conv.padding == "same":  # the EP layer states 'same' as the symmetric padding it means
        expected = (*expected[:4], tuple(d * (k - 1) // 2 for d, k in zip(conv.dilation, conv.kernel_size)),
                    *expected[5:])
    if conv.padding == "valid":
        expected = (*expected[:4], (0,) * len(conv.kernel_size), *expected[5:])
    assert type(plain) is type(conv) and _geometry(plain) == expected
    assert plain.weight.shape == conv.weight.shape
    x = torch.randn(2, *shape, dtype=torch.float64)
    with torch.no_grad():
        assert collapsed(x).shape == model(x).shape
        assert_scaled_close(collapsed(x), _expanded(ep, x))


def test_overparameterize_keeps_residual_refusals_per_family() -> None:
    with pytest.raises(ValueError, match=r"Conv3d at '0'.*kernel_sizes"):
        overparameterize(nn.Sequential(nn.Conv3d(2, 2, (3, 2, 3))), residual=True)


def _zoo() -> nn.Module:
    """1-D and 3-D families with their norms and pools, as described by the embedded architecture."""
    return nn.Sequential(
        EPConv1d(2, 4, [3, 3], padding=2, dilation=2, groups=2, batch_norm=True, residual=True, residual_mode="learn"),
        nn.BatchNorm1d(4),
        nn.MaxPool1d(2),
        nn.AvgPool1d(1),
        nn.AdaptiveAvgPool1d(4),
        nn.Unflatten(2, (1, 2, 2)),
        EPConv3d(4, 4, [(1, 3, 3), 1], padding=(0, 1, 1), groups=4, padding_mode="circular", residual=True,
                 residual_intervals=-1),
        nn.BatchNorm3d(4),
        nn.MaxPool3d(1),
        nn.AvgPool3d(1),
        nn.AdaptiveAvgPool3d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_checkpoint_of_1d_and_3d_families_loads_without_a_factory(
    tmp_path: Path, suffix: str, randomise_batch_norm, assert_scaled_close
) -> None:
    model = _zoo()
    randomise_batch_norm(model)
    model.eval()
    path = save_checkpoint(model, tmp_path / f"zoo{suffix}", input_shape=(2, 10))
    checkpoint = load_checkpoint(path)
    assert [type(m) for m in checkpoint.model] == [type(m) for m in model]
    assert checkpoint.ep_layers["0"] == model[0].config and checkpoint.ep_layers["6"] == model[6].config
    x = torch.randn(3, 2, 10)
    with torch.no_grad():
        torch.testing.assert_close(checkpoint.model(x), model(x), rtol=0, atol=0)
        assert_scaled_close(collapse_model(checkpoint.model)(x), _expanded(model, x))

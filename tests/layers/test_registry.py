"""The EP layer registry: lookups by class name, and what a config implies about its tensors."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from epcli import (
    ConfigError,
    EPConv1d,
    EPConv1dConfig,
    EPConv2d,
    EPConv2dConfig,
    EPConv3d,
    EPConv3dConfig,
    EPLinear,
    EPLinearConfig,
    ShapeMismatchError,
)
from epcli.errors import CheckpointError
from epcli.layers.registry import (
    REGISTRY,
    build_layer,
    check_state,
    class_name,
    collapsed_has_bias,
    config_class,
    config_from_dict,
    expected_state,
    find_ep_layers,
    layer_class,
    lookup,
    output_shape,
    plain_layer,
)


def test_registry_entries():
    assert dict(REGISTRY) == {
        "EPLinear": (EPLinear, EPLinearConfig),
        "EPConv2d": (EPConv2d, EPConv2dConfig),
        "EPConv1d": (EPConv1d, EPConv1dConfig),
        "EPConv3d": (EPConv3d, EPConv3dConfig),
    }
    layer_cls, config_cls = REGISTRY["EPConv2d"]
    assert (layer_cls, config_cls) == (layer_class("EPConv2d"), config_class("EPConv2d"))
    assert lookup("EPLinear").layer is EPLinear


@pytest.mark.parametrize("name", ["EPMystery", "eplinear", "", None, 3])
def test_unknown_class_names_list_the_known_ones(name):
    with pytest.raises(ConfigError) as info:
        lookup(name)
    assert f"unknown EP layer class {name!r}" in str(info.value)
    assert "known classes: EPLinear, EPConv2d" in str(info.value)


def test_class_name_is_exact():
    class Mine(EPLinear):
        pass

    assert class_name(EPLinear(2, 2)) == class_name(EPLinearConfig(in_features=2, out_features=2)) == "EPLinear"
    with pytest.raises(ConfigError, match="Mine is not a registered EP layer"):
        class_name(Mine(2, 2))
    with pytest.raises(ConfigError, match=r"module 'a\.b'.*Mine"):
        find_ep_layers(_tree(Mine(2, 2)))


def _tree(layer: nn.Module) -> nn.Module:
    from collections import OrderedDict

    return nn.Sequential(OrderedDict(a=nn.Sequential(OrderedDict(b=layer))))


def test_find_ep_layers_does_not_look_inside_ep_layers():
    model = _tree(EPLinear(3, 3, depth=3))
    assert list(find_ep_layers(model)) == ["a.b"]
    assert list(find_ep_layers(model.a.b)) == [""]


def test_config_from_dict_round_trip():
    config = EPConv2dConfig(in_channels=2, out_channels=3, kernel_sizes=(3, 1), stride=2)
    assert config_from_dict("EPConv2d", config.to_dict()) == config


_GRID = list(itertools.product([False, True], [False, True], ["none", "learn"], [False, True]))


@pytest.mark.parametrize(("bias", "batch_norm", "mode", "residual"), _GRID)
def test_collapsed_bias_rule_matches_the_collapse(bias: bool, batch_norm: bool, mode: str, residual: bool):
    for layer in (
        EPLinear(4, 4, depth=3, bias=bias, batch_norm=batch_norm, residual=residual, residual_mode=mode),
        EPConv2d(3, 3, [3, 1, 3], bias=bias, batch_norm=batch_norm, residual=residual, residual_mode=mode),
    ):
        assert (layer.collapse().bias is not None) == collapsed_has_bias(layer.config)


@pytest.mark.parametrize("collapsed", [False, True])
def test_expected_state_matches_real_layers(collapsed: bool):
    for layer in (
        EPLinear(5, 3, depth=3, width=2, batch_norm=True, residual=True, residual_mode="learn"),
        EPConv2d(2, 4, [3, 1, 3], stride=2, padding=1, batch_norm=True, residual=True, residual_mode="learn"),
    ):
        expected = expected_state(layer.config, collapsed=collapsed)
        assert all(t.is_meta for t in expected.values())
        real = {"weight": layer.weight, "bias": layer.bias} if collapsed else layer.state_dict()
        assert {k: tuple(v.shape) for k, v in expected.items()} == {k: tuple(v.shape) for k, v in real.items()}


def test_plain_layer_is_what_a_user_would_write():
    conv = plain_layer(EPConv2d(2, 4, [3, 1, 3], stride=2, padding=1).config, bias=False, dtype=torch.float64)
    assert type(conv) is nn.Conv2d and conv.bias is None and conv.weight.dtype == torch.float64
    assert (conv.kernel_size, conv.stride, conv.padding) == ((5, 5), (2, 2), (1, 1))
    linear = plain_layer(EPLinear(5, 3, depth=4).config, bias=True, device="meta")
    assert type(linear) is nn.Linear and linear.weight.is_meta and linear.weight.shape == (3, 5)


def test_build_layer_on_meta_allocates_nothing():
    layer = build_layer(EPLinearConfig(in_features=10**6, out_features=10**6, depth=3), device="meta")
    assert all(p.is_meta for p in layer.parameters())


def test_output_shape():
    conv = EPConv2d(2, 4, [3, 1, 3], stride=2, padding=1).config
    assert output_shape(conv, (2, 9, 9)) == (4, 4, 4)
    assert output_shape(EPLinear(5, 3).config, (7, 5)) == (7, 3)
    with pytest.raises(ConfigError, match=r"input_shape \[3, 9, 9\] does not fit EPConv2d\(2 -> 4\)"):
        output_shape(conv, (3, 9, 9))


@pytest.mark.parametrize(("size", "padding", "stride"), [(1, 0, 1), (2, 3, 1), (5, 0, 2), (6, 1, 2), (9, 4, 3)])
def test_output_shape_agrees_with_running_the_layer(size: int, padding: int, stride: int) -> None:
    """The arithmetic shape equals what the layer's own forward produces (maps smaller than the kernel included)."""
    layer = EPConv2d(2, 3, [3, 1, 5], padding, stride=stride, residual=True, residual_intervals=[1, -1], residual_mode="learn")
    layer.eval()
    x = torch.zeros(1, 2, size, size + 1)
    if size + 2 * padding < layer.kernel_size[0]:
        with pytest.raises(ConfigError, match="smaller than the 7x7 effective kernel"):
            output_shape(layer.config, tuple(x.shape[1:]))
        return
    expected = tuple(layer(x, override=True).shape[1:])
    assert output_shape(layer.config, tuple(x.shape[1:])) == expected


def test_linear_output_shape_names_the_expected_features() -> None:
    with pytest.raises(ConfigError, match=r"expects \(\*, 5\) per sample, got \[7, 4\]"):
        output_shape(EPLinear(5, 3).config, (7, 4))


def test_check_state_names_keys_shapes_and_dtypes():
    expected = expected_state(EPLinear(3, 2, depth=1).config)
    good = {"layer_dict.0.0.weight": torch.zeros(2, 3), "layer_dict.0.0.bias": torch.zeros(2)}
    check_state(expected, good, prefix="p.")
    with pytest.raises(CheckpointError, match=r"missing keys \['p.layer_dict.0.0.bias'\]; unexpected keys \['p.x'\]"):
        check_state(expected, {"layer_dict.0.0.weight": torch.zeros(2, 3), "x": torch.zeros(1)}, prefix="p.")
    with pytest.raises(ShapeMismatchError, match=r"p.layer_dict.0.0.weight has shape \[3, 2\], expected \[2, 3\]"):
        check_state(expected, {**good, "layer_dict.0.0.weight": torch.zeros(3, 2)}, prefix="p.")
    with pytest.raises(ShapeMismatchError, match="has dtype torch.int32, expected a floating-point dtype"):
        check_state(expected, {**good, "layer_dict.0.0.bias": torch.zeros(2, dtype=torch.int32)})

"""EP layers are drop-in for the plain layer they collapse to, and the config tells when that layer differs from the
one it replaced.

Model code reads ``conv.stride[0]``, ``linear.in_features``, ``conv1d.nf``: every public attribute of the plain
layer must exist on the EP layer with the same type and value (``weight`` / ``bias`` are the collapse: plain tensors
with the plain layer's shapes, dtype and device). New config fields must leave old configs reading, and writing,
exactly as before.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from epcli.errors import ConfigError
from epcli.layers import CONFIG_VERSION, EPConv1d, EPConv2d, EPConv2dConfig, EPConv3d, EPLayer, EPLinear, EPLinearConfig
from epcli.layers.registry import build_layer, expected_state, plain_layer

LAYERS: dict[str, Any] = {
    "linear": lambda: EPLinear(5, 7),
    "linear-no-bias": lambda: EPLinear(5, 7, bias=False, depth=3),
    "linear-bn-no-bias": lambda: EPLinear(5, 7, bias=False, batch_norm=True),
    "linear-in-out": lambda: EPLinear(5, 7, weight_layout="in_out", residual=True, residual_mode="learn"),
    "conv1d": lambda: EPConv1d(4, 6, 3, padding=1, stride=2),
    "conv1d-dilated-grouped": lambda: EPConv1d(4, 6, [3, 3], padding=2, dilation=2, groups=2, bias=False),
    "conv2d": lambda: EPConv2d(3, 4, 3, 1, 2),
    "conv2d-rect-circular": lambda: EPConv2d(2, 4, [(3, 1), (1, 5)], (1, 2), (2, 1), padding_mode="circular"),
    "conv2d-depthwise": lambda: EPConv2d(4, 4, [3, 1], 1, groups=4, residual=True),
    "conv3d": lambda: EPConv3d(2, 3, [3, 1, 1], padding=(1, 0, 1), stride=(1, 2, 1), batch_norm=True),
}


def _public_attributes(plain: nn.Module) -> set[str]:
    """What model code reads on a plain layer: its public instance attributes and its parameters."""
    return {name for name in vars(plain) if not name.startswith("_")} | set(plain._parameters)


@pytest.mark.parametrize("make", LAYERS.values(), ids=LAYERS.keys())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_every_attribute_of_the_plain_layer_has_its_type_and_value(make: Any, dtype: torch.dtype) -> None:
    layer: EPLayer = make().to(dtype).eval()
    plain = plain_layer(layer.config, bias=layer.config.collapsed_bias, dtype=dtype).eval()
    names = _public_attributes(plain)
    assert {"weight", "bias", "training"} <= names
    for name in sorted(names):
        ours, theirs = getattr(layer, name), getattr(plain, name)
        if isinstance(theirs, Tensor):
            assert type(ours) is Tensor, name  # the collapse, not a parameter that would train
            assert (ours.shape, ours.dtype, ours.device) == (theirs.shape, theirs.dtype, theirs.device), name
        else:
            assert type(ours) is type(theirs) and ours == theirs, (name, ours, theirs)
    if isinstance(plain, nn.modules.conv._ConvNd):  # stride[0] and friends index per spatial dim
        assert all(isinstance(getattr(layer, n), tuple) for n in ("kernel_size", "stride", "padding", "dilation"))


@pytest.mark.parametrize("make", LAYERS.values(), ids=LAYERS.keys())
def test_the_plain_layer_holding_the_collapse_computes_the_eval_forward(make: Any) -> None:
    layer: EPLayer = make().double().eval()
    plain = plain_layer(layer.config, bias=layer.bias is not None, dtype=torch.float64)
    plain.load_state_dict({name: getattr(layer, name) for name in plain._parameters if getattr(plain, name) is not None})
    shape = (2, layer.config.in_dim, *[9] * getattr(layer.config, "ndim", 0))
    x = torch.randn(shape, dtype=torch.float64)
    torch.testing.assert_close(layer(x), plain(x), rtol=1e-12, atol=1e-12)


def test_the_state_dict_holds_the_chain_only() -> None:
    """``weight`` / ``bias`` are derived: the keys stay those of the expanded chain."""
    layer = EPConv1d(2, 3, 3, bias=True)
    assert sorted(layer.state_dict()) == [
        "layer_dict.0.0.bias", "layer_dict.0.0.weight", "layer_dict.1.0.bias", "layer_dict.1.0.weight"
    ]


def test_constructors_still_take_ints() -> None:
    layer = EPConv2d(3, 4, 5, 2, 3, depth=3)  # positional in, out, kernel_sizes, padding, stride
    assert (layer.kernel_sizes, layer.padding, layer.stride) == ([5, 1, 1], (2, 2), (3, 3))
    assert (layer.config.padding, layer.config.stride) == (2, 3)  # stored as the old files have them


# ---- transformers' Conv1D layout ------------------------------------------------------------------------------
def test_in_out_layout_matches_transformers_conv1d() -> None:
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    layer = EPLinear(5, 7, depth=3, weight_layout="in_out").double().eval()
    conv1d = pytorch_utils.Conv1D(7, 5).double()
    assert (layer.nf, layer.nx) == (conv1d.nf, conv1d.nx)
    assert layer.weight.shape == conv1d.weight.shape == (5, 7)
    conv1d.load_state_dict({"weight": layer.weight, "bias": layer.bias}, strict=True)
    x = torch.randn(2, 3, 5, dtype=torch.float64)
    torch.testing.assert_close(layer(x), conv1d(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer(x), layer(x, override=True), rtol=1e-12, atol=1e-12)
    assert type(plain_layer(layer.config, bias=True)) is pytorch_utils.Conv1D
    assert {k: tuple(v.shape) for k, v in expected_state(layer.config, collapsed=True).items()} == {
        "weight": (5, 7), "bias": (7,)
    }


def test_conv1d_names_exist_only_in_the_in_out_layout() -> None:
    assert not hasattr(EPLinear(5, 7), "nf") and not hasattr(EPLinear(5, 7), "nx")


def test_in_out_layout_needs_a_bias_and_a_known_layout() -> None:
    with pytest.raises(ConfigError, match="a Conv1D always has a bias"):
        EPLinear(5, 7, bias=False, weight_layout="in_out")
    EPLinear(5, 7, bias=False, batch_norm=True, weight_layout="in_out")  # batch-norm's shift is the bias
    with pytest.raises(ConfigError, match="weight_layout must be 'out_in'"):
        EPLinear(5, 7, weight_layout="transposed")


# ---- deploy changes and config compatibility -----------------------------------------------------------------
def test_deploy_changes_come_from_the_config_alone() -> None:
    same = EPLinearConfig(in_features=4, out_features=4, bias=False, batch_norm=True)
    assert same.deploy_changes == ()  # not recorded: nothing was replaced, or the architecture is kept
    added = EPLinearConfig(in_features=4, out_features=4, bias=False, batch_norm=True, replaced_bias=False)
    (change,) = added.deploy_changes
    assert "adds a bias" in change and "batch-norm" in change
    assert EPLinearConfig(in_features=4, out_features=4, bias=False, replaced_bias=True).deploy_changes == (
        "drops the bias the replaced layer had",
    )
    assert EPLinearConfig(in_features=4, out_features=4, replaced_bias=True).deploy_changes == ()
    layer = build_layer(added)
    assert layer.deploy_changes == added.deploy_changes and layer.config == added
    with pytest.raises(ConfigError, match="replaced_bias must be None, True or False"):
        EPLinearConfig(in_features=4, out_features=4, replaced_bias="no")


OLD_LINEAR = {  # an EPLinear config as epcli wrote it before replaced_bias and weight_layout
    "width": 1, "depth": 2, "bias": False, "batch_norm": True, "residual": False, "residual_intervals": [2],
    "residual_mode": "none", "collapse_on_eval": True, "negative_slope": 0.0, "bn_eps": 1e-05, "bn_momentum": 0.1,
    "in_features": 4, "out_features": 6,
}


def test_old_configs_read_and_write_as_before() -> None:
    assert CONFIG_VERSION == 1
    config = EPLinearConfig.from_dict(OLD_LINEAR)
    assert (config.replaced_bias, config.weight_layout, config.deploy_changes) == (None, "out_in", ())
    assert json.dumps(config.to_dict(), sort_keys=True) == json.dumps(OLD_LINEAR, sort_keys=True)
    conv = EPConv2dConfig(in_channels=2, out_channels=3)
    assert "replaced_bias" not in conv.to_dict()


def test_new_fields_round_trip() -> None:
    config = EPLinearConfig(in_features=4, out_features=6, batch_norm=True, replaced_bias=False, weight_layout="in_out")
    data = json.loads(json.dumps(config.to_dict()))
    assert (data["replaced_bias"], data["weight_layout"]) == (False, "in_out")
    assert EPLinearConfig.from_dict(data) == config
    conv = EPConv2dConfig(in_channels=2, out_channels=3, bias=False, batch_norm=True, replaced_bias=False)
    assert EPConv2dConfig.from_dict(json.loads(json.dumps(conv.to_dict()))).deploy_changes == conv.deploy_changes != ()

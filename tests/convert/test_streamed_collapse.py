"""``streamed_collapse``: the collapse of an EP layer read a chain layer at a time, against ``collapse_layer`` of
the same tensors read at once, and against the layer's own expanded forward."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from epcli import CheckpointError, EPConv2d, EPLinear, collapse_layer
from epcli.convert import streamed_collapse
from epcli.layers import EPLayer

LAYERS: dict[str, Callable[[], EPLayer]] = {
    "linear, batch-norm, learnt skips": lambda: EPLinear(
        6, 5, depth=4, batch_norm=True, residual=True, residual_intervals=[1, 2], residual_mode="learn"
    ),
    "linear, identity skips, no bias": lambda: EPLinear(5, 5, depth=3, bias=False, residual=True),
    "conv, batch-norm, learnt skips": lambda: EPConv2d(
        2, 3, [3, 1, 3], 2, 1, batch_norm=True, residual=True, residual_intervals=[1, 2], residual_mode="learn"
    ),
}


def _trained(name: str) -> EPLayer:
    torch.manual_seed(0)
    layer = LAYERS[name]()
    for module in layer.modules():  # running statistics away from 0 / 1
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    return layer.eval()


@pytest.mark.parametrize("name", list(LAYERS))
def test_streamed_collapse_reads_a_chain_layer_at_a_time_and_equals_the_collapse(name: str):
    layer = _trained(name)
    state = {key: value.detach().clone() for key, value in layer.state_dict().items()}
    reads: list[list[str]] = []

    def read(keys: list[str]) -> Mapping[str, Tensor]:
        reads.append(list(keys))
        return {key: state[key].clone() for key in keys}

    listing = {key: value.to("meta") for key, value in state.items()}
    affine = streamed_collapse(layer.config, listing, read)
    weight, bias = collapse_layer(layer.config, state)
    torch.testing.assert_close(affine.weight.to(weight.dtype), weight, rtol=0, atol=0)
    torch.testing.assert_close(None if affine.bias is None else affine.bias.to(weight.dtype), bias, rtol=0, atol=0)
    # everything outside the chain first (when there is anything), then each chain layer with its batch-norm, in
    # order, each key once
    blocks = [[key for key in state if key.startswith(f"layer_dict.{j}.")] for j in range(layer.config.depth)]
    rest = [key for key in state if not key.startswith("layer_dict.")]
    assert reads == [*([rest] if rest else []), *blocks]
    x = torch.randn(4, *((layer.in_features,) if isinstance(layer, EPLinear) else (2, 7, 6)), dtype=torch.float64)
    with torch.no_grad():
        expanded = layer.double()(x, override=True)
    collapsed = F.linear(x, affine.weight, affine.bias) if isinstance(layer, EPLinear) else F.conv2d(
        x, affine.weight, affine.bias, layer.stride, layer.padding)  # type: ignore[arg-type]
    torch.testing.assert_close(collapsed, expanded, rtol=1e-12, atol=1e-12)


def test_streamed_collapse_checks_the_listing_before_reading():
    layer = _trained("linear, batch-norm, learnt skips")
    listing = {key: value.to("meta") for key, value in layer.state_dict().items()}
    listing["layer_dict.1.0.weight"] = torch.empty(3, 3, device="meta")
    del listing["layer_dict.2.1.running_var"]

    def read(keys: list[str]) -> Mapping[str, Tensor]:
        raise AssertionError("nothing is read from a listing that does not fit the config")

    with pytest.raises(CheckpointError, match=r"missing keys \['fc\.layer_dict\.2\.1\.running_var'\]"):
        streamed_collapse(layer.config, listing, read, prefix="fc.")

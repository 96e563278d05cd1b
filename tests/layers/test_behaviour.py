"""Module behaviour of EP layers: modes, the collapse cache, state_dicts, copies, attributes, configs.

"Collapsed equals expanded" checks here compare the eval forward with the expanded
``override=True`` forward, never with the collapse code, so a stale cache shows up.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from epcli import ConfigError, EPConv1d, EPConv2d, EPConv2dConfig, EPConv3d, EPLinear, EPLinearConfig
from epcli.layers import EPLayer

AssertScaledClose = Callable[[Tensor, Tensor], None]
RandomiseBatchNorm = Callable[[nn.Module], None]


def _linear() -> EPLinear:
    """Every kind of parameter and buffer: layers, batch-norms and learnable skips."""
    return EPLinear(4, 4, depth=3, batch_norm=True, residual=True, residual_intervals=[1, 2], residual_mode="learn")


def _conv() -> EPConv2d:
    return EPConv2d(
        2, 3, [3, 1, 3], 2, 2, batch_norm=True, residual=True, residual_intervals=[1, 2], residual_mode="learn"
    )


LAYERS: dict[str, Callable[[], EPLayer]] = {"linear": _linear, "conv": _conv}


def _input(layer: EPLayer, batch: int = 6) -> Tensor:
    """A batch in the layer's dtype (odd-by-even maps for convolutions)."""
    dtype = next(layer.parameters()).dtype
    if isinstance(layer, EPLinear):
        return torch.randn(batch, layer.in_features, dtype=dtype)
    return torch.randn(batch, layer.in_channels, 7, 6, dtype=dtype)


@pytest.fixture(params=list(LAYERS))
def layer(request: pytest.FixtureRequest, randomise_batch_norm: RandomiseBatchNorm) -> EPLayer:
    """An EP layer with non-trivial batch-norms, in float64 so the tolerance can be tight."""
    built = LAYERS[request.param]()
    randomise_batch_norm(built)
    return built.double()


@contextmanager
def chain_calls(layer: EPLayer) -> Iterator[list[int]]:
    """Count the calls of the first expanded sub-layer: zero means the collapsed form ran."""
    calls: list[int] = []
    handle = layer.layer_dict["0"][0].register_forward_hook(lambda *_: calls.append(1))
    try:
        yield calls
    finally:
        handle.remove()


def assert_eval_is_fresh(layer: EPLayer, x: Tensor, assert_scaled_close: AssertScaledClose) -> None:
    """The eval output (cached collapse) equals the expanded forward of the current parameters.

    Does not call ``eval()`` itself, so a cache that only a mode switch refreshes still fails.
    """
    assert not layer.training
    with torch.no_grad():
        assert_scaled_close(layer(x), layer(x, override=True))


def assert_changed(after: Tensor, before: Tensor) -> None:
    changed = not torch.equal(after, before)
    assert changed, "the collapsed output/weight did not change: stale cache"


# ---- modes -------------------------------------------------------------------------------
def test_train_and_eval_return_self(layer: EPLayer) -> None:
    assert layer.train() is layer
    assert layer.eval() is layer


def test_train_runs_expanded_and_eval_runs_collapsed(layer: EPLayer, assert_scaled_close: AssertScaledClose) -> None:
    x = _input(layer)
    with chain_calls(layer) as calls:
        layer.train()(x)
        assert len(calls) == 1
        layer.eval()(x)
        assert len(calls) == 1
        layer(x, override=True)
        assert len(calls) == 2
    assert_eval_is_fresh(layer, x, assert_scaled_close)


def test_collapse_on_eval_false_keeps_expanded_form(randomise_batch_norm: RandomiseBatchNorm) -> None:
    layer = EPLinear(4, 4, depth=3, batch_norm=True, collapse_on_eval=False)
    randomise_batch_norm(layer)
    layer.eval()
    x = torch.randn(5, 4)
    with chain_calls(layer) as calls, torch.no_grad():
        y = layer(x)
        assert len(calls) == 1
        # the expanded eval form uses the running statistics, so it still equals the collapse
        torch.testing.assert_close(y, F.linear(x, layer.weight, layer.bias))
    assert layer.config.collapse_on_eval is False


def test_collapse_is_float64_and_matches_the_cached_weight() -> None:
    layer = _linear().eval()
    affine = layer.collapse()
    assert affine.weight.dtype == torch.float64
    assert affine.bias is not None and affine.bias.dtype == torch.float64
    assert torch.equal(affine.weight.to(torch.float32), layer.weight)
    assert torch.equal(affine.bias.to(torch.float32), layer.bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_release_collapse_equals_collapse_and_leaves_the_layer_empty(
    layer: EPLayer, dtype: torch.dtype, assert_scaled_close: AssertScaledClose
) -> None:
    """The same collapse as a copy's, checked against the expanded forward too; the layer keeps no data."""
    layer = layer.to(dtype).eval()
    x = _input(layer).double()
    with torch.no_grad():
        expanded = copy.deepcopy(layer).double()(x, override=True)
    kept = copy.deepcopy(layer)
    affine = layer.release_collapse()
    reference = kept.collapse()
    torch.testing.assert_close(affine.weight, reference.weight, rtol=0, atol=0)
    torch.testing.assert_close(affine.bias, reference.bias, rtol=0, atol=0)
    assert all(t.is_meta for t in (*layer.parameters(), *layer.buffers()))
    collapsed = F.linear(x, affine.weight, affine.bias) if isinstance(layer, EPLinear) else F.conv2d(
        x, affine.weight, affine.bias, layer.stride, layer.padding)  # type: ignore[arg-type]
    assert_scaled_close(collapsed, expanded)


@pytest.mark.parametrize("family", ["linear", "conv", "grouped 1-d"])
def test_float32_collapse_is_close_to_the_float64_one(family: str, randomise_batch_norm: RandomiseBatchNorm) -> None:
    """``collapse(dtype=torch.float32)`` (inspect's approximate spectra) runs every step in float32, batch-norm
    folds and skips included, and lands within float32 rounding of the exact collapse."""
    if family == "grouped 1-d":
        layer: EPLayer = EPConv1d(4, 8, 3, groups=2, dilation=2, batch_norm=True, residual=True, residual_mode="learn")
    else:
        layer = LAYERS[family]()
    randomise_batch_norm(layer)
    exact, approximate = layer.collapse(), layer.collapse(dtype=torch.float32)
    assert exact.bias is not None and approximate.bias is not None
    assert (approximate.weight.dtype, approximate.bias.dtype) == (torch.float32, torch.float32)
    assert not torch.equal(approximate.weight, exact.weight.to(torch.float32))  # computed in float32, not cast
    for got, want in ((approximate.weight, exact.weight), (approximate.bias, exact.bias)):
        assert float((got.double() - want).abs().max() / want.abs().max()) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(LAYERS))
def test_weight_and_bias_follow_layer_dtype(name: str, dtype: torch.dtype) -> None:
    layer = LAYERS[name]().to(dtype).eval()
    assert layer.weight.dtype == dtype
    assert layer.bias is not None and layer.bias.dtype == dtype
    assert layer(_input(layer)).dtype == dtype


def test_gradients_reach_every_parameter_in_train_mode(layer: EPLayer) -> None:
    layer.train()
    y = layer(_input(layer))
    (y * torch.randn_like(y)).sum().backward()
    for name, parameter in layer.named_parameters():
        assert parameter.grad is not None, name
        if name.endswith("weight"):
            assert torch.count_nonzero(parameter.grad) > 0, name


def _gradients(layer: EPLayer, x: Tensor, weights: Tensor, **kwargs: Any) -> dict[str, Tensor]:
    layer.zero_grad(set_to_none=True)
    (layer(x, **kwargs) * weights).sum().backward()
    return {name: p.grad.clone() for name, p in layer.named_parameters() if p.grad is not None}


def test_gradients_reach_every_parameter_in_eval_mode(layer: EPLayer, assert_scaled_close: AssertScaledClose) -> None:
    """eval() changes batch-norm, not differentiability: the collapsed forward gives the expanded forward's gradients."""
    layer.eval()
    x = _input(layer)
    weights = torch.randn_like(layer(x, override=True))
    with chain_calls(layer) as calls:
        collapsed = _gradients(layer, x, weights)
        assert not calls  # the collapsed form ran
    expanded = _gradients(layer, x, weights, override=True)
    assert set(collapsed) == {name for name, _ in layer.named_parameters()}
    for name, grad in expanded.items():
        assert_scaled_close(collapsed[name], grad)


@pytest.mark.parametrize(
    ("layer", "shape"),
    [
        (lambda: EPConv1d(4, 4, [3, 3], padding=4, dilation=2, groups=2, batch_norm=True, residual=True), (3, 4, 9)),
        (lambda: EPConv3d(3, 3, [3, 1], padding=1, groups=3, batch_norm=True, residual=True, residual_mode="learn"),
         (2, 3, 4, 5, 3)),
    ],
    ids=["conv1d-grouped-dilated", "conv3d-depthwise"],
)
def test_eval_gradients_of_other_conv_families(
    layer: Callable[[], EPLayer], shape: tuple[int, ...], randomise_batch_norm: RandomiseBatchNorm,
    assert_scaled_close: AssertScaledClose,
) -> None:
    built = layer()
    randomise_batch_norm(built)
    built = built.double().eval()
    x = torch.randn(shape, dtype=torch.float64)
    weights = torch.randn_like(built(x, override=True))
    collapsed, expanded = _gradients(built, x, weights), _gradients(built, x, weights, override=True)
    assert set(collapsed) == {name for name, _ in built.named_parameters()}
    for name, grad in expanded.items():
        assert_scaled_close(collapsed[name], grad)


def test_eval_forward_without_grad_uses_the_cache() -> None:
    """Under no_grad / inference_mode (or when nothing requires grad) the cached collapse serves the forward."""
    layer = _linear().eval()
    x = torch.randn(3, 4)
    with torch.no_grad():
        layer(x)
    cached = layer._cache
    assert cached is not None
    with torch.inference_mode():
        assert not layer(x).requires_grad
    layer.requires_grad_(False)
    assert not layer(x).requires_grad
    assert layer._cache is cached  # reused, not recomputed
    layer.requires_grad_(True)
    assert layer(x).requires_grad


def _traced_model() -> nn.Module:
    """A small eval-mode model of five EP layers of both kinds, batch-norms randomised."""
    model = nn.Sequential(
        _conv(), nn.ReLU(), EPConv2d(3, 3, [3, 1], padding=1), nn.Flatten(), EPLinear(3 * 4 * 3, 4, depth=2),
        nn.ReLU(), _linear(), EPLinear(4, 2, depth=3, residual=True, residual_intervals=-1, residual_mode="learn"),
    )
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                module.running_var.uniform_(0.5, 2.0)
                module.bias.normal_()
    return model.eval()


def test_torch_export_of_an_eval_model_matches_eager() -> None:
    """Nothing requires grad here, so only tracing (not autograd) keeps the forward off the pointer-keyed cache."""
    model, x = _traced_model().requires_grad_(False), torch.randn(2, 2, 7, 6)
    with torch.no_grad():
        eager = model(x)
    exported = torch.export.export(model, (x,))
    torch.testing.assert_close(exported.module()(x), eager, rtol=1e-6, atol=1e-6)
    with torch.no_grad():  # the program computes the collapse from the parameters it was given, not a stale copy
        model[0].layer_dict["0"][0].weight.mul_(2)
        torch.testing.assert_close(exported.module()(x), model(x), rtol=1e-6, atol=1e-6)


def test_torch_compile_fullgraph_of_an_eval_model_matches_eager() -> None:
    """One graph (fullgraph raises on any break), the same numbers, and gradients through the compiled collapse.

    The ``eager`` backend runs dynamo's tracing (where breaks come from) without inductor's slow code generation.
    """
    model, x = _traced_model(), torch.randn(2, 2, 7, 6)
    with torch.no_grad():
        eager = model(x)
    out = torch.compile(model, backend="eager", fullgraph=True)(x)
    torch.testing.assert_close(out, eager, rtol=1e-6, atol=1e-6)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


# ---- cache invalidation ------------------------------------------------------------------
OPTIMIZERS: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1),
    "sgd-momentum-foreach": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, foreach=True),
    "sgd-fused": lambda p: torch.optim.SGD(p, lr=0.1, fused=True),
    "adam": lambda p: torch.optim.Adam(p, lr=0.1),
    "adam-foreach": lambda p: torch.optim.Adam(p, lr=0.1, foreach=True),
    "adam-fused": lambda p: torch.optim.Adam(p, lr=0.1, fused=True),
}


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_optimizer_step_invalidates_the_collapse(
    layer: EPLayer, optimizer: str, assert_scaled_close: AssertScaledClose
) -> None:
    x = _input(layer)
    step = OPTIMIZERS[optimizer](layer.parameters())
    layer.train()
    layer(x).square().sum().backward()
    layer.eval()
    before = layer.weight.clone()  # caches the collapse after the train forward's running-stat update
    step.step()
    assert_changed(layer.weight, before)
    assert_eval_is_fresh(layer, x, assert_scaled_close)


def test_train_forward_updating_running_stats_invalidates_the_collapse(
    layer: EPLayer, assert_scaled_close: AssertScaledClose
) -> None:
    x = _input(layer)
    before = layer.eval().weight.clone()
    with torch.no_grad():
        layer.train()(x)
    assert_changed(layer.eval().weight, before)
    assert_eval_is_fresh(layer, x, assert_scaled_close)


@pytest.mark.parametrize("assign", [False, True], ids=["copy", "assign"])
def test_load_state_dict_invalidates_the_collapse(
    layer: EPLayer, assign: bool, randomise_batch_norm: RandomiseBatchNorm, assert_scaled_close: AssertScaledClose
) -> None:
    other = type(layer).from_config(layer.config)
    randomise_batch_norm(other)
    other.double().eval()
    layer.eval().weight  # noqa: B018  (fill the cache)
    layer.load_state_dict(other.state_dict(), assign=assign)
    assert_scaled_close(layer.weight, other.weight)
    assert_eval_is_fresh(layer, _input(layer), assert_scaled_close)


def test_to_float64_invalidates_the_collapse(assert_scaled_close: AssertScaledClose) -> None:
    layer = _linear().eval()
    assert layer.weight.dtype == torch.float32
    layer.to(torch.float64)
    assert layer.weight.dtype == torch.float64
    assert_eval_is_fresh(layer, torch.randn(5, 4, dtype=torch.float64), assert_scaled_close)


def _edit_in_place(weight: Tensor) -> None:
    with torch.no_grad():
        weight.mul_(2)


def _edit_through_data(weight: Tensor) -> None:
    """Weight clipping, EMA and pruning helpers edit ``p.data``, which does not bump the version counter."""
    weight.data.mul_(2)


def test_in_place_edit_invalidates_the_collapse(layer: EPLayer, assert_scaled_close: AssertScaledClose) -> None:
    """Edits through ``.data`` bypass version counters (a documented limitation): see the next test."""
    x = _input(layer)
    before = layer.eval().weight.clone()
    _edit_in_place(layer.layer_dict["0"][0].weight)
    assert_changed(layer.weight, before)
    assert_eval_is_fresh(layer, x, assert_scaled_close)


def test_eval_after_data_edit_refreshes_the_collapse(layer: EPLayer, assert_scaled_close: AssertScaledClose) -> None:
    """The documented way out when an edit bypasses PyTorch's version counters: call ``eval()`` again."""
    x = _input(layer)
    before = layer.eval().weight.clone()
    _edit_through_data(layer.layer_dict["0"][0].weight)
    assert_changed(layer.eval().weight, before)
    assert_eval_is_fresh(layer, x, assert_scaled_close)


# ---- state_dict --------------------------------------------------------------------------
def _norm_keys(prefix: str) -> list[str]:
    return [f"{prefix}.{name}" for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]


def test_linear_state_dict_layout() -> None:
    layer = EPLinear(3, 5, depth=2, batch_norm=True, residual=True, residual_intervals=[1, 2], residual_mode="learn")
    layer.eval().weight  # noqa: B018  (a filled cache must not show up in the state_dict)
    state = layer.state_dict()
    # skips of intervals [1, 2] at depth 2, interval by interval: 0->1, 1->2, then 0->2
    assert list(state) == [
        "layer_dict.0.0.weight", "layer_dict.0.0.bias", *_norm_keys("layer_dict.0.1"),
        "layer_dict.1.0.weight", "layer_dict.1.0.bias", *_norm_keys("layer_dict.1.1"),
        "residual_dict.0_1.weight", "residual_dict.0_1.bias",
        "residual_dict.1_2.weight", "residual_dict.1_2.bias",
        "residual_dict.0_2.weight", "residual_dict.0_2.bias",
    ]  # fmt: skip
    shapes = {
        "layer_dict.0.0.weight": (5, 3), "layer_dict.1.0.weight": (5, 5), "layer_dict.0.1.running_mean": (5,),
        "residual_dict.0_1.weight": (5, 3), "residual_dict.1_2.weight": (5, 5), "residual_dict.0_2.weight": (5, 3),
    }  # fmt: skip
    assert {key: tuple(state[key].shape) for key in shapes} == shapes


def test_conv_state_dict_layout() -> None:
    layer = EPConv2d(2, 3, [3, 1, 3], 2, residual=True, residual_intervals=2, residual_mode="learn", width=2)
    state = layer.state_dict()
    assert list(state) == [
        "layer_dict.0.0.weight", "layer_dict.0.0.bias",
        "layer_dict.1.0.weight", "layer_dict.1.0.bias",
        "layer_dict.2.0.weight", "layer_dict.2.0.bias",
        "residual_dict.0_2.weight", "residual_dict.0_2.bias",
    ]  # fmt: skip
    shapes = {
        "layer_dict.0.0.weight": (6, 2, 3, 3), "layer_dict.1.0.weight": (6, 6, 1, 1),
        "layer_dict.2.0.weight": (3, 6, 3, 3), "residual_dict.0_2.weight": (6, 2, 1, 1),
    }  # fmt: skip
    assert {key: tuple(state[key].shape) for key in shapes} == shapes


def _original_style(state: dict[str, Tensor], prefix: str, weight: Tensor, bias: Tensor | None) -> dict[str, Tensor]:
    """Our state_dict plus the stale collapsed buffers the original library saved (garbage values on purpose)."""
    stale = {f"{prefix}weight": torch.full_like(weight, 7.0)}
    if bias is not None:
        stale[f"{prefix}bias"] = torch.full_like(bias, -7.0)
    return {**state, **stale}


@pytest.mark.parametrize("with_bias", [True, False], ids=["weight+bias", "weight-only"])
def test_strict_load_ignores_stale_collapsed_buffers(
    layer: EPLayer, with_bias: bool, assert_scaled_close: AssertScaledClose
) -> None:
    layer.eval()
    state = _original_style(layer.state_dict(), "", layer.weight, layer.bias if with_bias else None)
    fresh = type(layer).from_config(layer.config).double()
    fresh.load_state_dict(state, strict=True)
    assert "weight" in state  # the caller's dict is left alone
    assert "weight" not in fresh.state_dict() and "bias" not in fresh.state_dict()
    assert_scaled_close(fresh.eval().weight, layer.weight)
    assert_eval_is_fresh(fresh, _input(fresh), assert_scaled_close)


def test_strict_load_still_rejects_unknown_and_missing_keys() -> None:
    layer = _linear()
    state = layer.state_dict()
    with pytest.raises(RuntimeError, match="weights"):
        layer.load_state_dict({**state, "weights": torch.zeros(1)})
    del state["layer_dict.0.0.weight"]
    with pytest.raises(RuntimeError, match="layer_dict.0.0.weight"):
        layer.load_state_dict(state)


def test_nested_model_strict_loads_original_style_state_dict(
    randomise_batch_norm: RandomiseBatchNorm, assert_scaled_close: AssertScaledClose
) -> None:
    def model() -> nn.Sequential:
        return nn.Sequential(EPLinear(4, 6, depth=3, batch_norm=True), nn.ReLU(), EPLinear(6, 3, bias=False)).double()

    source = model().eval()
    randomise_batch_norm(source)
    # the second layer has no collapsed bias, so the original saved only its weight
    state = _original_style(source.state_dict(), "0.", source[0].weight, source[0].bias)
    state = _original_style(state, "2.", source[2].weight, None)
    target = model()
    target.load_state_dict(state, strict=True)
    x = torch.randn(3, 4, dtype=torch.float64)
    assert_scaled_close(target.eval()(x), source(x))


# ---- shapes, copies, attributes ----------------------------------------------------------
def test_linear_accepts_leading_batch_dims_with_batch_norm(assert_scaled_close: AssertScaledClose) -> None:
    layer = EPLinear(4, 3, depth=3, batch_norm=True).double()
    flat = copy.deepcopy(layer)
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    y = layer.train()(x)
    assert y.shape == (2, 5, 3)
    # batch-norm statistics run over every leading position, as for the flattened input
    assert_scaled_close(y, flat.train()(x.reshape(10, 4)).reshape(2, 5, 3))
    for name, buffer in flat.named_buffers():
        torch.testing.assert_close(layer.get_buffer(name), buffer)
    layer.eval()
    assert_scaled_close(layer(x), layer(x, override=True))


def test_deepcopy_is_independent(layer: EPLayer, assert_scaled_close: AssertScaledClose) -> None:
    x = _input(layer)
    original = layer.eval()(x)
    twin = copy.deepcopy(layer)
    assert_scaled_close(twin(x), original)
    with torch.no_grad():
        for parameter in twin.parameters():
            parameter.add_(1.0)
    assert torch.equal(layer(x), original)
    assert_changed(twin(x), original)
    assert_eval_is_fresh(twin, x, assert_scaled_close)


def test_linear_attributes() -> None:
    layer = EPLinear(3, 8, width=0.5, depth=4, residual=True, residual_intervals=-1, residual_mode="learn")
    assert (layer.in_features, layer.out_features, layer.hidden_features) == (3, 8, 4)
    assert (layer.depth, layer.width, layer.residual, layer.residual_mode) == (4, 0.5, True, "learn")
    assert layer.collapse_on_eval is True


def test_conv_attributes() -> None:
    # positional order: in, out, kernel_sizes, padding, stride
    layer = EPConv2d(2, 4, [5, 3, 1], 3, 2, width=2, depth=3)
    assert (layer.in_channels, layer.out_channels, layer.hidden_channels) == (2, 4, 8)
    assert (layer.kernel_sizes, layer.kernel_size, layer.depth) == ([5, 3, 1], (7, 7), 3)
    assert (layer.padding, layer.stride) == ((3, 3), (2, 2))  # per dim, as nn.Conv2d has them
    blocks = [block[0] for block in layer.layer_dict.values()]
    # padding on the first convolution only, stride on the last only
    assert [(b.kernel_size, b.padding, b.stride) for b in blocks] == [
        ((5, 5), (3, 3), (1, 1)), ((3, 3), (0, 0), (1, 1)), ((1, 1), (0, 0), (2, 2))
    ]


@pytest.mark.parametrize(
    ("kernel_sizes", "depth", "expected"),
    [(3, None, [3, 1]), (5, 1, [5]), (5, 4, [5, 1, 1, 1]), ([3, 5], None, [3, 5]), ([3, 5], 2, [3, 5])],
)
def test_conv_kernel_sizes_and_depth(kernel_sizes: Any, depth: int | None, expected: list[int]) -> None:
    layer = EPConv2d(2, 2, kernel_sizes, depth=depth)
    assert (layer.kernel_sizes, layer.depth) == (expected, len(expected))
    assert layer.kernel_size == (sum(expected) - len(expected) + 1,) * 2


def test_single_layer_conv_strides_and_pads_its_only_layer() -> None:
    (block,) = EPConv2d(2, 2, 3, 1, 2, depth=1).layer_dict.values()
    assert (block[0].padding, block[0].stride) == ((1, 1), (2, 2))


# ---- configs -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(LAYERS))
def test_from_config_round_trip(name: str, assert_scaled_close: AssertScaledClose) -> None:
    layer = LAYERS[name]().eval()
    rebuilt = type(layer).from_config(layer.config)
    assert rebuilt.config == layer.config
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in layer.state_dict().items()}
    rebuilt.load_state_dict(layer.state_dict())
    x = _input(layer)
    assert_scaled_close(rebuilt.eval()(x), layer(x))


@pytest.mark.parametrize("name", list(LAYERS))
def test_config_dict_round_trip_through_json(name: str) -> None:
    config = LAYERS[name]().config
    data = json.loads(json.dumps(config.to_dict()))
    assert type(config).from_dict(data) == config


@pytest.mark.parametrize(
    ("config_type", "data", "missing"),
    [
        (EPLinearConfig, {"in_features": 3, "out_features": 4}, "out_features"),
        (EPConv2dConfig, {"in_channels": 3, "out_channels": 4, "kernel_sizes": [3, 1]}, "in_channels"),
    ],
)
def test_config_from_dict_rejects_unknown_and_missing_keys(
    config_type: Any, data: dict[str, Any], missing: str
) -> None:
    assert config_type.from_dict(data).to_dict()[missing] == data[missing]
    with pytest.raises(ConfigError, match="colour"):
        config_type.from_dict({**data, "colour": "red"})
    with pytest.raises(ConfigError, match=missing):
        config_type.from_dict({k: v for k, v in data.items() if k != missing})

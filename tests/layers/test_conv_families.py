"""EPConv1d / EPConv2d / EPConv3d over a seeded covering sample of every option.

Axes: family x groups (1, 2, depthwise) x dilation x per-dim kernel sizes x stride x padding
x padding mode x skips (none, identity, learnable) x batch-norm x depth x width x input-size
parity. Each case checks the collapsed layer against the float64 expanded forward (float64
and float32), the plain ``nn.Conv1d/2d/3d`` the registry describes loaded with the collapsed
``.weight`` / ``.bias``, and the arithmetic output shape. The default run samples
:data:`DEFAULT_CASES` points; ``EPCLI_EXHAUSTIVE=1`` samples many more.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from epcli import (
    EPConv1d,
    EPConv1dConfig,
    EPConv2d,
    EPConv2dConfig,
    EPConv3d,
    EPConv3dConfig,
)
from epcli.layers import EPConv
from epcli.layers.registry import expected_state, plain_layer

AssertScaledClose = Callable[[Tensor, Tensor], None]
RandomiseBatchNorm = Callable[[nn.Module], None]

FAMILIES: dict[int, type[EPConv]] = {1: EPConv1d, 2: EPConv2d, 3: EPConv3d}
PADDING_MODES = ["zeros", "circular", "reflect", "replicate"]
DEFAULT_CASES = 90
EXHAUSTIVE_CASES = 1500


@dataclass(frozen=True)
class Case:
    """One sampled layer and the input sizes it is checked on."""

    ndim: int
    kwargs: dict[str, Any]
    sizes: list[tuple[int, ...]]  # spatial input sizes, one odd-sided and one even-sided

    @property
    def id(self) -> str:
        shown = {k: v for k, v in self.kwargs.items() if k not in ("in_channels", "out_channels")}
        return f"{self.ndim}d-{self.kwargs['in_channels']}-{self.kwargs['out_channels']}-" + ",".join(
            f"{k}={v}" for k, v in shown.items()
        ).replace(" ", "")

    def build(self) -> EPConv:
        return FAMILIES[self.ndim](**self.kwargs)


def _per_dim(rng: random.Random, ndim: int, choices: list[int]) -> int | tuple[int, ...]:
    """An int half of the time, else one value per dim."""
    if rng.random() < 0.5:
        return rng.choice(choices)
    return tuple(rng.choice(choices) for _ in range(ndim))


def _dims(value: int | tuple[int, ...], ndim: int) -> tuple[int, ...]:
    return (value,) * ndim if isinstance(value, int) else value


def _sample(rng: random.Random) -> Case:
    ndim = rng.choice([1, 2, 3])
    residual = rng.choice([False, "none", "learn"])
    depth = rng.choice([1, 2, 3, 4] if ndim < 3 else [1, 2, 3])
    group_kind = rng.choice(["one", "two", "depthwise"])
    if group_kind == "depthwise":
        in_channels = out_channels = groups = 4
    else:
        groups = 1 if group_kind == "one" else 2
        in_channels, out_channels = (4, 4) if residual == "none" else (rng.choice([2, 4]), rng.choice([2, 4]))
    width = 1 if residual == "none" else rng.choice([1, 2])
    intervals = rng.choice([1, 2, -1, [1, -1]])
    odd = [1, 3] if ndim == 3 else [1, 3, 5]
    sizes = odd if residual else [1, 2, 3, 4]
    kernels = [_per_dim(rng, ndim, sizes) for _ in range(depth)]
    if rng.random() < 0.3:  # the int shorthand: [k] + [1] * (depth - 1)
        kernels = kernels[0] if isinstance(kernels[0], int) else [kernels[0], *[1] * (depth - 1)]
    kwargs: dict[str, Any] = {
        "in_channels": in_channels,
        "out_channels": out_channels,
        "kernel_sizes": kernels,
        "padding": _per_dim(rng, ndim, [0, 1, 2, 3]),
        "stride": _per_dim(rng, ndim, [1, 2]),
        "width": width,
        "depth": depth,
        "bias": rng.random() < 0.7,
        "batch_norm": rng.random() < 0.5,
        "residual": bool(residual),
        "residual_intervals": intervals,
        "residual_mode": residual or "none",
        "groups": groups,
        "dilation": _per_dim(rng, ndim, [1, 2]),
        "padding_mode": rng.choice(PADDING_MODES),
    }
    shapes = [_dims(k, ndim) for k in (kernels if isinstance(kernels, list) else [kernels] + [1] * (depth - 1))]
    spans = [d * (sum(k) - depth) + 1 for d, k in zip(_dims(kwargs["dilation"], ndim), zip(*shapes))]
    paddings = _dims(kwargs["padding"], ndim)
    # smallest legal side (padded map covers the span; reflect pads less than the side), then odd/even sides
    smallest = [max(span - 2 * p, p + 1, 1) for span, p in zip(spans, paddings)]
    bump = rng.choice([0, 1, 2])
    input_sizes = [
        tuple(s + bump + (0 if (s + bump) % 2 == parity else 1) for s in smallest) for parity in (1, 0)
    ]
    return Case(ndim, kwargs, input_sizes)


def _cases() -> list[Case]:
    rng = random.Random(20261201)
    count = EXHAUSTIVE_CASES if os.environ.get("EPCLI_EXHAUSTIVE") else DEFAULT_CASES
    cases: dict[str, Case] = {}
    while len(cases) < count:
        case = _sample(rng)
        cases.setdefault(case.id, case)
    return list(cases.values())


CASES = _cases()


def test_the_sample_covers_every_value_of_every_axis() -> None:
    """The covering sample is only worth its name if each option value occurs (and pairs of the main ones)."""
    seen: dict[str, set[Any]] = {}
    for case in CASES:
        kw = case.kwargs
        depthwise = kw["groups"] == kw["in_channels"] == kw["out_channels"] and kw["groups"] > 1
        for axis, value in {
            "family": case.ndim,
            "groups": "depthwise" if depthwise else kw["groups"],
            "skips": kw["residual_mode"] if kw["residual"] else "off",
            "padding_mode": kw["padding_mode"],
            "batch_norm": kw["batch_norm"],
            "depth": kw["depth"],
            "rectangular": any(isinstance(v, tuple) for v in (kw["padding"], kw["stride"], kw["dilation"])),
            "dilated": kw["dilation"] != 1,
            "strided": kw["stride"] != 1,
            "family x groups": (case.ndim, "depthwise" if depthwise else kw["groups"]),
            "family x skips": (case.ndim, kw["residual_mode"] if kw["residual"] else "off"),
        }.items():
            seen.setdefault(axis, set()).add(value)
    assert seen["family"] == {1, 2, 3} and seen["groups"] == {1, 2, "depthwise"}
    assert seen["skips"] == {"off", "none", "learn"} and seen["padding_mode"] == set(PADDING_MODES)
    assert seen["batch_norm"] == {False, True} and seen["depth"] == {1, 2, 3, 4}
    assert seen["rectangular"] == seen["dilated"] == seen["strided"] == {False, True}
    assert len(seen["family x groups"]) == 9 and len(seen["family x skips"]) == 9


def _plain_output(case: Case, layer: EPConv, x: Tensor) -> Tensor:
    """The registry's plain nn.ConvNd with the collapsed weight and bias loaded (strictly: same keys and shapes)."""
    plain = plain_layer(layer.config, bias=layer.bias is not None, dtype=x.dtype)
    state = {"weight": layer.weight} if layer.bias is None else {"weight": layer.weight, "bias": layer.bias}
    plain.load_state_dict(state, strict=True)
    assert type(plain).__name__ == f"Conv{case.ndim}d"
    assert {k: tuple(v.shape) for k, v in expected_state(layer.config, collapsed=True).items()} == {
        k: tuple(v.shape) for k, v in state.items()
    }
    return plain(x)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
@torch.no_grad()
def test_collapsed_equals_expanded_and_the_plain_conv(
    case: Case, randomise_batch_norm: RandomiseBatchNorm, assert_scaled_close: AssertScaledClose
) -> None:
    layer = case.build()
    randomise_batch_norm(layer)
    layer.float().eval()  # float32-representable parameters: the float64 reference is the same map
    kw = case.kwargs
    groups = kw["groups"]
    assert all(block[0].groups == groups for block in layer.layer_dict.values())
    assert all(p.groups == groups and p.kernel_size == (1,) * case.ndim for p in layer.residual_dict.values())
    inputs = [torch.randn(2, kw["in_channels"], *sizes) for sizes in case.sizes]
    layer.double()
    expected = [layer(x.double(), override=True) for x in inputs]
    kernel = layer.kernel_size
    assert tuple(layer.weight.shape) == (kw["out_channels"], kw["in_channels"] // groups, *kernel)
    for x, reference in zip(inputs, expected):
        assert tuple(reference.shape[1:]) == layer.config.output_shape(tuple(x.shape[1:]))
    for dtype in (torch.float64, torch.float32):
        layer.to(dtype)
        for x, reference in zip(inputs, expected):
            collapsed = layer(x.to(dtype))
            assert collapsed.dtype == dtype
            assert_scaled_close(collapsed, reference)
            assert torch.equal(_plain_output(case, layer, x.to(dtype)), collapsed)


# ---- probe reference: impulses recover the collapsed kernel -------------------------------------------
def probe_kernel(layer: EPConv, extra: int) -> tuple[Tensor, Tensor]:
    """(dense kernel [C_out, C_in, *K], f(0)) of a conv layer from impulses, using only the expanded forward.

    Output position t0 = ceil(padding / stride) per dim reads padded-input positions
    t0 * stride + dilation * a, i.e. input positions start + dilation * a with start >= 0:
    wholly inside an input of start + span (+ ``extra``, to vary parity) per dim, so the
    padding mode does not matter there. An impulse at input channel c, offset a gives
    ``kernel[:, c, a] + bias`` at t0; off-group entries come out zero.
    """
    c = layer.config
    ndim, channels = c.ndim, c.in_channels
    kernel, stride, padding, dilation = c.kernel_size, c.per_dim(c.stride), c.per_dim(c.padding), c.per_dim(c.dilation)
    t0 = [math.ceil(p / s) for p, s in zip(padding, stride)]
    start = [t * s - p for t, s, p in zip(t0, stride, padding)]
    # at least padding + 1 per dim, so that every padding mode can pad it
    size = [max(b + d * (k - 1) + 1, p + 1) + extra for b, d, k, p in zip(start, dilation, kernel, padding)]
    taps = list(torch.cartesian_prod(*[torch.arange(k) for k in kernel]).reshape(-1, ndim).tolist())
    impulses = torch.zeros(channels * len(taps), channels, *size, dtype=torch.float64)
    for i, (channel, tap) in enumerate((ch, t) for ch in range(channels) for t in taps):
        impulses[(i, channel, *[b + d * a for b, d, a in zip(start, dilation, tap)])] = 1.0
    inputs = torch.cat([torch.zeros(1, channels, *size, dtype=torch.float64), impulses])
    response = layer(inputs, override=True)
    zero = response[0]
    at_t0 = response[(slice(1, None), slice(None), *t0)] - zero[(slice(None), *t0)]  # [C_in * taps, C_out]
    return at_t0.T.reshape(-1, channels, *kernel), zero  # [C_out, C_in, *K]


def _dense(weight: Tensor, groups: int) -> Tensor:
    """A grouped kernel [C_out, C_in / g, *K] as the block-diagonal dense kernel [C_out, C_in, *K]."""
    out_channels, per_group = weight.shape[:2]
    dense = weight.new_zeros(out_channels, per_group * groups, *weight.shape[2:])
    rows = out_channels // groups
    for g in range(groups):
        dense[g * rows : (g + 1) * rows, g * per_group : (g + 1) * per_group] = weight[g * rows : (g + 1) * rows]
    return dense


PROBES = [c for c in CASES if math.prod(c.build().kernel_size) * c.kwargs["in_channels"] <= 200][:24]
"""The first sampled cases small enough to probe quickly (inputs per probe: in_channels x kernel taps)."""


@pytest.mark.parametrize("extra", [0, 1], ids=["size+0", "size+1"])
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in PROBES])
@torch.no_grad()
def test_collapsed_kernel_matches_impulse_probe(
    case: Case, extra: int, randomise_batch_norm: RandomiseBatchNorm, assert_scaled_close: AssertScaledClose
) -> None:
    layer = case.build()
    randomise_batch_norm(layer)
    layer.double().eval()
    kernel, zero_response = probe_kernel(layer, extra)
    assert_scaled_close(_dense(layer.weight, layer.groups), kernel)
    if layer.bias is None:
        assert torch.count_nonzero(zero_response) == 0
    else:  # f(0) is the bias at every output position, including those that read padding
        assert_scaled_close(layer.bias.reshape(-1, *[1] * case.ndim).expand_as(zero_response), zero_response)


# ---- structure, API and configs ------------------------------------------------------------------------
@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_every_family_keeps_the_positional_api_and_state_layout(ndim: int) -> None:
    """(in, out, kernel_sizes, padding, stride, width, depth, ...), padding on the first conv, stride on the last."""
    layer = FAMILIES[ndim](2, 4, [3, 1, 3], 1, 2, 2, None, True, True, True, 2, "learn", groups=2, dilation=2)
    assert sorted(layer.state_dict()) == sorted(
        [f"layer_dict.{i}.0.{p}" for i in range(3) for p in ("weight", "bias")]
        + [f"layer_dict.{i}.1.{b}" for i in range(3) for b in
           ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]
        + [f"residual_dict.0_2.{p}" for p in ("weight", "bias")]
    )
    convs = [block[0] for block in layer.layer_dict.values()]
    assert [type(c).__name__ for c in convs] == [f"Conv{ndim}d"] * 3
    assert [(c.padding, c.stride, c.dilation, c.groups) for c in convs] == [
        ((1,) * ndim, (1,) * ndim, (2,) * ndim, 2), ((0,) * ndim, (1,) * ndim, (2,) * ndim, 2),
        ((0,) * ndim, (2,) * ndim, (2,) * ndim, 2),
    ]
    assert type(layer.layer_dict["0"][1]).__name__ == f"BatchNorm{ndim}d"
    assert layer.kernel_size == (5,) * ndim and (layer.hidden_channels, layer.groups, layer.dilation) == (8, 2, (2,) * ndim)


def test_rectangular_sizes_per_dim() -> None:
    layer = EPConv2d(2, 2, [(3, 1), (1, 5)], (1, 2), (2, 1), dilation=(1, 3))
    assert layer.kernel_size == (3, 5) and layer.weight.shape == (2, 2, 3, 5)
    assert [block[0].kernel_size for block in layer.layer_dict.values()] == [(3, 1), (1, 5)]
    assert (layer.padding, layer.stride, layer.dilation) == ((1, 2), (2, 1), (1, 3))
    assert EPConv2d(2, 2, [(3, 3)], (1, 1)).config == EPConv2d(2, 2, [3], 1).config  # uniform per-dim = int


OLD_STYLE = {  # an EPConv2d config as epcli wrote it before groups, dilation and padding modes
    "width": 1, "depth": 3, "bias": True, "batch_norm": True, "residual": True, "residual_intervals": [2],
    "residual_mode": "learn", "collapse_on_eval": True, "negative_slope": 0.0, "bn_eps": 1e-05, "bn_momentum": 0.1,
    "in_channels": 1, "out_channels": 16, "kernel_sizes": [3, 1, 3], "padding": 2, "stride": 1,
}


def test_old_style_config_round_trips_unchanged() -> None:
    config = EPConv2dConfig.from_dict(OLD_STYLE)
    assert (config.groups, config.dilation, config.padding_mode) == (1, 1, "zeros")
    assert config.to_dict() == OLD_STYLE  # written exactly as before: older epcli versions read it too
    assert json.dumps(config.to_dict()) == json.dumps(OLD_STYLE)


@pytest.mark.parametrize(
    ("config_type", "data"),
    [
        (EPConv1dConfig, {"in_channels": 4, "out_channels": 4, "kernel_sizes": [3, 3], "groups": 4, "dilation": 2,
                          "padding_mode": "circular", "padding": 2}),
        (EPConv2dConfig, {"in_channels": 2, "out_channels": 4, "kernel_sizes": [[3, 1], 1], "padding": [1, 0],
                          "stride": [2, 1], "dilation": [1, 2]}),
        (EPConv3dConfig, {"in_channels": 2, "out_channels": 2, "kernel_sizes": [1, [3, 1, 3]], "groups": 2,
                          "padding_mode": "replicate"}),
    ],
)
def test_new_config_round_trips_through_json(config_type: Any, data: dict[str, Any]) -> None:
    config = config_type.from_dict(data)
    assert config_type.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert config.to_dict() == {**config_type(in_channels=1, out_channels=1, kernel_sizes=(3, 1)).to_dict(), **data}


def test_families_are_distinct_configs() -> None:
    data = {"in_channels": 2, "out_channels": 2, "kernel_sizes": [3, 1]}
    assert EPConv1dConfig.from_dict(data) != EPConv2dConfig.from_dict(data)


def test_depthwise_chain_keeps_the_signal_scale() -> None:
    """Kaiming on one group's fan-out: torch's fan-out counts all 32 channels and would shrink the output ~1000x."""
    layer = EPConv2d(32, 32, 3, 1, depth=4, groups=32, bias=False)
    x = torch.randn(8, 32, 16, 16)
    with torch.no_grad():
        std = layer(x).std().item()
    assert 0.3 < std < 5.0

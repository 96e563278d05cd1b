"""The conv algebra (1-D to 3-D, groups, dilation, rectangular kernels) against ``F.conv*d`` of the chain itself."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from epcli.core import BatchNormFold, ChainLayer, ConvAlgebra, collapse_chain
from epcli.core.conv import compose_kernels, pad_kernel_to

AssertScaledClose = Callable[[Tensor, Tensor], None]

f64 = torch.float64
CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _kernel(out_channels: int, in_per_group: int, sizes: tuple[int, ...]) -> Tensor:
    return torch.randn(out_channels, in_per_group, *sizes, dtype=f64)


# (ndim, channels in -> mid -> out, groups, inner kernel, outer kernel); rectangular and even sizes included
COMPOSITIONS = [
    (1, (2, 3, 4), 1, (1,), (1,)),
    (1, (2, 3, 4), 1, (4,), (3,)),
    (1, (4, 4, 4), 4, (3,), (5,)),  # depthwise
    (2, (2, 3, 4), 1, (3, 3), (5, 1)),
    (2, (2, 3, 4), 1, (2, 5), (4, 2)),
    (2, (4, 6, 2), 2, (3, 1), (1, 3)),
    (2, (6, 6, 6), 6, (3, 5), (3, 3)),  # depthwise, rectangular
    (2, (6, 12, 6), 3, (1, 1), (3, 2)),
    (3, (2, 3, 4), 1, (3, 1, 2), (1, 3, 3)),
    (3, (4, 4, 8), 4, (3, 3, 3), (1, 3, 1)),  # depthwise in, channel multiplier 2 out
]


@pytest.mark.parametrize(("ndim", "channels", "groups", "inner", "outer"), COMPOSITIONS)
def test_compose_kernels_equals_the_two_grouped_convolutions(
    ndim: int, channels: tuple[int, int, int], groups: int, inner: tuple[int, ...], outer: tuple[int, ...],
    assert_scaled_close: AssertScaledClose,
) -> None:
    c_in, c_mid, c_out = channels
    first = _kernel(c_mid, c_in // groups, inner)  # [C_mid, C_in / g, *K]
    second = _kernel(c_out, c_mid // groups, outer)  # [C_out, C_mid / g, *k]
    x = torch.randn(2, c_in, *[9 - d for d in range(ndim)], dtype=f64)  # odd and even sizes
    composed = compose_kernels(second, first, groups)
    assert composed.shape == (c_out, c_in // groups, *[a + b - 1 for a, b in zip(inner, outer)])
    conv = CONV[ndim]
    assert_scaled_close(conv(x, composed, groups=groups), conv(conv(x, first, groups=groups), second, groups=groups))


@pytest.mark.parametrize("ndim", [1, 2, 3])
@pytest.mark.parametrize("groups", [1, 2])
def test_dilated_chain_is_the_undilated_composition_applied_dilated(
    ndim: int, groups: int, assert_scaled_close: AssertScaledClose
) -> None:
    """Every conv dilated by d (per dim): one conv with kernel sum(k) - depth + 1 per dim, dilation d."""
    rng = random.Random(ndim * 10 + groups)
    dilation = tuple(rng.choice([1, 2, 3]) for _ in range(ndim))
    shapes = [tuple(rng.choice([1, 2, 3]) for _ in range(ndim)) for _ in range(3)]
    kernels = [_kernel(4, 4 // groups, shape) for shape in shapes]
    x = torch.randn(2, 4, *[18 - d for d in range(ndim)], dtype=f64)
    chained = x
    for kernel in kernels:
        chained = CONV[ndim](chained, kernel, dilation=dilation, groups=groups)
    composed = kernels[0]
    for kernel in kernels[1:]:
        composed = compose_kernels(kernel, composed, groups)
    assert composed.shape[2:] == tuple(sum(s) - len(shapes) + 1 for s in zip(*shapes))
    assert_scaled_close(CONV[ndim](x, composed, dilation=dilation, groups=groups), chained)


def test_pad_kernel_to_centres_the_kernel_per_dim() -> None:
    kernel = torch.arange(1.0, 7.0).reshape(1, 1, 3, 2)
    expected = torch.zeros(1, 1, 7, 4)
    expected[..., 2:5, 1:3] = kernel
    assert torch.equal(pad_kernel_to(kernel, [7, 4]), expected)
    assert torch.equal(pad_kernel_to(kernel, [3, 2]), kernel)


@pytest.mark.parametrize("sizes", [[4, 2], [3, 3], [1, 2], [5, 0]])
def test_pad_kernel_to_rejects_odd_difference_or_shrinking(sizes: list[int]) -> None:
    with pytest.raises(ValueError, match="cannot centre"):
        pad_kernel_to(torch.ones(1, 1, 3, 2), sizes)


@pytest.mark.parametrize(("ndim", "channels", "groups"), [(1, 4, 1), (2, 6, 3), (3, 4, 4)])
def test_identity_is_a_grouped_dirac(ndim: int, channels: int, groups: int) -> None:
    identity = ConvAlgebra(ndim, groups).identity(channels, torch.empty(0, dtype=f64))
    assert identity.bias is None and identity.weight.shape == (channels, channels // groups, *[1] * ndim)
    x = torch.randn(2, channels, *[5] * ndim, dtype=f64)
    assert torch.equal(CONV[ndim](x, identity.weight, groups=groups), x)


# ---- whole chains: collapse_chain against a node-by-node forward written out here --------------
def _centre_crop(source: Tensor, like: Tensor, ndim: int) -> Tensor:
    """The centre of ``source`` with ``like``'s spatial sizes (sizes differ by even amounts: odd kernels)."""
    window = [
        slice((a - b) // 2, (a - b) // 2 + b) for a, b in zip(source.shape[-ndim:], like.shape[-ndim:], strict=True)
    ]
    return source[(..., *window)]


def _naive_forward(
    x: Tensor, layers: list[ChainLayer], skips: dict[tuple[int, int], ChainLayer | None], ndim: int, groups: int,
    dilation: int,
) -> Tensor:
    conv = CONV[ndim]
    nodes = [x]
    for j, layer in enumerate(layers):
        v = conv(nodes[j], layer.weight, layer.bias, dilation=dilation, groups=groups)
        if layer.norm is not None:
            v = v * layer.norm.scale.reshape(-1, *[1] * ndim) + layer.norm.shift.reshape(-1, *[1] * ndim)
        for (source, destination), projection in skips.items():
            if destination == j + 1:
                branch = _centre_crop(nodes[source], v, ndim)
                if projection is not None:
                    branch = conv(branch, projection.weight, projection.bias, groups=groups)
                v = v + branch
        nodes.append(v)
    return nodes[-1]


CHAINS = [
    # (ndim, groups, dilation, kernel shapes, skip -> learnable)
    (1, 1, 1, [(3,), (1,), (5,)], {(0, 2): False, (1, 3): True}),
    (1, 4, 2, [(3,), (3,), (3,), (1,)], {(0, 1): False, (1, 3): False, (0, 4): True}),  # depthwise, dilated
    (2, 2, 1, [(3, 1), (1, 3), (3, 5)], {(0, 3): False, (0, 1): True}),
    (2, 4, 3, [(1, 3), (5, 3)], {(0, 2): True, (1, 2): False}),  # depthwise, dilated
    (3, 2, 1, [(3, 1, 1), (1, 3, 3)], {(0, 2): False}),
]


@pytest.mark.parametrize(("ndim", "groups", "dilation", "shapes", "learnable"), CHAINS)
def test_collapse_chain_grouped_dilated_matches_naive_forward(
    ndim: int, groups: int, dilation: int, shapes: list[tuple[int, ...]], learnable: dict[tuple[int, int], bool],
    assert_scaled_close: AssertScaledClose,
) -> None:
    channels = 4
    per_group = channels // groups

    def layer(sizes: tuple[int, ...], norm: bool) -> ChainLayer:
        fold = BatchNormFold(torch.rand(channels, dtype=f64) + 0.5, torch.randn(channels, dtype=f64)) if norm else None
        return ChainLayer(_kernel(channels, per_group, sizes), torch.randn(channels, dtype=f64), fold)

    layers = [layer(shape, norm=j % 2 == 0) for j, shape in enumerate(shapes)]
    skips = {edge: layer((1,) * ndim, norm=False) if learn else None for edge, learn in learnable.items()}
    affine = collapse_chain(ConvAlgebra(ndim, groups), channels, layers, skips)
    assert affine.weight.shape == (channels, per_group, *[sum(s) - len(shapes) + 1 for s in zip(*shapes)])
    x = torch.randn(2, channels, *[dilation * 8 + 3 + d for d in range(ndim)], dtype=f64)
    collapsed = CONV[ndim](x, affine.weight, affine.bias, dilation=dilation, groups=groups)
    assert_scaled_close(collapsed, _naive_forward(x, layers, skips, ndim, groups, dilation))

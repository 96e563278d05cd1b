"""Convolution kernels as affine maps: composition, centred sums, alignment.

A node of an EP conv graph is ``v = K (*) x_pad + c``: a *valid* cross-correlation
of the zero-padded layer input with a square kernel ``K`` of odd size, plus a
per-channel bias. Composing a layer kernel ``W`` (size k) after a node kernel
(size K) gives a kernel of size ``K + k - 1`` (a full 2-D convolution of the two
kernels); an identity skip is a centred Dirac kernel; sums pad the smaller
kernel centrally. Padding is applied once at the input and the stride once at
the output, so the result is ``conv2d(x, K, c, stride, padding)`` for every
input size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from epcli.core.affine import Affine, sum_biases

__all__ = ["ConvAlgebra", "compose_kernels", "pad_kernel_to", "align_feature_map"]


def compose_kernels(outer: Tensor, inner: Tensor) -> Tensor:
    """Kernel of ``outer (*) (inner (*) x)``, both valid cross-correlations.

    outer: [C_out, C_mid, k, k], inner: [C_mid, C_in, K, K] -> [C_out, C_in, K + k - 1, K + k - 1].
    """
    k = outer.shape[-1]
    # treat C_in as the batch and C_mid as channels: [C_in, C_mid, K, K]
    as_batch = inner.transpose(0, 1)
    # correlation with the flipped kernel and full padding is a full convolution
    full = F.conv2d(as_batch, outer.flip(-1, -2), padding=k - 1)  # [C_in, C_out, K+k-1, K+k-1]
    return full.transpose(0, 1)  # [C_out, C_in, K+k-1, K+k-1]


def pad_kernel_to(kernel: Tensor, size: int) -> Tensor:
    """Zero-pad a square kernel centrally to ``size`` (the size difference must be even)."""
    grow = size - kernel.shape[-1]
    if grow < 0 or grow % 2:
        raise ValueError(f"cannot centre a kernel of size {kernel.shape[-1]} in size {size}")
    if grow == 0:
        return kernel
    half = grow // 2
    return F.pad(kernel, [half, half, half, half])


def align_feature_map(source: Tensor, offset: int, lengths: tuple[int, int]) -> Tensor:
    """``source[..., offset + i, offset + j]`` for i, j below ``lengths``; zero where that falls outside.

    This is how an identity skip lines a feature map up with a (smaller or larger)
    destination: both are sampled at the same input coordinates (a centre crop,
    or a centred zero-pad).
    source: [N, C, H, W] -> [N, C, lengths[0], lengths[1]].
    """
    height, width = source.shape[-2:]
    before = max(0, -offset)
    after_h = max(0, offset + lengths[0] - height)
    after_w = max(0, offset + lengths[1] - width)
    if before or after_h or after_w:
        source = F.pad(source, [before, after_w, before, after_h])
    start = offset + before
    return source[..., start : start + lengths[0], start : start + lengths[1]]


class ConvAlgebra:
    """Composition and sums of convolution kernels (``nn.Conv2d`` chains)."""

    @staticmethod
    def identity(channels: int, like: Tensor) -> Affine:
        eye = torch.eye(channels, dtype=like.dtype, device=like.device)
        return Affine(eye[:, :, None, None], None)  # [C, C, 1, 1]

    @staticmethod
    def compose(weight: Tensor, bias: Tensor | None, inner: Affine) -> Affine:
        # a constant feature map c passes through W as sum over the kernel window of W times c
        inner_bias = None if inner.bias is None else weight.sum(dim=(2, 3)) @ inner.bias
        return Affine(compose_kernels(weight, inner.weight), sum_biases(inner_bias, bias))

    @staticmethod
    def add(a: Affine, b: Affine) -> Affine:
        size = max(a.weight.shape[-1], b.weight.shape[-1])
        weight = pad_kernel_to(a.weight, size) + pad_kernel_to(b.weight, size)
        return Affine(weight, sum_biases(a.bias, b.bias))

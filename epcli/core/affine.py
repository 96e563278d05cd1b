"""Affine maps ``v = A s + c`` and the linear (matrix) algebra on them.

Every node of an EP layer graph is an affine function of the layer input. The
collapse engine carries one :class:`Affine` per live node and updates it edge by
edge, so the collapsed layer is built with one matrix product per edge.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Affine", "BatchNormFold", "LinearAlgebra", "sum_biases"]


@dataclass(frozen=True)
class Affine:
    """``v = weight (*) s + bias``; ``bias`` is None when nothing contributes one.

    For linear maps ``weight`` is ``[out, in]``; for convolutions it is a kernel
    ``[out, in / groups, *K]`` applied as a valid cross-correlation (see ``core.conv``).
    """

    weight: Tensor
    bias: Tensor | None

    def scaled(self, scale: Tensor, shift: Tensor) -> Affine:
        """Per-output-channel ``scale * v + shift`` (a folded batch-norm)."""
        # scale: [out] -> [out, 1, ...] to broadcast over the weight's trailing dims
        per_row = scale.reshape(-1, *([1] * (self.weight.dim() - 1)))
        bias = shift if self.bias is None else self.bias * scale + shift
        return Affine(self.weight * per_row, bias)


@dataclass(frozen=True)
class BatchNormFold:
    """An eval-mode batch-norm as ``scale * v + shift`` per channel."""

    scale: Tensor
    shift: Tensor

    @classmethod
    def from_statistics(
        cls,
        running_mean: Tensor,
        running_var: Tensor,
        eps: float,
        gamma: Tensor | None = None,
        beta: Tensor | None = None,
    ) -> BatchNormFold:
        """``scale = gamma / sqrt(var + eps)``, ``shift = beta - mean * scale`` (affine=False: gamma 1, beta 0)."""
        scale = torch.rsqrt(running_var + eps)
        if gamma is not None:
            scale = gamma * scale
        shift = -running_mean * scale
        if beta is not None:
            shift = beta + shift
        return cls(scale, shift)


def sum_biases(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    """Sum of two optional biases; None stands for zero."""
    if a is None:
        return b
    if b is None:
        return a
    return a + b


class LinearAlgebra:
    """Composition and sums of dense affine maps (``nn.Linear`` chains)."""

    @staticmethod
    def identity(features: int, like: Tensor) -> Affine:
        return Affine(torch.eye(features, dtype=like.dtype, device=like.device), None)

    @staticmethod
    def compose(weight: Tensor, bias: Tensor | None, inner: Affine) -> Affine:
        """``(W, b) o (A, c) = (W A, W c + b)``."""
        inner_bias = None if inner.bias is None else weight @ inner.bias
        return Affine(weight @ inner.weight, sum_biases(inner_bias, bias))

    @staticmethod
    def add(a: Affine, b: Affine) -> Affine:
        return Affine(a.weight + b.weight, sum_biases(a.bias, b.bias))

    @staticmethod
    def compose_lean(weight: Tensor, bias: Tensor | None, inner: Affine) -> Affine:
        """:meth:`compose` without autograd and without a cast copy of ``weight`` (any dtype): it is cast to
        ``inner``'s dtype a block of rows at a time, so the product costs one new matrix. (Writing the product over
        ``inner``'s own, a column block at a time, would save that one too, but costs 1.5-4x the time on CPU.)"""
        dtype, inner_weight = inner.weight.dtype, inner.weight
        rows, middle = weight.shape
        step = max(1, _BLOCK_BYTES // (inner_weight.element_size() * max(1, middle)))
        out = inner_weight.new_empty(rows, inner_weight.shape[1])
        inner_bias = None if inner.bias is None else inner.bias.new_empty(rows)
        buffer = inner_weight.new_empty(min(step, rows), middle)  # one buffer: blocks allocated afresh fragment the heap
        for start in range(0, rows, step):
            block = buffer[: min(step, rows - start)].copy_(weight[start : start + step])
            torch.matmul(block, inner_weight, out=out[start : start + step])  # rows of a contiguous matrix
            if inner_bias is not None and inner.bias is not None:
                torch.matmul(block, inner.bias, out=inner_bias[start : start + step])
        return Affine(out, sum_biases(inner_bias, None if bias is None else bias.to(dtype)))


_BLOCK_BYTES = 4 << 20
"""The size of one block of :meth:`LinearAlgebra.compose_lean`: small beside a large layer, large enough for BLAS."""

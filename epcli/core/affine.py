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

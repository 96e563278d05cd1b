"""Convolution kernels as affine maps over any number of spatial dims: composition, centred sums, groups.

A node of an EP conv graph is ``v = K (*) x_pad + c``: a *valid* cross-correlation
of the padded layer input with a kernel ``K`` of shape ``[C_out, C_in / groups, *sizes]``
(one size per spatial dim, 1-D to 3-D), plus a per-channel bias. The arithmetic is
the same in every spatial dim, so it is written once over ``ndim``:

- **composition**: a layer kernel of size k after a node kernel of size K gives a
  kernel of size ``K + k - 1`` per dim (a full convolution of the two kernels);
- **identity**: a centred Dirac kernel; sums pad the smaller kernel centrally per dim;
- **groups**: every conv of a chain has the same ``groups``, so the channels split into
  ``groups`` independent blocks and kernels compose block by block (one grouped
  convolution does all blocks at once); an identity is a grouped Dirac;
- **dilation**: every conv of a chain dilated by d is the composition of the *undilated*
  kernels, applied with dilation d. Proof, per dim:
  ``(W2 *_d (W1 *_d x))[t] = sum_b W2[b] sum_a W1[a] x[t + d b + d a]
  = sum_c (sum_{a+b=c} W1[a] W2[b]) x[t + d c]``, and ``sum_{a+b=c} W1[a] W2[b]`` is the
  undilated composition (W2 * W1)[c]. Identity skips land at centred offsets that are
  multiples of d (odd kernels), i.e. at the undilated Dirac's centre.

Padding is applied once at the input (in any padding mode) and the stride once at the
output, so the collapse is ``conv(pad(x), K, c, stride, dilation, groups)`` for every input size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from epcli.core.affine import Affine, sum_biases

__all__ = ["PADDING_MODES", "ConvAlgebra", "compose_kernels", "conv_nd", "pad_kernel_to", "pad_widths"]

PADDING_MODES = ("zeros", "circular", "reflect", "replicate")
"""``nn.ConvNd`` padding modes; all are exact because the chain pads once, at the input."""

_CONV: dict[int, Callable[..., Tensor]] = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def conv_nd(ndim: int) -> Callable[..., Tensor]:
    """``F.conv1d`` / ``F.conv2d`` / ``F.conv3d`` for ``ndim`` spatial dims."""
    try:
        return _CONV[ndim]
    except KeyError:
        raise ValueError(f"convolutions have 1, 2 or 3 spatial dims, not {ndim}") from None


def pad_widths(padding: Sequence[int]) -> list[int]:
    """``F.pad``'s argument for a symmetric per-dim ``padding`` (first dim first): last dim first, (before, after) each."""
    return [p for size in reversed(padding) for p in (size, size)]


def compose_kernels(outer: Tensor, inner: Tensor, groups: int = 1) -> Tensor:
    """Kernel of ``outer (*) (inner (*) x)``, both valid cross-correlations with ``groups`` groups.

    outer: [C_out, C_mid / g, *k], inner: [C_mid, C_in / g, *K] -> [C_out, C_in / g, *(K + k - 1)].
    """
    if all(k == 1 for k in outer.shape[2:]):
        # a pointwise outer kernel only mixes channels, group by group: one batched matrix product
        # (the common [k] + [1] * (depth - 1) chain; a grouped float64 conv would loop over the groups)
        out_channels, mid_per_group = outer.shape[:2]
        blocks = outer.reshape(groups, out_channels // groups, mid_per_group)  # [g, C_out / g, C_mid / g]
        columns = inner.reshape(groups, mid_per_group, -1)  # [C_mid, C_in / g, *K] -> [g, C_mid / g, C_in / g * prod(K)]
        return torch.bmm(blocks, columns).reshape(out_channels, *inner.shape[1:])  # [C_out, C_in / g, *K]
    ndim = outer.dim() - 2
    spatial = tuple(range(2, outer.dim()))
    # C_in / g as the batch, C_mid (ordered by group) as channels: [C_in / g, C_mid, *K]
    as_batch = inner.transpose(0, 1)
    # correlation with the flipped kernel and full padding is a full convolution; groups keep the blocks apart
    full = conv_nd(ndim)(
        as_batch, outer.flip(spatial), padding=[k - 1 for k in outer.shape[2:]], groups=groups
    )  # [C_in / g, C_out, *(K + k - 1)]
    return full.transpose(0, 1)  # [C_out, C_in / g, *(K + k - 1)]


def pad_kernel_to(kernel: Tensor, sizes: Sequence[int]) -> Tensor:
    """Zero-pad a kernel ``[C_out, C_in / g, *K]`` centrally to ``sizes`` (each difference must be even)."""
    grow = [size - k for size, k in zip(sizes, kernel.shape[2:], strict=True)]
    if any(g < 0 or g % 2 for g in grow):
        raise ValueError(f"cannot centre a kernel of size {list(kernel.shape[2:])} in size {list(sizes)}")
    if not any(grow):
        return kernel
    return F.pad(kernel, pad_widths([g // 2 for g in grow]))


@dataclass(frozen=True)
class ConvAlgebra:
    """Composition and sums of convolution kernels of ``ndim`` spatial dims with ``groups`` groups."""

    ndim: int
    groups: int = 1

    def identity(self, channels: int, like: Tensor) -> Affine:
        """The grouped Dirac: output channel o reads channel o of its own group."""
        per_group = channels // self.groups
        eye = torch.eye(per_group, dtype=like.dtype, device=like.device).repeat(self.groups, 1)  # [C, C / g]
        return Affine(eye.reshape(channels, per_group, *[1] * self.ndim), None)  # [C, C / g, 1, ...]

    def compose(self, weight: Tensor, bias: Tensor | None, inner: Affine) -> Affine:
        inner_bias = None
        if inner.bias is not None:
            # a constant map c passes through W as the kernel's spatial sum times c, group by group
            out_channels, mid_per_group = weight.shape[:2]
            summed = weight.sum(dim=tuple(range(2, weight.dim())))  # [C_out, C_mid / g]
            blocks = summed.reshape(self.groups, out_channels // self.groups, mid_per_group)  # [g, C_out / g, C_mid / g]
            constant = inner.bias.reshape(self.groups, mid_per_group, 1)  # [C_mid] -> [g, C_mid / g, 1]
            inner_bias = (blocks @ constant).reshape(out_channels)  # [g, C_out / g, 1] -> [C_out]
        return Affine(compose_kernels(weight, inner.weight, self.groups), sum_biases(inner_bias, bias))

    def compose_lean(self, weight: Tensor, bias: Tensor | None, inner: Affine) -> Affine:
        """:meth:`compose` with ``weight`` / ``bias`` cast to ``inner``'s dtype first (the kernels of a chain are
        small beside its linear layers)."""
        dtype = inner.weight.dtype
        return self.compose(weight.to(dtype), None if bias is None else bias.to(dtype), inner)

    def add(self, a: Affine, b: Affine) -> Affine:
        sizes = [max(x, y) for x, y in zip(a.weight.shape[2:], b.weight.shape[2:], strict=True)]
        weight = pad_kernel_to(a.weight, sizes) + pad_kernel_to(b.weight, sizes)
        return Affine(weight, sum_biases(a.bias, b.bias))

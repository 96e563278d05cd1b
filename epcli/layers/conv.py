"""EPConv1d / EPConv2d / EPConv3d: a convolution trained as a deep chain of convolutions, collapsed exactly for eval.

One implementation over the number of spatial dims (:class:`EPConv`); the three
public classes only name their config class.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from epcli.core.conv import ConvAlgebra, conv_nd, pad_widths
from epcli.layers.base import EPLayer
from epcli.layers.config import (
    EPConv1dConfig,
    EPConv2dConfig,
    EPConv3dConfig,
    EPConvConfig,
    PerDim,
)

__all__ = ["EPConv", "EPConv1d", "EPConv2d", "EPConv3d", "conv_module"]

_CONV_MODULES: dict[int, type[_ConvNd]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_NORMS: dict[int, type[nn.BatchNorm1d | nn.BatchNorm2d | nn.BatchNorm3d]] = {
    1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d
}


def conv_module(ndim: int) -> Callable[..., _ConvNd]:
    """``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d`` for ``ndim`` spatial dims (per-dim sizes as int or tuple)."""
    return _CONV_MODULES[ndim]


class EPConv(EPLayer):
    """Expand-and-project convolution over ``ndim`` spatial dims; use :class:`EPConv1d`, :class:`EPConv2d`, :class:`EPConv3d`.

    ``kernel_sizes`` as a list sets the depth (each entry an int, or one int per spatial
    dim); an int k means ``[k] + [1] * (depth - 1)`` (depth 2 when unset). Padding (in
    ``padding_mode``) applies to the first convolution, stride to the last; every
    convolution has the same ``groups`` and ``dilation``. The collapsed kernel has size
    ``sum(kernel_sizes) - depth + 1`` per dim and the collapsed layer is the plain
    ``nn.ConvNd`` with the same stride, padding, padding mode, dilation and groups.

    An identity skip adds the source feature map sampled at the centres of the
    destination's receptive fields: a centre crop (of the padded input when the source
    is the layer input), strided like the layer it lands on. A learnable skip applies a
    grouped 1x1 convolution (with that stride) to the same centred window. Both keep
    the layer a convolution, so the collapse is exact for every input size.

    ``kernel_size``, ``stride``, ``padding``, ``dilation``, ``output_padding``, ``groups``,
    ``padding_mode``, ``transposed``, ``weight`` and ``bias`` are those of that plain
    layer, with its types (tuples per spatial dim), so model code reading them works
    unchanged. ``replaced_bias`` records the bias of the layer this one replaced (see
    :attr:`EPConfig.deploy_changes`).
    """

    _config_class: ClassVar[type[EPConvConfig]]
    _config: EPConvConfig
    _init_fan_mode: Literal["fan_in", "fan_out"] = "fan_out"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_sizes: PerDim | Sequence[PerDim],
        padding: PerDim = 0,
        stride: PerDim = 1,
        width: float = 1,
        depth: int | None = None,
        bias: bool = True,
        batch_norm: bool = False,
        residual: bool = False,
        residual_intervals: int | Sequence[int] = 2,
        residual_mode: str = "none",
        collapse_on_eval: bool = True,
        *,
        groups: int = 1,
        dilation: PerDim = 1,
        padding_mode: str = "zeros",
        negative_slope: float = 0.0,
        bn_eps: float = 1e-5,
        bn_momentum: float | None = 0.1,
        replaced_bias: bool | None = None,
    ) -> None:
        if not hasattr(type(self), "_config_class"):
            raise TypeError("EPConv is the shared implementation: build EPConv1d, EPConv2d or EPConv3d")
        config = self._config_class.from_arguments(
            kernel_sizes,
            depth,
            in_channels=in_channels,
            out_channels=out_channels,
            padding=padding,
            stride=stride,
            dilation=dilation,
            groups=groups,
            padding_mode=padding_mode,
            width=width,
            bias=bias,
            batch_norm=batch_norm,
            residual=residual,
            residual_intervals=residual_intervals,
            residual_mode=residual_mode,
            collapse_on_eval=collapse_on_eval,
            negative_slope=negative_slope,
            bn_eps=bn_eps,
            bn_momentum=bn_momentum,
            replaced_bias=replaced_bias,
        )
        super().__init__(config)

    @property
    def _algebra(self) -> ConvAlgebra:  # type: ignore[override]
        return ConvAlgebra(self._config.ndim, self._config.groups)

    @property
    def in_channels(self) -> int:
        return self._config.in_channels

    @property
    def out_channels(self) -> int:
        return self._config.out_channels

    @property
    def hidden_channels(self) -> int:
        return self._config.hidden_dim

    @property
    def kernel_sizes(self) -> list[PerDim]:
        return list(self._config.kernel_sizes)

    @property
    def kernel_size(self) -> tuple[int, ...]:
        """Effective (collapsed) kernel size per spatial dim."""
        return self._config.kernel_size

    @property
    def padding(self) -> tuple[int, ...]:
        return self._config.per_dim(self._config.padding)

    @property
    def stride(self) -> tuple[int, ...]:
        return self._config.per_dim(self._config.stride)

    @property
    def dilation(self) -> tuple[int, ...]:
        return self._config.per_dim(self._config.dilation)

    @property
    def output_padding(self) -> tuple[int, ...]:
        return (0,) * self._config.ndim

    @property
    def transposed(self) -> bool:
        return False

    @property
    def groups(self) -> int:
        return self._config.groups

    @property
    def padding_mode(self) -> str:
        return self._config.padding_mode

    def _layer_stride(self, index: int) -> PerDim:
        """The stride sits on the last convolution (the only one when depth is 1)."""
        return self._config.stride if index == self._config.depth - 1 else 1

    def _make_layer(self, index: int, in_dim: int, out_dim: int) -> nn.Module:
        c = self._config
        first = index == 0
        return conv_module(c.ndim)(
            in_dim,
            out_dim,
            c.kernel_sizes[index],
            stride=self._layer_stride(index),
            padding=c.padding if first else 0,
            dilation=c.dilation,
            groups=c.groups,
            bias=c.bias,
            padding_mode=c.padding_mode if first else "zeros",
        )

    def _make_norm(self, channels: int) -> nn.Module:
        return _NORMS[self._config.ndim](channels, eps=self._config.bn_eps, momentum=self._config.bn_momentum)

    def _make_projection(self, destination: int, in_dim: int, out_dim: int) -> nn.Module:
        c = self._config
        return conv_module(c.ndim)(
            in_dim, out_dim, 1, stride=self._layer_stride(destination - 1), groups=c.groups, bias=c.bias
        )

    def _init_weight(self, weight: Tensor, slope: float) -> None:
        """Kaiming-normal on the fan-out of one group: torch's fan-out counts every output channel,
        which for a grouped (e.g. depthwise) chain shrinks the signal by sqrt(groups) per layer."""
        groups = self._config.groups
        if groups == 1:
            super()._init_weight(weight, slope)
            return
        fan_out = weight.shape[0] // groups * math.prod(weight.shape[2:])
        with torch.no_grad():
            weight.normal_(0.0, nn.init.calculate_gain("leaky_relu", slope) / math.sqrt(fan_out))

    def _pad(self, x: Tensor) -> Tensor:
        """The input as the first convolution sees it: padded in ``padding_mode``."""
        c = self._config
        mode = "constant" if c.padding_mode == "zeros" else c.padding_mode
        return F.pad(x, pad_widths(c.per_dim(c.padding)), mode=mode)

    def _skip_branch(self, source: Tensor, edge: tuple[int, int], destination: Tensor) -> Tensor:
        start, end = edge
        c = self._config
        fields = c.receptive_fields
        if start == 0:  # node 0 is the unpadded input; every later node indexes the padded input from 0
            source = self._pad(source)
        strides = c.per_dim(self._layer_stride(end - 1))
        window: list[Any] = [
            slice((f_end - f_start) // 2, (f_end - f_start) // 2 + s * (n - 1) + 1)
            for f_start, f_end, s, n in zip(fields[start], fields[end], strides, destination.shape[-c.ndim:])
        ]
        centred = source[tuple([..., *window])]  # [N, C, *window lengths]
        if c.learnable_skips:
            projected: Tensor = self.residual_dict[self.skip_key(edge)](centred)
            return projected
        steps: list[Any] = [slice(None, None, s) for s in strides]
        return centred[tuple([..., *steps])]  # [N, C, *destination sizes]

    def _collapsed_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        c = self._config
        conv = conv_nd(c.ndim)
        if c.padding_mode == "zeros":
            return conv(x, weight, bias, c.stride, c.padding, c.dilation, c.groups)
        return conv(self._pad(x), weight, bias, c.stride, 0, c.dilation, c.groups)

    def extra_repr(self) -> str:
        c = self._config
        extras = "".join(
            f", {name}={value!r}"
            for name, value, default in (
                ("groups", c.groups, 1), ("dilation", c.dilation, 1), ("padding_mode", c.padding_mode, "zeros")
            )
            if value != default
        )
        return (
            f"{c.in_channels}, {c.out_channels}, kernel_sizes={list(c.kernel_sizes)}, padding={c.padding}, "
            f"stride={c.stride}, width={c.width}, depth={c.depth}, bias={c.bias}, batch_norm={c.batch_norm}, "
            f"residual={c.residual}, residual_intervals={list(c.residual_intervals)}, "
            f"residual_mode={c.residual_mode!r}{extras}"
        )


class EPConv1d(EPConv):
    """Expand-and-project 1-D convolution (inputs ``[N, C, L]``); see :class:`EPConv` for the arguments.

    Example::

        >>> layer = EPConv1d(16, 16, [3, 3, 3], padding=6, dilation=2, groups=16).eval()
        >>> layer.weight.shape  # depthwise, collapsed kernel 7 applied with dilation 2
        torch.Size([16, 1, 7])
    """

    _config_class = EPConv1dConfig
    _config: EPConv1dConfig


class EPConv2d(EPConv):
    """Expand-and-project 2-D convolution, API-compatible with the original ``EPConv2d``; see :class:`EPConv`.

    Example::

        >>> layer = EPConv2d(8, 8, [3, (1, 3)], padding=(1, 2), residual=True, residual_mode="learn").eval()
        >>> layer.weight.shape
        torch.Size([8, 8, 3, 5])
    """

    _config_class = EPConv2dConfig
    _config: EPConv2dConfig


class EPConv3d(EPConv):
    """Expand-and-project 3-D convolution (inputs ``[N, C, D, H, W]``); see :class:`EPConv` for the arguments."""

    _config_class = EPConv3dConfig
    _config: EPConv3dConfig

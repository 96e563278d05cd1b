"""EPConv2d: a convolution trained as a deep chain of convolutions, collapsed exactly for eval."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from epcli.core import CONV2D
from epcli.core.conv import align_feature_map
from epcli.layers.base import EPLayer
from epcli.layers.config import EPConv2dConfig

__all__ = ["EPConv2d"]


class EPConv2d(EPLayer):
    """Expand-and-project 2-D convolution, API-compatible with the original ``EPConv2d``.

    ``kernel_sizes`` as a list sets the depth; an int k means ``[k] + [1] * (depth - 1)``
    (depth 2 when unset). Padding applies to the first convolution, stride to the
    last; the collapsed kernel has size ``sum(kernel_sizes) - depth + 1`` and the
    collapsed layer is ``conv2d(x, weight, bias, stride, padding)``.

    An identity skip adds the source feature map sampled at the centres of the
    destination's receptive fields: a centre crop (zero-padded where the source
    is smaller), strided like the layer it lands on. A learnable skip applies a
    1x1 convolution (with that stride) to the same centred window. Both keep the
    layer a convolution, so the collapse is exact for every input size, odd
    sizes included.
    """

    _algebra = CONV2D
    _config: EPConv2dConfig
    _init_fan_mode: Literal["fan_in", "fan_out"] = "fan_out"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_sizes: int | Sequence[int],
        padding: int = 0,
        stride: int = 1,
        width: float = 1,
        depth: int | None = None,
        bias: bool = True,
        batch_norm: bool = False,
        residual: bool = False,
        residual_intervals: int | Sequence[int] = 2,
        residual_mode: str = "none",
        collapse_on_eval: bool = True,
        *,
        negative_slope: float = 0.0,
        bn_eps: float = 1e-5,
        bn_momentum: float | None = 0.1,
    ) -> None:
        config = EPConv2dConfig.from_arguments(
            kernel_sizes,
            depth,
            in_channels=in_channels,
            out_channels=out_channels,
            padding=padding,
            stride=stride,
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
        )
        super().__init__(config)

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
    def kernel_sizes(self) -> list[int]:
        return list(self._config.kernel_sizes)

    @property
    def kernel_size(self) -> tuple[int, int]:
        """Effective (collapsed) kernel size."""
        return (self._config.kernel_size, self._config.kernel_size)

    @property
    def padding(self) -> int:
        return self._config.padding

    @property
    def stride(self) -> int:
        return self._config.stride

    def _layer_stride(self, index: int) -> int:
        """The stride sits on the last convolution (the only one when depth is 1)."""
        return self._config.stride if index == self._config.depth - 1 else 1

    def _make_layer(self, index: int, in_dim: int, out_dim: int) -> nn.Module:
        c = self._config
        return nn.Conv2d(
            in_dim,
            out_dim,
            c.kernel_sizes[index],
            stride=self._layer_stride(index),
            padding=c.padding if index == 0 else 0,
            bias=c.bias,
        )

    def _make_norm(self, channels: int) -> nn.Module:
        return nn.BatchNorm2d(channels, eps=self._config.bn_eps, momentum=self._config.bn_momentum)

    def _make_projection(self, destination: int, in_dim: int, out_dim: int) -> nn.Module:
        return nn.Conv2d(in_dim, out_dim, 1, stride=self._layer_stride(destination - 1), bias=self._config.bias)

    def _skip_branch(self, source: Tensor, edge: tuple[int, int], destination: Tensor) -> Tensor:
        start, end = edge
        fields = self._config.receptive_fields
        # node 0 is the unpadded input; every later node indexes the padded input from 0
        offset = (fields[end] - fields[start]) // 2 - (self._config.padding if start == 0 else 0)
        stride = self._layer_stride(end - 1)
        out_h, out_w = destination.shape[-2:]
        window = align_feature_map(source, offset, (stride * (out_h - 1) + 1, stride * (out_w - 1) + 1))
        if self._config.learnable_skips:
            return self.residual_dict[self.skip_key(edge)](window)
        return window[..., ::stride, ::stride]

    def _collapsed_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.conv2d(x, weight, bias, self._config.stride, self._config.padding)

    def extra_repr(self) -> str:
        c = self._config
        return (
            f"{c.in_channels}, {c.out_channels}, kernel_sizes={list(c.kernel_sizes)}, padding={c.padding}, "
            f"stride={c.stride}, width={c.width}, depth={c.depth}, bias={c.bias}, batch_norm={c.batch_norm}, "
            f"residual={c.residual}, residual_intervals={list(c.residual_intervals)}, "
            f"residual_mode={c.residual_mode!r}"
        )

"""Low-rank factored layers: what ``compress_model`` puts in place of a plain Linear / ConvNd.

Each holds two plain layers, ``down`` then ``up`` (state-dict keys ``<path>.down.weight``, ``<path>.up.weight``,
``<path>.up.bias``), so it exports to ONNX and runs anywhere as two ordinary ops: ``LowRankLinear`` is
``Linear(in, r, bias=False)`` then ``Linear(r, out)``; ``LowRankConv{1,2,3}d`` is the original conv's window
(kernel, stride, padding, dilation, groups, padding mode) to ``groups * rank`` channels without bias, then a
pointwise conv (same groups) back to ``out`` channels with the bias. ``weight`` is the equivalent dense weight,
composed when read (it is not stored).
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor, nn

__all__ = ["LOW_RANK", "LowRankConv", "LowRankConv1d", "LowRankConv2d", "LowRankConv3d", "LowRankLinear"]


class LowRankLinear(nn.Module):
    """``up(down(x))``: an ``out x in`` weight stored as ``[out, rank] @ [rank, in]``."""

    def __init__(
        self, in_features: int, rank: int, out_features: int, bias: bool = True, **factory: Any
    ) -> None:
        super().__init__()
        self.in_features, self.rank, self.out_features = in_features, rank, out_features
        self.down = nn.Linear(in_features, rank, bias=False, **factory)
        self.up = nn.Linear(rank, out_features, bias=bias, **factory)

    @property
    def bias(self) -> Tensor | None:
        return self.up.bias

    @property
    def weight(self) -> Tensor:
        """The equivalent ``[out, in]`` weight, composed on each access: for model code that reads a layer's
        weight (its dtype, device or shape), as it would on the ``nn.Linear`` this replaced."""
        return self.up.weight @ self.down.weight  # [out, rank] @ [rank, in]

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.down(x))  # type: ignore[no-any-return]


class LowRankConv(nn.Module):
    """``up(down(x))``: a conv with ``rank`` channels per group in the middle; ``down`` has the original window."""

    conv: ClassVar[type[nn.Conv1d] | type[nn.Conv2d] | type[nn.Conv3d]]

    def __init__(
        self,
        in_channels: int,
        rank: int,
        out_channels: int,
        kernel_size: int | tuple[int, ...],
        stride: int | tuple[int, ...] = 1,
        padding: str | int | tuple[int, ...] = 0,
        dilation: int | tuple[int, ...] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        **factory: Any,
    ) -> None:
        super().__init__()
        self.in_channels, self.rank, self.out_channels, self.groups = in_channels, rank, out_channels, groups
        self.down = self.conv(
            in_channels, groups * rank, kernel_size, stride, padding, dilation, groups, False, padding_mode, **factory  # type: ignore[arg-type]
        )
        self.up = self.conv(groups * rank, out_channels, 1, groups=groups, bias=bias, **factory)

    # the window's arguments, as the plain conv names them (the architecture spec reads them)
    kernel_size = property(lambda self: self.down.kernel_size)
    stride = property(lambda self: self.down.stride)
    padding = property(lambda self: self.down.padding)
    dilation = property(lambda self: self.down.dilation)
    padding_mode = property(lambda self: self.down.padding_mode)
    bias = property(lambda self: self.up.bias)

    @property
    def weight(self) -> Tensor:
        """The equivalent ``[out, in/g, *kernel]`` weight, composed on each access: for model code that reads a
        conv's weight (ViT casts its input to the patch embedding's ``weight.dtype``)."""
        down, groups = self.down.weight, self.groups  # [g * rank, in/g, *kernel]
        per_group = down.reshape(groups, self.rank, -1)  # [g, rank, in/g * K]
        up = self.up.weight.reshape(groups, self.out_channels // groups, self.rank)  # [g, out/g, rank]
        return (up @ per_group).reshape(self.out_channels, *down.shape[1:])  # [out, in/g, *kernel]

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.down(x))  # type: ignore[no-any-return]


class LowRankConv1d(LowRankConv):
    conv = nn.Conv1d


class LowRankConv2d(LowRankConv):
    conv = nn.Conv2d


class LowRankConv3d(LowRankConv):
    conv = nn.Conv3d


LOW_RANK: dict[type[nn.Module], type[nn.Module]] = {
    nn.Linear: LowRankLinear, nn.Conv1d: LowRankConv1d, nn.Conv2d: LowRankConv2d, nn.Conv3d: LowRankConv3d,
}
"""Plain layer type (matched exactly: a subclass may have its own forward) -> its factored module, which takes
the plain layer's constructor arguments plus ``rank``."""

"""EP layers: training-time modules whose eval form is the exact collapse."""

from epcli.layers.base import EPLayer
from epcli.layers.config import (
    CONFIG_VERSION,
    EPConfig,
    EPConv1dConfig,
    EPConv2dConfig,
    EPConv3dConfig,
    EPConvConfig,
    EPLinearConfig,
)
from epcli.layers.conv import EPConv, EPConv1d, EPConv2d, EPConv3d
from epcli.layers.linear import EPLinear

__all__ = [
    "CONFIG_VERSION",
    "EPConfig",
    "EPConv",
    "EPConv1d",
    "EPConv1dConfig",
    "EPConv2d",
    "EPConv2dConfig",
    "EPConv3d",
    "EPConv3dConfig",
    "EPConvConfig",
    "EPLayer",
    "EPLinear",
    "EPLinearConfig",
]

"""EP layers: training-time modules whose eval form is the exact collapse."""

from epcli.layers.base import EPLayer
from epcli.layers.config import CONFIG_VERSION, EPConfig, EPConv2dConfig, EPLinearConfig
from epcli.layers.conv import EPConv2d
from epcli.layers.linear import EPLinear

__all__ = ["CONFIG_VERSION", "EPConfig", "EPConv2d", "EPConv2dConfig", "EPLayer", "EPLinear", "EPLinearConfig"]

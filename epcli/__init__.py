"""epcli: expand-and-project (EP) layers and their exact collapse for deployment."""

from epcli.errors import (
    CheckpointError,
    ConfigError,
    EpcliError,
    ShapeMismatchError,
    UnsafeCheckpointError,
    VerificationError,
)
from epcli.layers import EPConfig, EPConv2d, EPConv2dConfig, EPLayer, EPLinear, EPLinearConfig

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigError",
    "EPConfig",
    "EPConv2d",
    "EPConv2dConfig",
    "EPLayer",
    "EPLinear",
    "EPLinearConfig",
    "EpcliError",
    "ShapeMismatchError",
    "UnsafeCheckpointError",
    "VerificationError",
    "__version__",
]

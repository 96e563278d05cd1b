"""epcli: expand-and-project (EP) layers and their exact collapse for deployment.

Public names are imported on first use (PEP 562), so ``import epcli`` — and
with it ``epcli --help`` — does not pay for importing torch until a name that
needs it is touched.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from epcli._version import __version__
from epcli.errors import (
    CheckpointError,
    ConfigError,
    EpcliError,
    ExportError,
    ModelInputError,
    OutputError,
    ShapeMismatchError,
    UnsafeCheckpointError,
    UsageError,
    VerificationError,
)

if TYPE_CHECKING:  # explicit re-exports for type checkers; at run time __getattr__ imports them
    from epcli.checkpoint.inputs import InputSpec as InputSpec
    from epcli.checkpoint.load import load_checkpoint as load_checkpoint
    from epcli.checkpoint.load import open_checkpoint as open_checkpoint
    from epcli.checkpoint.opened import Checkpoint as Checkpoint
    from epcli.checkpoint.opened import CheckpointFile as CheckpointFile
    from epcli.checkpoint.save import save_checkpoint as save_checkpoint
    from epcli.checkpoint.save import save_collapsed_checkpoint as save_collapsed_checkpoint
    from epcli.convert import ConversionPlan as ConversionPlan
    from epcli.convert import collapse_layer as collapse_layer
    from epcli.convert import collapse_model as collapse_model
    from epcli.convert import collapse_state_dict as collapse_state_dict
    from epcli.convert import overparameterize as overparameterize
    from epcli.convert import plan_overparameterize as plan_overparameterize
    from epcli.convert import unwrap_model as unwrap_model
    from epcli.layers import EPConfig as EPConfig
    from epcli.layers import EPConv as EPConv
    from epcli.layers import EPConv1d as EPConv1d
    from epcli.layers import EPConv1dConfig as EPConv1dConfig
    from epcli.layers import EPConv2d as EPConv2d
    from epcli.layers import EPConv2dConfig as EPConv2dConfig
    from epcli.layers import EPConv3d as EPConv3d
    from epcli.layers import EPConv3dConfig as EPConv3dConfig
    from epcli.layers import EPConvConfig as EPConvConfig
    from epcli.layers import EPLayer as EPLayer
    from epcli.layers import EPLinear as EPLinear
    from epcli.layers import EPLinearConfig as EPLinearConfig
    from epcli.layers.lowrank import LowRankConv1d as LowRankConv1d
    from epcli.layers.lowrank import LowRankConv2d as LowRankConv2d
    from epcli.layers.lowrank import LowRankConv3d as LowRankConv3d
    from epcli.layers.lowrank import LowRankLinear as LowRankLinear
    from epcli.verification.compress import CompressionResult as CompressionResult
    from epcli.verification.compress import compress_model as compress_model

_LAZY = {
    "EPConfig": "epcli.layers",
    "EPConv": "epcli.layers",
    "EPConv1d": "epcli.layers",
    "EPConv1dConfig": "epcli.layers",
    "EPConv2d": "epcli.layers",
    "EPConv2dConfig": "epcli.layers",
    "EPConv3d": "epcli.layers",
    "EPConv3dConfig": "epcli.layers",
    "EPConvConfig": "epcli.layers",
    "EPLayer": "epcli.layers",
    "EPLinear": "epcli.layers",
    "EPLinearConfig": "epcli.layers",
    "collapse_layer": "epcli.convert",
    "collapse_model": "epcli.convert",
    "collapse_state_dict": "epcli.convert",
    "overparameterize": "epcli.convert",
    "plan_overparameterize": "epcli.convert",
    "ConversionPlan": "epcli.convert",
    "unwrap_model": "epcli.convert",
    "Checkpoint": "epcli.checkpoint.opened",
    "CheckpointFile": "epcli.checkpoint.opened",
    "load_checkpoint": "epcli.checkpoint.load",
    "open_checkpoint": "epcli.checkpoint.load",
    "save_checkpoint": "epcli.checkpoint.save",
    "save_collapsed_checkpoint": "epcli.checkpoint.save",
    "InputSpec": "epcli.checkpoint.inputs",
    "LowRankLinear": "epcli.layers.lowrank",
    "LowRankConv1d": "epcli.layers.lowrank",
    "LowRankConv2d": "epcli.layers.lowrank",
    "LowRankConv3d": "epcli.layers.lowrank",
    "compress_model": "epcli.verification.compress",
    "CompressionResult": "epcli.verification.compress",
}

__all__ = [
    "CheckpointError",
    "ConfigError",
    "EpcliError",
    "ExportError",
    "ModelInputError",
    "OutputError",
    "ShapeMismatchError",
    "UnsafeCheckpointError",
    "UsageError",
    "VerificationError",
    "__version__",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'epcli' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))

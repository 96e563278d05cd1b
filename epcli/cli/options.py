"""Options shared by several commands, declared once."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

__all__ = ["Atol", "BatchSize", "CheckpointArg", "DeviceOption", "Dtype", "ForceOption", "JsonOption", "ModelOption", "Rtol", "Samples", "Seed"]

CheckpointArg = Annotated[
    Path,
    typer.Argument(help="Expanded checkpoint (.pt or .safetensors) written by epcli.save_checkpoint.", show_default=False),
]
JsonOption = Annotated[
    bool, typer.Option("--json", help="Print one JSON document (with schema_version) on stdout; tables go to stderr.")
]
ModelOption = Annotated[
    Optional[str],
    typer.Option(
        "--model",
        metavar="MODULE:FUNCTION",
        help="Build the architecture by calling this factory (imported only because you name it) "
        "instead of the one embedded in the checkpoint; needed for models with a custom forward.",
    ),
]
ForceOption = Annotated[bool, typer.Option("--force", help="Overwrite an existing output file.")]
Samples = Annotated[int, typer.Option("--samples", min=1, help="Number of random input samples.")]
BatchSize = Annotated[int, typer.Option("--batch-size", min=1, help="Samples per forward pass.")]
Seed = Annotated[int, typer.Option("--seed", help="Seed of the input generator (same seed, same inputs).")]
Atol = Annotated[Optional[float], typer.Option("--atol", min=0.0, help="Absolute tolerance (default: by dtype).", show_default=False)]
Rtol = Annotated[Optional[float], typer.Option("--rtol", min=0.0, help="Relative tolerance (default: by dtype).", show_default=False)]


DeviceOption = Annotated[
    str,
    typer.Option(
        "--device",
        metavar="cpu|cuda",
        help="Where the collapse math and the checks run; CUDA only when asked for and available.",
    ),
]


class Dtype(str, Enum):
    float32 = "float32"
    float64 = "float64"

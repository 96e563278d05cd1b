"""Options shared by several commands, declared once."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from epcli.errors import UsageError

if TYPE_CHECKING:
    from epcli.checkpoint.inputs import InputSpec

__all__ = [
    "parse_size",
    "Atol",
    "BatchSize",
    "CheckpointArg",
    "DeviceOption",
    "Dtype",
    "ForceOption",
    "InputOption",
    "InputShapeOption",
    "JsonOption",
    "ModelOption",
    "QuietOption",
    "Rtol",
    "Samples",
    "StateKeyOption",
    "parse_inputs",
    "Seed",
    "Timeout",
    "choice",
    "whole_number",
]

E = TypeVar("E", bound=Enum)

SEED_MAX = 2**64 - 1
"""The largest seed torch's generator takes."""


def whole_number(minimum: int, maximum: int | None = None) -> Callable[[Any], int]:
    """A parser that says what the option takes in epcli's words (Typer's would quote its validation library)."""
    wanted = f"a whole number from {minimum} to {maximum}" if maximum is not None else f"a whole number >= {minimum}"

    def parse(text: Any) -> int:
        try:
            value = text if isinstance(text, int) else int(str(text).strip())
        except ValueError:
            raise typer.BadParameter(f"expected {wanted}, got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            raise typer.BadParameter(f"expected {wanted}, got {value}")
        return value

    return parse


def choice(kind: type[E]) -> Callable[[Any], E]:
    """A parser for an Enum option, with the choices said in epcli's words."""
    names = ", ".join(member.value for member in kind)

    def parse(text: Any) -> E:
        try:
            return kind(text)
        except ValueError:
            raise typer.BadParameter(f"expected one of {names}, got {text!r}") from None

    return parse


def _positive_number(*, zero: bool) -> Callable[[Any], float]:
    wanted = "a finite number >= 0 (e.g. 1e-5)" if zero else "a number of seconds > 0"

    def parse(text: Any) -> float:
        try:
            value = float(text)
        except ValueError:
            raise typer.BadParameter(f"expected {wanted}, got {text!r}") from None
        if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
            raise typer.BadParameter(f"expected {wanted}, got {text!r}")
        return value

    return parse


non_negative = _positive_number(zero=True)
"""Parses a finite number >= 0 (a tolerance, an error budget)."""


CheckpointArg = Annotated[
    Path,
    typer.Argument(
        help="Expanded checkpoint written by epcli.save_checkpoint: .pt, .safetensors, or the .safetensors.index.json "
        "of a sharded one. With --model and --input-shape/--input also one epcli did not write: a plain state_dict "
        ".pt (--state-key for a trainer's dict), a Hugging Face folder or .safetensors, a torch.distributed.checkpoint "
        "directory.",
        show_default=False,
        metavar="CKPT",
    ),
]
JsonOption = Annotated[
    bool,
    typer.Option(
        "--json",
        help="Print one JSON document (with schema_version) on stdout, whatever the outcome (usage errors too); "
        "the human report goes to stderr.",
    ),
]
QuietOption = Annotated[bool, typer.Option("-q", "--quiet", help="No human report; errors still go to stderr.")]
ModelOption = Annotated[
    str | None,
    typer.Option(
        "--model",
        metavar="MODULE:FUNCTION",
        help="A function taking no arguments that returns the expanded model (e.g. mymodels:build for build() in "
        "mymodels.py, looked up in the working directory first); imported only because you name it, and checked "
        "before any work. Needed for models with a custom forward and for checkpoints epcli did not write.",
    ),
]
InputShapeOption = Annotated[
    str | None,
    typer.Option(
        "--input-shape",
        metavar="D1,D2,...",
        help="For a checkpoint epcli did not write: the model takes one float32 input of this shape per sample "
        "(no batch dimension), e.g. 3,224,224.",
        show_default=False,
    ),
]
InputOption = Annotated[
    list[str] | None,
    typer.Option(
        "--input",
        metavar="SPEC",
        help="For a checkpoint epcli did not write: one model input, repeated once per input in order. SPEC is "
        "DTYPE[D1,D2,...] (float: standard normal) or DTYPE[D1,...]:LOW:HIGH (values in [LOW, HIGH)), e.g. "
        "'int64[16]:0:50257' for 16 token ids of a 50257-word vocabulary, 'float32[3,224,224]'.",
        show_default=False,
    ),
]
StateKeyOption = Annotated[
    str | None,
    typer.Option(
        "--state-key",
        metavar="KEY",
        help="For a checkpoint epcli did not write: the entry of a trainer's dict (.pt) that holds the model's "
        "state_dict, e.g. model; for safetensors / DCP the key prefix of the model's tensors.",
        show_default=False,
    ),
]
ForceOption = Annotated[bool, typer.Option("--force", help="Overwrite an existing output file.")]
Samples = Annotated[
    int, typer.Option("--samples", metavar="N", parser=whole_number(1), help="Number of random input samples.")
]
BatchSize = Annotated[
    int, typer.Option("--batch-size", metavar="B", parser=whole_number(1), help="Samples per forward pass.")
]
Seed = Annotated[
    int,
    typer.Option(
        "--seed",
        metavar="S",
        parser=whole_number(0, SEED_MAX),
        help="Seed of the input generator (same seed, same inputs).",
    ),
]
Atol = Annotated[
    float | None,
    typer.Option(
        "--atol",
        metavar="A",
        parser=_positive_number(zero=True),
        help="Absolute tolerance (default: by dtype).",
        show_default=False,
    ),
]
Rtol = Annotated[
    float | None,
    typer.Option(
        "--rtol",
        metavar="R",
        parser=_positive_number(zero=True),
        help="Relative tolerance (default: by dtype).",
        show_default=False,
    ),
]
Timeout = Annotated[
    float,
    typer.Option(
        "--timeout",
        metavar="SECONDS",
        parser=_positive_number(zero=False),
        help="Longest time one onnxruntime run (one batch) of an ONNX artifact may take; an ONNX file is "
        "untrusted input.",
    ),
]


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


def parse_inputs(input_shape: str | None, inputs: list[str] | None) -> list[InputSpec] | None:
    """The input specs given by --input-shape or --input (not both); None when neither was given."""
    from epcli.checkpoint.inputs import parse_input

    if input_shape is not None and inputs:
        raise UsageError("give the model's input either with --input-shape (one float input) or with --input, not both")
    if input_shape is not None:
        if not re.fullmatch(r"\s*\d+(\s*,\s*\d+)*\s*,?\s*", input_shape):
            raise UsageError(
                f"--input-shape {input_shape!r}: give the sizes of one sample, e.g. 3,224,224; for another dtype or a "
                "value range use --input (e.g. 'int64[16]:0:50257')"
            )
        return [parse_input(input_shape.strip().rstrip(","))]
    return [parse_input(text) for text in inputs] if inputs else None


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_size(text: str, option: str) -> int:
    """``"5GB"`` -> 5_000_000_000, ``"500MiB"`` -> 524_288_000, ``"123"`` -> 123 bytes; a bad size is a usage error."""
    match = _SIZE.match(text)
    unit = match.group(2).lower() if match else ""
    if unit and not unit.endswith("b"):
        unit += "b"  # "5G" means 5GB, "5Gi" 5GiB
    if match is None or unit not in _UNITS or int(float(match.group(1)) * _UNITS[unit]) < 1:
        raise UsageError(f"{option} {text!r} is not a size of at least 1 byte; write e.g. 5GB, 500MB, 2GiB or 1000000")
    return int(float(match.group(1)) * _UNITS[unit])

"""Options shared by several commands, declared once.

Two groups are more than a shared declaration: ``--json`` / ``-q`` belong to the command group
(:func:`output_options`, accepted before or after the command's name), and the options that say how
to read a checkpoint are one :class:`SourceOptions` (:func:`takes_source`).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
import typer.main
from typer.core import TyperOption

from epcli.errors import CheckpointError, ConfigError, ModelInputError, UsageError

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
    "OutputMode",
    "Rtol",
    "Samples",
    "Seed",
    "NO_SOURCE",
    "SourceOptions",
    "Timeout",
    "choice",
    "output_mode",
    "junit_option",
    "output_options",
    "takes_source",
    "whole_number",
]

E = TypeVar("E", bound=Enum)
R = TypeVar("R")

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
JunitOption = Annotated[
    Path | None,
    typer.Option(
        "--junit-xml",
        metavar="FILE",
        help="Also write a JUnit XML report: one test case per comparison (failures carry the numbers and the "
        "tolerance), or one errored case when the run stops on an error. Written atomically, whatever the outcome.",
        show_default=False,
    ),
]
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


@dataclass(frozen=True)
class OutputMode:
    """What ``--json``, ``-q`` and ``--junit-xml`` asked for, wherever on the command line they were given."""

    json: bool = False
    quiet: bool = False
    junit_xml: Path | None = None


_OUTPUT_MODE = "epcli.output_mode"
"""The key of the :class:`OutputMode` in a click context's ``meta`` (shared by the group and its command)."""


def output_options() -> list[TyperOption]:
    """Fresh ``--json`` and ``-q`` options for the group or one command (:mod:`epcli.cli.app` adds them to each).

    Declared once, as Typer declares any option (:data:`JsonOption`, :data:`QuietOption`), so their help reads as
    before; they are not passed to the command function, but recorded in the context's :class:`OutputMode`.
    """

    def flags(json_output: JsonOption = False, quiet: QuietOption = False) -> None:
        """The declarations Typer turns into click options."""

    template = typer.Typer(add_completion=False)
    template.command()(flags)
    options = typer.main.get_command(template).params
    for option, field in zip(options, ("json", "quiet"), strict=True):
        assert isinstance(option, TyperOption)
        option.expose_value = False
        option.callback = functools.partial(_record, field)
    return typing.cast(list[TyperOption], options)


def junit_option() -> TyperOption:
    """A fresh ``--junit-xml`` option for a command that compares (recorded in :class:`OutputMode` like ``--json``)."""

    def flags(junit_xml: JunitOption = None) -> None:
        """The declaration Typer turns into a click option."""

    template = typer.Typer(add_completion=False)
    template.command()(flags)
    (option,) = typer.main.get_command(template).params
    assert isinstance(option, TyperOption)
    option.expose_value = False
    option.callback = functools.partial(_record, "junit_xml")
    return option


def _record(field: str, ctx: typer.Context, param: object, value: Any) -> Any:
    if value:
        changes: dict[str, Any] = {field: value}
        ctx.meta[_OUTPUT_MODE] = dataclasses.replace(output_mode(ctx), **changes)
    return value


def output_mode(ctx: typer.Context) -> OutputMode:
    """The group's and the command's ``--json`` / ``-q``, together."""
    mode = ctx.meta.get(_OUTPUT_MODE, OutputMode())
    assert isinstance(mode, OutputMode)
    return mode


@dataclass(frozen=True)
class SourceOptions:
    """How to read the checkpoint: ``--model``, ``--input-shape``, ``--input``, ``--state-key``.

    A command takes one ``source: SourceOptions`` parameter (see :func:`takes_source`).
    """

    model: ModelOption = None
    input_shape: InputShapeOption = None
    input_specs: InputOption = None
    state_key: StateKeyOption = None

    def inputs(self) -> list[InputSpec] | None:
        """The input specs given by --input-shape or --input (not both); None when neither was given."""
        if self.input_shape is not None and self.input_specs:
            raise UsageError(
                "give the model's input either with --input-shape (one float input) or with --input, not both"
            )
        if self.input_shape is not None:
            if not re.fullmatch(r"\s*\d+(\s*,\s*\d+)*\s*,?\s*", self.input_shape):
                raise UsageError(
                    f"--input-shape {self.input_shape!r}: give the sizes of one sample, e.g. 3,224,224; for another "
                    "dtype or a value range use --input (e.g. 'int64[16]:0:50257')"
                )
            return [_parse_input("--input-shape", self.input_shape.strip().rstrip(","))]
        return [_parse_input("--input", text) for text in self.input_specs] if self.input_specs else None


def _parse_input(option: str, text: str) -> InputSpec:
    """One input spec from the command line; a bad one is a usage error said in the command line's spelling."""
    from epcli.checkpoint.inputs import parse_input

    try:
        return parse_input(text)
    except ConfigError as e:
        if "needs its range" in str(e):
            raise UsageError(
                f"{option} {text!r}: an integer input needs its range of values; write DTYPE[D1,...]:LOW:HIGH, e.g. "
                "--input 'int64[16]:0:50257' for token ids 0..50256"
            ) from None
        raise UsageError(f"{option} {text!r}: {e}") from None


NO_SOURCE = SourceOptions()
"""The default of a command's ``source`` parameter: none given (a file epcli wrote needs none)."""


def takes_source(command: Callable[..., R]) -> Callable[..., R]:
    """Let Typer see the fields of ``command``'s :class:`SourceOptions` parameter as options of their own, in its
    place (so ``--help`` lists them there), and hand ``command`` the one :class:`SourceOptions` they make."""
    hints = typing.get_type_hints(command, include_extras=True)
    declared = typing.get_type_hints(SourceOptions, include_extras=True)
    options = dataclasses.fields(SourceOptions)
    names = [option.name for option in options]
    (name,) = [param for param, hint in hints.items() if hint is SourceOptions]
    parameters: list[inspect.Parameter] = []
    for param in inspect.signature(command).parameters.values():
        if param.name == name:
            parameters.extend(
                inspect.Parameter(
                    option.name,
                    inspect.Parameter.POSITIONAL_OR_KEYWORD,
                    default=option.default,
                    annotation=declared[option.name],
                )
                for option in options
            )
        else:
            parameters.append(param.replace(annotation=hints[param.name]))

    @functools.wraps(command)
    def wrapper(**kwargs: Any) -> R:
        source = SourceOptions(**{field: kwargs.pop(field) for field in names})
        try:
            return command(**kwargs, **{name: source})
        except ModelInputError as e:
            # the model cannot run on its inputs: the command line's fault (2) when it gave the specs the inputs
            # were drawn from, else the checkpoint's or the --inputs file's (3, the error's own class)
            typed = "--input-shape" if source.input_shape is not None else "--input" if source.input_specs else None
            if typed is None or kwargs.get("samples_file") is not None:
                raise
            raise UsageError(f"{e} (the input was given with {typed})", file=e.file) from e

    wrapper.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {param.name: param.annotation for param in parameters}
    return wrapper


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


def check_source(path: Path, remedy: str | None = None) -> None:
    """The checkpoint argument (or another input file, whose ``remedy`` says how to write it again) exists and is
    not empty, before torch is imported (a mistyped path fails at once, with the error opening it would give)."""
    from epcli.storage.paths import source_problem

    problem = source_problem(path) if remedy is None else source_problem(path, remedy)
    if problem is not None:
        raise CheckpointError(f"{path}: {problem}", file=path)


def parse_size(text: str, option: str) -> int:
    """``"5GB"`` -> 5_000_000_000, ``"500MiB"`` -> 524_288_000, ``"123"`` -> 123 bytes; a bad size is a usage error."""
    match = _SIZE.match(text)
    unit = match.group(2).lower() if match else ""
    if unit and not unit.endswith("b"):
        unit += "b"  # "5G" means 5GB, "5Gi" 5GiB
    if match is None or unit not in _UNITS or int(float(match.group(1)) * _UNITS[unit]) < 1:
        raise UsageError(f"{option} {text!r} is not a size of at least 1 byte; write e.g. 5GB, 500MB, 2GiB or 1000000")
    return int(float(match.group(1)) * _UNITS[unit])

"""``epcli collapse CKPT``: write the collapsed checkpoint and show what each EP layer became."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from epcli.cli import render
from epcli.cli.guard import Outcome
from epcli.cli.options import (
    NO_SOURCE,
    CheckpointArg,
    DeviceOption,
    ForceOption,
    SourceOptions,
    check_source,
    choice,
    parse_size,
    takes_source,
)
from epcli.cli.reports import collapse_cases, collapse_payload, collapse_warnings, render_collapse

__all__ = ["collapse_command"]


class OutputFormat(str, Enum):
    safetensors = "safetensors"
    pt = "pt"


def _output_format(text: str) -> OutputFormat:
    """``--format``; ONNX is another command's output, so say which."""
    if str(text).strip().lower() == "onnx":
        raise typer.BadParameter("ONNX is written by epcli export CKPT --onnx OUT.onnx; --format takes safetensors or pt")
    return choice(OutputFormat)(text)


@takes_source
def collapse_command(
    checkpoint: CheckpointArg,
    output: Annotated[
        Path | None,
        typer.Option(
            "-o",
            "--output",
            help="Output file (default: <stem>.collapsed.safetensors beside CKPT).",
            show_default=False,
        ),
    ] = None,
    file_format: Annotated[
        OutputFormat | None,
        typer.Option(
            "--format",
            metavar="safetensors|pt",
            parser=_output_format,
            help="Output format (default: from -o's suffix, else safetensors). For ONNX use epcli export --onnx.",
            show_default=False,
        ),
    ] = None,
    force: ForceOption = False,
    device: DeviceOption = "cpu",
    source: SourceOptions = NO_SOURCE,
    max_shard_size: Annotated[
        str | None,
        typer.Option(
            "--max-shard-size",
            metavar="SIZE",
            help="Shard .safetensors output above this much tensor data, e.g. 2GB, 500MiB "
            "(default 5GB): <stem>-0000k-of-0000N.safetensors + <stem>.safetensors.index.json.",
            show_default=False,
        ),
    ] = None,
    model_check: Annotated[
        bool | None,
        typer.Option(
            "--model-check/--no-model-check",
            help="Also compare the whole model (needs it in memory). Default: only for checkpoints up to 64 MiB.",
            show_default=False,
        ),
    ] = None,
) -> Outcome:
    """Collapse every EP layer into one Linear/Conv2d, one layer at a time; write the compact checkpoint (atomically).

    Reads .pt, .safetensors and sharded safetensors (give the .safetensors.index.json); with --model and
    --input-shape/--input also checkpoints epcli did not write (README: "Checkpoints epcli did not write").
    """
    from epcli.artifacts.names import resolve_output
    from epcli.storage.paths import prefetch_sha256

    # the output's name and the shard size first: a usage error there fails before torch is imported
    if output is not None:
        resolve_output(checkpoint, output, None if file_format is None else file_format.value)
    max_shard_bytes = None if max_shard_size is None else parse_size(max_shard_size, "--max-shard-size")
    prefetch_sha256((checkpoint,))  # the source is hashed while torch is imported (a directory is hashed later)
    check_source(checkpoint)  # before torch is imported
    from epcli.jobs.collapse import collapse_file

    with render.progress() as progress:
        result = collapse_file(
            checkpoint,
            output,
            file_format=None if file_format is None else file_format.value,
            force=force,
            model_factory=source.model,
            inputs=source.inputs(),
            state_key=source.state_key,
            device=device,
            max_shard_bytes=max_shard_bytes,
            model_check=model_check,
            progress=progress,
        )
    for note in result.notes:
        render.info(note)
    render_collapse(result)
    return Outcome(collapse_payload(result), tables=(collapse_cases(result),), warnings=collapse_warnings(result))

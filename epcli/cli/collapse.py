"""``epcli collapse CKPT``: write the collapsed checkpoint and show what each EP layer became."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from epcli.cli import render
from epcli.cli.guard import guarded
from epcli.cli.options import (
    CheckpointArg,
    DeviceOption,
    ForceOption,
    InputOption,
    InputShapeOption,
    JsonOption,
    ModelOption,
    QuietOption,
    StateKeyOption,
    choice,
    parse_inputs,
    parse_size,
)

if TYPE_CHECKING:
    from epcli.artifacts.collapsed import CollapseResult

__all__ = ["collapse_command", "collapse_payload", "render_collapse"]


class OutputFormat(str, Enum):
    safetensors = "safetensors"
    pt = "pt"


@guarded
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
            parser=choice(OutputFormat),
            help="Output format (default: from -o's suffix, else safetensors).",
            show_default=False,
        ),
    ] = None,
    force: ForceOption = False,
    device: DeviceOption = "cpu",
    model: ModelOption = None,
    input_shape: InputShapeOption = None,
    input_specs: InputOption = None,
    state_key: StateKeyOption = None,
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
    json_output: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Collapse every EP layer into one Linear/Conv2d, one layer at a time; write the compact checkpoint (atomically).

    Reads .pt, .safetensors and sharded safetensors (give the .safetensors.index.json); with --model and
    --input-shape/--input also checkpoints epcli did not write (README: "Checkpoints epcli did not write").
    """
    from epcli.storage.paths import prefetch_sha256

    prefetch_sha256((checkpoint,))  # the source is hashed while torch is imported (a directory is hashed later)
    from epcli.jobs.collapse import collapse_file

    with render.progress() as progress:
        result = collapse_file(
            checkpoint,
            output,
            file_format=None if file_format is None else file_format.value,
            force=force,
            model_factory=model,
            inputs=parse_inputs(input_shape, input_specs),
            state_key=state_key,
            device=device,
            max_shard_bytes=None if max_shard_size is None else parse_size(max_shard_size, "--max-shard-size"),
            model_check=model_check,
            progress=progress,
        )
    for note in result.notes:
        render.info(note)
    render_collapse(result)
    if json_output:
        render.emit_json("collapse", collapse_payload(result))


def collapse_payload(result: CollapseResult) -> dict[str, Any]:
    return {
        "source": str(result.source),
        "output": str(result.output),
        "files": [str(path) for path in result.files],
        "source_sha256": result.source_sha256,
        "layers": [
            {
                "path": layer.summary.path,
                "type": layer.summary.layer_type,
                "expanded_params": layer.summary.expanded_params,
                "collapsed_params": layer.summary.collapsed_params,
                "effective_kernel": layer.summary.effective_kernel,
                "max_abs_error": layer.max_abs_error,
                "max_rel_error": layer.max_rel_error,
            }
            for layer in result.layers
        ],
        "model_max_abs_error": result.model_max_abs_error,
        "model_check_skipped": result.model_check_skipped,
        "notes": list(result.notes),
        "expanded_params": result.expanded_params,
        "collapsed_params": result.collapsed_params,
        "compression_ratio": result.compression,
    }


def render_collapse(result: CollapseResult) -> None:
    rows = [
        (
            layer.summary.path,
            layer.summary.layer_type,
            layer.summary.expanded_params,
            layer.summary.collapsed_params,
            "-" if layer.summary.effective_kernel is None else "x".join(map(str, layer.summary.effective_kernel)),
            layer.max_abs_error,
        )
        for layer in result.layers
    ]
    render.table(
        f"Collapsed {result.source.name}",
        ["layer", "type", "expanded params", "collapsed params", "kernel", "max |error|"],
        rows,
        footer=[
            "total",
            "",
            f"{result.expanded_params:,}",
            f"{result.collapsed_params:,}",
            "",
            f"{result.compression:.2f}x smaller",
        ],
    )
    if result.model_max_abs_error is not None:
        render.info(
            f"whole model: max |error| {result.model_max_abs_error:.3g} (written weights vs expanded, in float64)"
        )
    else:
        render.info(f"whole model: not checked: {result.model_check_skipped}")
    if len(result.files) > 1:
        render.success(f"wrote {result.output} and {len(result.files) - 1} shards beside it")
    else:
        render.success(f"wrote {result.output}")

"""``epcli compress CKPT``: write a smaller, low-rank model whose whole-model error stays within a budget."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from epcli.cli import render
from epcli.cli.guard import Outcome
from epcli.cli.options import NO_SOURCE, CheckpointArg, ForceOption, SourceOptions, check_source, non_negative, takes_source

if TYPE_CHECKING:
    from epcli.jobs.compress import CompressFileResult

__all__ = ["compress_command", "compress_payload", "render_compress"]


@takes_source
def compress_command(
    checkpoint: CheckpointArg,
    output: Annotated[
        Path | None,
        typer.Option(
            "-o",
            "--output",
            help="Output file, .safetensors or .pt (default: <stem>.compressed.safetensors beside CKPT).",
            show_default=False,
        ),
    ] = None,
    max_error: Annotated[
        float,
        typer.Option(
            "--max-error",
            metavar="E",
            parser=non_negative,
            help="Largest whole-model error allowed: max |compressed - original| / max |original| over every output "
            "of the samples (0.01 = 1% of the largest output).",
        ),
    ] = 0.01,
    samples_file: Annotated[
        Path | None,
        typer.Option(
            "--inputs",
            metavar="FILE",
            help="Your own samples (.safetensors, .npz or .pt dict; one tensor per model input, batch first): the "
            "error is measured on them and each layer's truncation is whitened by its inputs on them. Default: "
            "64 seeded random samples of the input specs (standard normal for float inputs, uniform in "
            "[low, high) for integer ones) and plain SVD truncation.",
            show_default=False,
        ),
    ] = None,
    onnx: Annotated[
        Path | None,
        typer.Option(
            "--onnx",
            metavar="OUT.onnx",
            help="Also write the compressed model as ONNX, checked in onnxruntime against the same budget.",
            show_default=False,
        ),
    ] = None,
    force: ForceOption = False,
    source: SourceOptions = NO_SOURCE,
) -> Outcome:
    """Factor each Linear/Conv of the collapsed model into two low-rank layers where that saves parameters, at ranks
    keeping the whole model within --max-error; verify, then write a self-describing file (nothing on a miss).

    Exit codes: 0 written, 1 the budget cannot be met (nothing written), 2 usage, 3 unusable input, 4 unwritable
    output.
    """
    from epcli.artifacts.names import check_compress_names

    check_compress_names(checkpoint, output, onnx)  # before torch is imported
    check_source(checkpoint)  # before torch is imported
    warnings: tuple[str, ...] = ()
    if max_error >= 1:  # "1.5" meant as 1.5%: allowed, but said at once
        warnings = (
            f"--max-error {max_error:g} lets the outputs move by {max_error:g} times their largest magnitude; "
            "the budget is a fraction (0.01 is 1%)",
        )
        render.warning(warnings[0])
    from epcli.jobs.compress import compress_file

    with render.progress() as progress:
        progress(0, 1, "compressing")
        result = compress_file(
            checkpoint,
            output,
            max_error=max_error,
            samples_path=samples_file,
            onnx_path=onnx,
            force=force,
            model_factory=source.model,
            inputs=source.inputs(),
            state_key=source.state_key,
        )
    render_compress(result)
    failure = None if result.written else result.reason or "the error budget cannot be met; nothing was written"
    return Outcome(compress_payload(result), failure=failure, warnings=warnings)


def compress_payload(result: CompressFileResult) -> dict[str, Any]:
    compression = result.compression
    return {
        "source": str(result.source),
        "output": str(result.output) if result.written else None,
        "onnx": str(result.onnx) if result.written and result.onnx is not None else None,
        "files": [str(path) for path in result.files],
        "passed": result.written,
        "reason": result.reason,
        "method": compression.method,
        "measured_on": result.inputs,
        "max_error": compression.max_error,
        "model_max_rel_error": compression.model_max_rel_error,
        "model_max_abs_error": compression.model_max_abs_error,
        "onnx_max_rel_error": result.onnx_max_rel_error,
        "threshold": compression.threshold,
        "evaluations": compression.evaluations,
        "layers": [
            {
                "path": layer.path,
                "type": layer.layer_type,
                "rank": layer.rank,
                "full_rank": layer.full_rank,
                "effective_rank": layer.effective_rank,
                "params_before": layer.params_before,
                "params_after": layer.params_after,
                "macs_before": layer.macs_before,
                "macs_after": layer.macs_after,
                "error": layer.error,
            }
            for layer in compression.layers
        ],
        "params_before": compression.params_before,
        "params_after": compression.params_after,
        "macs_before": compression.macs_before,
        "macs_after": compression.macs_after,
    }


def render_compress(result: CompressFileResult) -> None:
    compression = result.compression
    rows = [
        (
            layer.path,
            layer.layer_type,
            "kept" if layer.rank is None else layer.rank,
            layer.full_rank,
            round(layer.effective_rank, 1),
            layer.params_before,
            layer.params_after,
            layer.macs_before,
            layer.macs_after,
            layer.error,
        )
        for layer in compression.layers
    ]
    params, macs = compression.params_before, compression.macs_before
    render.table(
        f"Compressed {result.source.name} ({compression.method})",
        ["layer", "type", "rank", "full", "eff. rank", "params", "params after", "MACs", "MACs after", "layer error"],
        rows,
        footer=[
            "total", "", "", "", "",
            f"{params:,}", f"{compression.params_after:,} ({compression.params_after / max(params, 1):.0%})",
            f"{macs:,}", f"{compression.macs_after:,} ({compression.macs_after / max(macs, 1):.0%})", "",
        ],
    )
    within = compression.model_max_rel_error <= compression.max_error
    render.info(
        f"whole model: max relative error {compression.model_max_rel_error:.3g} "
        f"({'within' if within else 'OVER'} --max-error {compression.max_error:g}; max |error| "
        f"{compression.model_max_abs_error:.3g}) on {result.inputs}"
    )
    if result.onnx_max_rel_error is not None:
        render.info(f"onnxruntime: max relative error {result.onnx_max_rel_error:.3g}")
    if result.reason is not None:
        render.error(result.reason)
    else:
        render.success(f"wrote {', '.join(str(path) for path in result.files)}")

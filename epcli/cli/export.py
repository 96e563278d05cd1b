"""``epcli export CKPT --onnx OUT.onnx`` / ``--safetensors OUT``: deployment artifacts of the collapsed model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from epcli.cli import render
from epcli.cli.guard import Outcome
from epcli.cli.options import (
    NO_SOURCE,
    Atol,
    CheckpointArg,
    DeviceOption,
    Dtype,
    ForceOption,
    Rtol,
    Samples,
    Seed,
    SourceOptions,
    Timeout,
    check_source,
    choice,
    takes_source,
    whole_number,
)
from epcli.cli.reports import (
    collapse_cases,
    collapse_payload,
    collapse_warnings,
    onnx_caption,
    render_collapse,
    render_report,
    report_cases,
    report_failure,
    report_payload,
    report_warnings,
)

__all__ = ["export_command"]


@takes_source
def export_command(
    checkpoint: CheckpointArg,
    onnx_path: Annotated[
        Path | None,
        typer.Option("--onnx", metavar="OUT.onnx", help="Write the collapsed whole model as ONNX.", show_default=False),
    ] = None,
    safetensors_path: Annotated[
        Path | None,
        typer.Option(
            "--safetensors", metavar="OUT", help="Write the collapsed checkpoint as safetensors.", show_default=False
        ),
    ] = None,
    opset: Annotated[
        int, typer.Option("--opset", metavar="N", parser=whole_number(7), help="ONNX opset version.")
    ] = 18,
    static_batch: Annotated[
        bool, typer.Option("--static-batch", help="Fix the batch axis at 1 (default: a dynamic 'batch' axis).")
    ] = False,
    external_data: Annotated[
        bool,
        typer.Option(
            "--external-data",
            help="Write the ONNX weights to OUT.onnx.data beside OUT.onnx (automatic above protobuf's 2 GiB limit).",
        ),
    ] = False,
    external_threshold: Annotated[
        int | None,
        typer.Option(
            "--external-data-threshold",
            metavar="BYTES",
            parser=whole_number(0),
            hidden=True,
            help="Weight bytes above which external data is used (for tests; default about 2 GiB).",
        ),
    ] = None,
    samples: Samples = 64,
    seed: Seed = 0,
    atol: Atol = None,
    rtol: Rtol = None,
    force: ForceOption = False,
    source: SourceOptions = NO_SOURCE,
    dtype: Annotated[
        Dtype,
        typer.Option(
            "--dtype",
            metavar="float32|float64",
            parser=choice(Dtype),
            help="Precision of the validation, as in verify (ONNX export is float32).",
        ),
    ] = Dtype.float32,
    device: DeviceOption = "cpu",
    timeout: Timeout = 60.0,
) -> Outcome:
    """Export the collapsed model. The ONNX file holds one Gemm/Conv per EP layer, passes onnx.checker and is
    compared with the expanded torch model in onnxruntime (float32; rule and default tolerances as in
    `epcli verify`) before it is written; on a mismatch nothing is written and the exit code is 1. A model
    over 2 GiB is written as OUT.onnx plus OUT.onnx.data (keep them together). The ONNX metadata records the
    source's sha256, the epcli version and the errors measured."""
    from epcli.artifacts.names import check_export_names

    check_export_names(checkpoint, onnx_path, safetensors_path, dtype.value)  # before torch is imported
    check_source(checkpoint)  # before torch is imported
    from epcli.jobs.export import export_file
    from epcli.onnx.export import EXTERNAL_DATA_THRESHOLD
    from epcli.verification.compare import VerifySettings

    settings = VerifySettings(samples=samples, seed=seed, dtype=dtype.value, atol=atol, rtol=rtol, device=device)
    with render.progress() as progress:
        result = export_file(
            checkpoint,
            onnx_path=onnx_path,
            safetensors_path=safetensors_path,
            settings=settings,
            opset=opset,
            static_batch=static_batch,
            force=force,
            model_factory=source.model,
            external_data=external_data,
            external_threshold=EXTERNAL_DATA_THRESHOLD if external_threshold is None else external_threshold,
            inputs=source.inputs(),
            state_key=source.state_key,
            timeout=timeout,
            progress=progress,
        )
    payload: dict[str, object] = {"checkpoint": str(checkpoint)}
    tables = []
    warnings: tuple[str, ...] = ()
    failure = None
    if result.onnx is not None:
        onnx = result.onnx
        title = f"Export {checkpoint.name}: {onnx.reference} vs {onnx.output} in onnxruntime"
        render_report(title, onnx.report, onnx_caption(onnx.report, onnx.output))
        tables.append(report_cases(title, onnx.report))
        warnings += report_warnings(onnx.report)
        failure = report_failure(onnx.report)
        ops = ", ".join(f"{op} x{onnx.op_types.count(op)}" for op in dict.fromkeys(onnx.op_types))
        render.info(
            f"ONNX ops: {ops}; opset {onnx.opset}; batch axis {'dynamic' if onnx.dynamic_batch else 'fixed at 1'}"
        )
        if onnx.written:
            data = f" and its external data {onnx.files[1]} (keep them together)" if onnx.external_data else ""
            render.success(f"wrote {onnx.output}{data}")
        else:
            render.error("ONNX validation failed; nothing was written")
        payload["onnx"] = {
            "output": str(onnx.output),
            "written": onnx.written,
            "opset": onnx.opset,
            "dynamic_batch": onnx.dynamic_batch,
            "op_types": list(onnx.op_types),
            "external_data": onnx.external_data,
            "files": [str(path) for path in onnx.files],
            **report_payload(onnx.report),
        }
    if result.safetensors is not None:
        render_collapse(result.safetensors)
        payload["safetensors"] = collapse_payload(result.safetensors)
        tables.append(collapse_cases(result.safetensors))
        warnings += collapse_warnings(result.safetensors)
    return Outcome(payload, failure=failure, tables=tuple(tables), warnings=tuple(dict.fromkeys(warnings)))

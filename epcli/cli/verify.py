"""``epcli verify CKPT [ARTIFACT]``: seeded random-input comparison, CI-ready exit codes."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from epcli.cli import render
from epcli.cli.guard import EXIT_VERIFY_FAILED, guarded
from epcli.cli.options import (
    Atol,
    BatchSize,
    CheckpointArg,
    DeviceOption,
    Dtype,
    InputOption,
    InputShapeOption,
    JsonOption,
    ModelOption,
    QuietOption,
    Rtol,
    Samples,
    Seed,
    StateKeyOption,
    Timeout,
    choice,
    parse_inputs,
)

if TYPE_CHECKING:
    from epcli.verification.compare import VerifyReport

__all__ = ["verify_command", "report_payload", "render_report"]

# Defaults are repeated here (not imported) so --help needs no torch; tests pin them to epcli.verification.compare.
HELP = """Compare the expanded model with its collapsed form on seeded random inputs.

ARTIFACT is a collapsed .safetensors/.pt (from epcli collapse) or an .onnx file (run in
onnxruntime); without it the collapse is computed in memory. Every EP layer is checked
alone, and the whole model when its architecture is known.

Inputs are drawn from the model's input specs (saved in the checkpoint, or given with
--input-shape / --input); --inputs FILE runs the whole model on your own samples.
Outputs may be tuples, dicts or dataclasses of tensors: each tensor is compared.

Pass rule, per element: |collapsed - expanded| <= atol + rtol * |expanded|.
Default tolerances: float32 atol=1e-4 rtol=1e-4; float64 atol=1e-10 rtol=1e-9.
A model stored in bfloat16 or float16 is judged at no less than 8 of its epsilons:
atol = rtol = 0.0625 (bfloat16), 0.0078125 (float16).

An .onnx file is untrusted input: its input and output are checked against the
checkpoint before it runs, and each run is stopped after --timeout seconds.

Exit codes: 0 all passed, 1 a comparison failed, 2 usage or input error."""


@guarded
def verify_command(
    checkpoint: CheckpointArg,
    artifact: Annotated[
        Path | None,
        typer.Argument(
            metavar="ARTIFACT",
            help="Collapsed .safetensors/.pt (or a shard index .safetensors.index.json) or .onnx to check "
            "(default: collapse in memory).",
            show_default=False,
        ),
    ] = None,
    atol: Atol = None,
    rtol: Rtol = None,
    samples: Samples = 64,
    batch_size: BatchSize = 32,
    seed: Seed = 0,
    dtype: Annotated[
        Dtype,
        typer.Option("--dtype", metavar="float32|float64", parser=choice(Dtype), help="Precision of the comparison."),
    ] = Dtype.float32,
    device: DeviceOption = "cpu",
    model: ModelOption = None,
    input_shape: InputShapeOption = None,
    input_specs: InputOption = None,
    state_key: StateKeyOption = None,
    samples_file: Annotated[
        Path | None,
        typer.Option(
            "--inputs",
            metavar="FILE",
            help="Compare the whole model on your own samples instead of random ones: a .safetensors, .npz or .pt "
            "(dict of tensors) holding one tensor per model input, batch first (named input_0, input_1, ... when "
            "there are several). EP layers are still checked on random inputs.",
            show_default=False,
        ),
    ] = None,
    timeout: Timeout = 60.0,
    json_output: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    from epcli.jobs.verify import verify_files
    from epcli.verification.compare import VerifySettings

    settings = VerifySettings(
        samples=samples, batch_size=batch_size, seed=seed, dtype=dtype.value, atol=atol, rtol=rtol, device=device
    )
    with render.progress() as progress:
        result = verify_files(
            checkpoint,
            artifact,
            settings,
            model_factory=model,
            inputs=parse_inputs(input_shape, input_specs),
            state_key=state_key,
            samples_path=samples_file,
            timeout=timeout,
            progress=progress,
        )
    render_report(f"Verify {checkpoint.name}", result.report)
    if json_output:
        render.emit_json(
            "verify",
            {
                "checkpoint": str(checkpoint),
                "artifact": None if artifact is None else str(artifact),
                "artifact_stale": result.artifact_stale,
                **report_payload(result.report),
            },
        )
    if not result.report.passed:
        raise typer.Exit(EXIT_VERIFY_FAILED)


verify_command.__doc__ = HELP


def report_payload(report: VerifyReport) -> dict[str, Any]:
    settings = report.settings
    return {
        "passed": report.passed,
        "pass_rule": "|collapsed - expanded| <= atol + rtol * |expanded|",
        "atol": report.tolerance.atol,
        "rtol": report.tolerance.rtol,
        "dtype": settings.dtype,
        "samples": settings.samples,
        "batch_size": settings.batch_size,
        "seed": settings.seed,
        "model_check_skipped": report.model_check_skipped,
        "notes": list(report.notes),
        "comparisons": [
            {
                "name": c.name,
                "scope": c.scope,
                "candidate": c.candidate,
                "max_abs_error": c.max_abs_error,
                "mean_abs_error": c.mean_abs_error,
                "max_rel_error": c.max_rel_error,
                "mean_rel_error": c.mean_rel_error,
                "min_passing_atol": c.min_atol,
                "passed": c.passed,
            }
            for c in report.comparisons
        ],
    }


def render_report(title: str, report: VerifyReport) -> None:
    default = report.comparisons[0].candidate if report.comparisons else ""
    rows = [
        (
            c.name if c.candidate == default else f"{c.name} via {c.candidate}",
            c.max_abs_error,
            c.mean_abs_error,
            c.max_rel_error,
            c.min_atol,
            c.passed,
        )
        for c in report.comparisons
    ]
    render.table(
        f"{title}: expanded vs {default}",
        ["compared", "max |err|", "mean |err|", "max rel err", "min atol", "pass"],
        rows,
    )
    settings = report.settings
    rule = (
        f"|err| <= {report.tolerance.atol:g} + {report.tolerance.rtol:g}*|expanded|, "
        f"{settings.dtype}, {settings.samples} samples, seed {settings.seed}"
    )
    for note in report.notes:
        render.warning(note)
    if report.model_check_skipped is not None:
        render.info(f"whole model: not compared ({report.model_check_skipped}); only the EP layers were checked")
    if report.passed:
        render.success(f"all {len(report.comparisons)} comparisons passed ({rule})")
    else:
        render.error(f"{len(report.failures)} of {len(report.comparisons)} comparisons failed ({rule})")

"""``epcli verify CKPT [ARTIFACT]``: seeded random-input comparison, CI-ready exit codes."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from epcli.cli import render
from epcli.cli.ci_reports import Case
from epcli.cli.guard import Outcome
from epcli.cli.options import (
    NO_SOURCE,
    Atol,
    BatchSize,
    CheckpointArg,
    DeviceOption,
    Dtype,
    Rtol,
    Seed,
    SourceOptions,
    Timeout,
    check_source,
    choice,
    takes_source,
    whole_number,
)
from epcli.cli.reports import (
    onnx_caption,
    render_report,
    report_cases,
    report_failure,
    report_payload,
    report_warnings,
)
from epcli.errors import CheckpointError, UsageError

__all__ = ["verify_command"]

ARTIFACT_SUFFIXES = (".safetensors", ".pt", ".pth", ".safetensors.index.json", ".onnx")
"""What ARTIFACT may be: a collapsed checkpoint (as epcli collapse writes it) or an ONNX file."""

DEFAULT_SAMPLES = 64
"""--samples without --inputs (as export's); repeated here so --help needs no torch."""
ARTIFACT_CASE = "<artifact>"
"""The JUnit case (and step-summary row) of the artifact's provenance: failed when it is stale."""

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
A compressed ARTIFACT (from epcli compress) is compared as a whole model and passes
when max |compressed - expanded| / max |expanded| <= the budget it records.

An .onnx file is untrusted input: its input and output are checked against the
checkpoint before it runs, and each run is stopped after --timeout seconds.

--require-model-check makes a run that could not compare the whole model (no
embedded architecture and no --model) fail with exit code 1, as a gate should.

Exit codes: 0 all passed; 1 a comparison failed, or the artifact is stale, or (with
--require-model-check) the whole model was not compared; 2 usage; 3 unusable input;
4 unwritable output (--junit-xml)."""


@takes_source
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
    samples: Annotated[
        int | None,
        typer.Option(
            "--samples",
            metavar="N",
            parser=whole_number(1),
            show_default=False,
            help=f"Number of random input samples; not with --inputs, whose samples are all compared. [default: "
            f"{DEFAULT_SAMPLES}]",
        ),
    ] = None,
    batch_size: BatchSize = 32,
    seed: Seed = 0,
    dtype: Annotated[
        Dtype,
        typer.Option("--dtype", metavar="float32|float64", parser=choice(Dtype), help="Precision of the comparison."),
    ] = Dtype.float32,
    device: DeviceOption = "cpu",
    source: SourceOptions = NO_SOURCE,
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
    require_model_check: Annotated[
        bool,
        typer.Option(
            "--require-model-check",
            help="Fail (exit 1) when the whole model was not compared (model_check_skipped), not only when a "
            "comparison fails: for a gate that must cover the model, not just its EP layers.",
        ),
    ] = False,
    plain_model: Annotated[
        str | None,
        typer.Option(
            "--plain-model",
            metavar="MODULE:FUNCTION",
            help="The class you deploy: a function taking no arguments that returns the plain model. The collapsed "
            "ARTIFACT is loaded into it with strict=True and compared with the expanded model end to end, so a "
            "collapse the class cannot hold (a layer that gained a bias) fails here instead of in production.",
            show_default=False,
        ),
    ] = None,
) -> Outcome:
    if checkpoint.suffix.lower() == ".onnx":
        raise UsageError(
            f"{checkpoint} is an ONNX file; the expanded checkpoint goes first and the artifact second: "
            f"epcli verify CKPT {checkpoint}"
        )
    if artifact is not None and not artifact.name.lower().endswith(ARTIFACT_SUFFIXES):
        raise CheckpointError(
            f"{artifact}: unsupported artifact suffix {artifact.suffix!r}; ARTIFACT is one of "
            f"{', '.join(ARTIFACT_SUFFIXES)}",
            file=artifact,
        )
    if samples is not None and samples_file is not None:  # the file's samples are all compared: N would be ignored
        raise UsageError(
            f"give the samples either with --samples {samples} (seeded random ones) or with --inputs {samples_file} "
            f"(yours: every sample of the file is compared), not both; drop --samples"
        )
    check_source(checkpoint)  # before torch is imported
    if artifact is not None:
        from epcli.artifacts.names import remake_artifact

        check_source(artifact, remake_artifact(checkpoint, artifact))
    from epcli.jobs.verify import verify_files
    from epcli.verification.compare import VerifySettings

    settings = VerifySettings(
        samples=DEFAULT_SAMPLES if samples is None else samples,
        batch_size=batch_size,
        seed=seed,
        dtype=dtype.value,
        atol=atol,
        rtol=rtol,
        device=device,
    )
    with render.progress() as progress:
        result = verify_files(
            checkpoint,
            artifact,
            settings,
            model_factory=source.model,
            inputs=source.inputs(),
            state_key=source.state_key,
            samples_path=samples_file,
            timeout=timeout,
            progress=progress,
            plain_model=plain_model,
        )
    title = f"Verify {_names(checkpoint, artifact)}: expanded vs {_compared(artifact)}"
    onnx = artifact if artifact is not None and artifact.suffix.lower() == ".onnx" else None
    render_report(title, result.report, None if onnx is None else onnx_caption(result.report, onnx))
    failure = report_failure(result.report)
    cases = report_cases(title, result.report)
    if result.artifact_stale:  # a failure of its own in CI reports: the comparisons may all have passed, or not run
        stale = f"{artifact} was made from another checkpoint than {checkpoint} (stale artifact" + (
            ")" if result.report.comparisons else "; it does not fit this checkpoint's model, so nothing was compared)"
        )
        cases = replace(cases, cases=(*cases.cases, Case(ARTIFACT_CASE, (str(artifact), "-", "-", "-", "-"), stale)))
        if failure is None:
            failure = stale
            render.error(failure)
    if failure is None and require_model_check and result.report.model_check_skipped is not None:
        failure = (
            f"{checkpoint}: the whole model was not compared ({result.report.model_check_skipped}), which "
            "--require-model-check makes a failure; name the function that builds the expanded model with --model "
            "module:function, so the whole model is compared"
        )
        render.error(failure)
    return Outcome(
        {
            "checkpoint": str(checkpoint),
            "artifact": None if artifact is None else str(artifact),
            "artifact_stale": result.artifact_stale,
            "require_model_check": require_model_check,
            "deploy_changes": {path: list(changes) for path, changes in result.deploy_changes.items()},
            **report_payload(result.report),
        },
        failure=failure,
        tables=(cases,),
        warnings=report_warnings(result.report),
    )


def _names(checkpoint: Path, artifact: Path | None) -> str:
    """The checkpoint's base name, or the path as given when the artifact's base name is the same."""
    return str(checkpoint) if artifact is not None and artifact.name == checkpoint.name else checkpoint.name


def _compared(artifact: Path | None) -> str:
    """What the expanded model was compared with, as the table's title says it."""
    if artifact is None:
        return "collapsed in memory"
    return f"{artifact} in onnxruntime" if artifact.suffix.lower() == ".onnx" else str(artifact)


verify_command.__doc__ = HELP

"""What more than one command reports: a collapse (``collapse``, ``export --safetensors``) and a comparison
(``verify``, ``export --onnx``), as a table for people and as part of a JSON document."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from epcli.cli import render

if TYPE_CHECKING:
    from epcli.artifacts.collapsed import CollapseResult
    from epcli.verification.compare import VerifyReport

__all__ = ["collapse_payload", "render_collapse", "render_record", "render_report", "report_payload"]


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
        "deploy_changes": {path: list(changes) for path, changes in result.deploy_changes.items()},
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


def render_record(compression: dict[str, Any]) -> None:
    """What a compressed file records of its compression (its metadata: shown as text, whatever it holds)."""
    layers = compression.get("layers")
    rows = [
        (path, "kept" if entry.get("rank") is None else entry.get("rank"), entry.get("full_rank"), entry.get("error"))
        for path, entry in (layers.items() if isinstance(layers, dict) else ())
        if isinstance(entry, dict)
    ]
    render.table(
        f"Compressed ({compression.get('method')}, --max-error {compression.get('max_error')})",
        ["layer", "rank", "full rank", "layer error"],
        rows,
    )
    error = compression.get("model_max_rel_error")
    shown = f"{error:.3g}" if isinstance(error, float) else str(error)
    render.info(f"whole model: max relative error {shown} on {compression.get('measured_on')}")

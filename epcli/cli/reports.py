"""What more than one command reports: a collapse (``collapse``, ``export --safetensors``) and a comparison
(``verify``, ``export --onnx``), as a table for people, as part of a JSON document, and as the
:class:`~epcli.cli.ci_reports.CaseTable` the JUnit report and the GitHub step summary are made of."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from epcli.cli import render
from epcli.cli.ci_reports import Case, CaseTable
from epcli.text import plural

if TYPE_CHECKING:
    from epcli.artifacts.collapsed import CollapseResult
    from epcli.verification.compare import Comparison, VerifyReport

__all__ = [
    "collapse_cases",
    "collapse_payload",
    "collapse_warnings",
    "onnx_caption",
    "render_collapse",
    "render_record",
    "render_report",
    "report_cases",
    "report_failure",
    "report_payload",
    "report_warnings",
]

MODEL = "<model>"
"""The name of the whole-model comparison, as the comparisons name it."""


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
        render.success(f"wrote {result.output} and {plural(len(result.files) - 1, 'shard')} beside it")
    else:
        render.success(f"wrote {result.output}")


def collapse_cases(result: CollapseResult) -> CaseTable:
    """Each layer's collapse check and the whole model's (skipped, with why, when it was not made). A collapse
    that failed its check raised, so every case made here passed."""
    cases = [
        Case(layer.summary.path, (layer.summary.layer_type, f"{layer.max_abs_error:.3g}")) for layer in result.layers
    ]
    if result.model_max_abs_error is not None:
        cases.append(Case(MODEL, ("", f"{result.model_max_abs_error:.3g}")))
    else:
        cases.append(Case(MODEL, ("", "-"), skipped=result.model_check_skipped))
    return CaseTable(f"Collapsed {result.source}", ("type", "max |error|"), tuple(cases))


def collapse_warnings(result: CollapseResult) -> tuple[str, ...]:
    """What qualifies a collapse: the notes (which file was read, what was reconciled) and a skipped model check."""
    skipped = () if result.model_check_skipped is None else (f"whole model not checked: {result.model_check_skipped}",)
    return (*result.notes, *skipped)


def report_payload(report: VerifyReport) -> dict[str, Any]:
    """The comparison's keys of a JSON document; ``atol`` / ``rtol`` are null when a budget (``max_error``) is the
    rule, and ``max_error`` null when they are."""
    settings = report.settings
    budget = report.max_error
    return {
        "passed": report.passed,
        "pass_rule": report.pass_rule,
        "atol": report.tolerance.atol if budget is None else None,
        "rtol": report.tolerance.rtol if budget is None else None,
        "max_error": budget,
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


def _threshold(report: VerifyReport) -> str:
    """The rule's numbers: the budget, or atol and rtol."""
    if report.max_error is not None:
        return f"max |err| / max |expanded| <= {report.max_error:g}"
    return f"|err| <= {report.tolerance.atol:g} + {report.tolerance.rtol:g}*|expanded|"


def _rule(report: VerifyReport) -> str:
    settings = report.settings
    return f"{_threshold(report)}, {settings.dtype}, {plural(settings.samples, 'sample')}, seed {settings.seed}"


def _failure(report: VerifyReport, c: Comparison) -> str:
    """Why one comparison failed, with what would have passed."""
    if report.max_error is not None:
        return (
            f"max |err| {c.max_abs_error:.3g}, max rel err {c.max_rel_error:.3g}: over the budget "
            f"({_threshold(report)})"
        )
    return (
        f"max |err| {c.max_abs_error:.3g}, max rel err {c.max_rel_error:.3g}: out of tolerance (atol "
        f"{report.tolerance.atol:g}, rtol {report.tolerance.rtol:g}; it would pass at atol {c.min_atol:.3g})"
    )


def _comparisons(report: VerifyReport) -> str:
    return plural(len(report.comparisons), "comparison")


def report_cases(title: str, report: VerifyReport) -> CaseTable:
    """One case per comparison; a failure carries its numbers and the tolerance; the whole model is a skipped case
    when it was not compared."""
    cases = [
        Case(
            c.name,
            (c.candidate, f"{c.max_abs_error:.3g}", f"{c.mean_abs_error:.3g}", f"{c.max_rel_error:.3g}", f"{c.min_atol:.3g}"),
            failure=None if c.passed else _failure(report, c),
        )
        for c in report.comparisons
    ]
    if report.model_check_skipped is not None:
        cases.append(Case(MODEL, ("", "-", "-", "-", "-"), skipped=report.model_check_skipped))
    return CaseTable(title, ("candidate", "max |err|", "mean |err|", "max rel err", "min atol"), tuple(cases))


def report_failure(report: VerifyReport) -> str | None:
    """Why the comparison did not pass, in one line; None when it passed."""
    if report.passed:
        return None
    failed = ", ".join(c.name for c in report.failures)
    return f"{len(report.failures)} of {_comparisons(report)} failed ({failed}; {_rule(report)})"


def report_warnings(report: VerifyReport) -> tuple[str, ...]:
    """The notes that qualify the numbers, and the whole model not compared."""
    skipped = () if report.model_check_skipped is None else (f"whole model not compared: {report.model_check_skipped}",)
    return (*report.notes, *skipped)


def onnx_caption(report: VerifyReport, onnx: Path) -> str | None:
    """What the rows of a check against an ONNX file compared, which its title (``expanded vs OUT.onnx in onnxruntime``)
    does not say: the EP layer rows are each layer against its collapse in memory, since an ONNX graph runs only as a
    whole; only the whole-model row ran the file. None when there are no layer rows (a compressed file's check)."""
    if not any(c.scope == "layer" for c in report.comparisons):
        return None
    return (
        f"EP layer rows: each layer alone against its collapse computed in memory (an ONNX file runs only as a "
        f"whole); the {MODEL} row runs {onnx} in onnxruntime"
    )


def render_report(title: str, report: VerifyReport, caption: str | None = None) -> None:
    """The comparison table under ``title`` (which says what was compared with what), ``caption`` under it (what
    the title does not say of every row), then the verdict."""
    if not report.comparisons:  # an artifact that does not fit (another model's): its notes say why, the caller fails
        render.info(title)
        for note in report.notes:
            render.warning(note)
        return
    default = report.comparisons[0].candidate
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
    render.table(title, ["compared", "max |err|", "mean |err|", "max rel err", "min atol", "pass"], rows)
    if caption is not None:
        render.info(caption)
    rule = _rule(report)
    for note in report.notes:
        render.warning(note)
    if report.model_check_skipped is not None:
        render.info(f"whole model: not compared ({report.model_check_skipped}); only the EP layers were checked")
    if report.passed:
        render.success(f"{'' if len(report.comparisons) == 1 else 'all '}{_comparisons(report)} passed ({rule})")
    else:
        render.error(f"{len(report.failures)} of {_comparisons(report)} failed ({rule})")


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

"""``epcli inspect CKPT``: EP layers, their configs and sizes, and the effective rank of each collapsed weight."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from epcli.cli import render
from epcli.cli.guard import Outcome
from epcli.cli.options import NO_SOURCE, ForceOption, SourceOptions, check_source, takes_source
from epcli.cli.reports import render_record
from epcli.text import plural

if TYPE_CHECKING:
    from epcli.checkpoint.inputs import InputSpec
    from epcli.layers import EPConfig

__all__ = ["inspect_command"]


@takes_source
def inspect_command(
    checkpoint: Annotated[
        Path,
        typer.Argument(
            metavar="CKPT",
            help="An epcli checkpoint, expanded or collapsed (.pt, .safetensors, or a .safetensors.index.json); with "
            "--model and --input-shape/--input also one epcli did not write (state_dict .pt, Hugging Face folder, "
            "torch.distributed.checkpoint directory).",
            show_default=False,
        ),
    ],
    plot: Annotated[
        Path | None,
        typer.Option(
            "--plot",
            metavar="SPECTRA.png",
            help="Draw the singular-value spectra (needs epcli[plot]).",
            show_default=False,
        ),
    ] = None,
    exact: Annotated[
        bool,
        typer.Option(
            "--exact",
            help="Exact (float64 SVD) spectra for every layer; by default layers whose smaller side is over "
            "512 get them from the Gram matrix, collapse included, in float32 (float64 for float64 weights; "
            "marked ~): no slower than collapse, accurate to about 3e-4 of the largest singular value at worst.",
        ),
    ] = False,
    force: ForceOption = False,
    source: SourceOptions = NO_SOURCE,
) -> Outcome:
    """Show what a checkpoint holds. Effective rank = exp(entropy of the normalised singular values)."""
    if plot is not None:  # the name before torch is imported
        from epcli.storage.paths import check_output_name

        check_output_name(plot, (".png",), option="--plot", example="spectra.png")
    check_source(checkpoint)  # before torch is imported
    from epcli.jobs.inspect import inspect_file

    inputs = source.inputs()
    with render.progress() as progress:
        result = inspect_file(
            checkpoint,
            model_factory=source.model,
            inputs=inputs,
            state_key=source.state_key,
            plot=plot,
            force=force,
            exact=exact,
            progress=progress,
        )
    meta = result.metadata
    written = (
        f"{meta['source_format']} checkpoint without epcli metadata (EP configs from --model)"
        if "source_format" in meta
        else f"{result.kind} epcli checkpoint (format v{meta.get('format_version')}, "
        f"epcli {meta.get('epcli_version')}, torch {meta.get('torch_version')})"
    )
    architecture = (
        "from --model" if "source_format" in meta
        else "embedded" if result.has_architecture
        else "not embedded (use --model)"
    )
    for note in meta.get("notes", []):  # what was reconciled between a foreign file and the model
        render.info(note)
    render.info(
        f"{result.path.name}: {written}; "
        f"{_inputs(result.inputs)}; "
        f"architecture {architecture}; "
        f"{plural(result.tensor_count, 'tensor')}, {result.element_count:,} value{'' if result.element_count == 1 else 's'}"
    )
    rows = []
    for layer in result.layers:
        s, c = layer.summary, layer.summary.config
        mark = "~" if layer.spectrum.approximate else ""  # the ranks are approximate
        kernel = f" k{'x'.join(map(str, s.effective_kernel))}" if s.effective_kernel else ""
        rows.append(
            (
                s.path,
                f"{s.layer_type} {c.in_dim}->{c.out_dim}{kernel}",
                _chain(c),
                f"{s.expanded_params:,} -> {s.collapsed_params:,}",
                f"{mark}{layer.spectrum.effective_rank:.1f}",
                f"{mark}{layer.spectrum.rank}",
            )
        )
    approximate = any(layer.spectrum.approximate for layer in result.layers)
    compression = (meta.get("provenance") or {}).get("compression")
    if isinstance(compression, dict):  # from epcli compress: no EP layers left, its low-rank layers instead
        render_record(compression)
    if rows or not isinstance(compression, dict):
        render.table(
            "EP layers (parameters expanded -> collapsed; effective and numerical rank of the collapsed weight"
            + ("; ~: approximate, from the Gram matrix; --exact for exact)" if approximate else ")"),
            ["layer", "EP layer", "chain", "params", "erank", "rank"],
            rows,
        )
    if plot is not None:
        render.success(f"wrote {plot}")
    return Outcome(_payload(result), warnings=tuple(meta.get("notes", [])))


def _chain(config: EPConfig) -> str:
    """``depth 4, width 1, batch-norm, 2 identity skips over 2 layers``: the chain in the words of the layer docs (the
    config's ``residual_mode`` "none" means identity skips, not none; its intervals are how many layers a skip spans)."""
    parts = [f"depth {config.depth}", f"width {config.width:g}"] + (["batch-norm"] if config.batch_norm else [])
    if config.skips:  # residual with intervals longer than the chain has no skip at all
        spans = sorted({end - start for start, end in config.skips})
        kind = "learnable skip" if config.learnable_skips else "identity skip"
        parts.append(f"{plural(len(config.skips), kind)} over {' or '.join(map(str, spans))} layer{'s' * (spans != [1])}")
    return ", ".join(parts)


def _inputs(specs: Sequence[InputSpec]) -> str:
    """``input float32[64]``, ``input int64[16] with values in [0, 50257)``: each input's dtype and shape, and its
    range when the spec records one (token ids), which a shape alone does not say."""

    def one(spec: InputSpec) -> str:
        text = f"{spec.name}[{','.join(map(str, spec.shape))}]"
        bounded = spec.low is not None and spec.high is not None and spec.name != "bool"  # a bool is 0 or 1
        return f"{text} with values in [{spec.low:g}, {spec.high:g})" if bounded else text

    return f"input{'s' if len(specs) > 1 else ''} {' and '.join(one(spec) for spec in specs)}"


def _payload(result: Any) -> dict[str, Any]:
    return {
        "checkpoint": str(result.path),
        "kind": result.kind,
        "format_version": result.metadata.get("format_version"),
        "epcli_version": result.metadata.get("epcli_version"),
        "torch_version": result.metadata.get("torch_version"),
        "input_shape": list(result.input_shape),
        "inputs": [spec.to_dict() for spec in result.inputs],
        "has_architecture": result.has_architecture,
        "tensor_count": result.tensor_count,
        "element_count": result.element_count,
        "layers": [
            {
                "path": layer.summary.path,
                "type": layer.summary.layer_type,
                "config": layer.summary.config.to_dict(),
                "input_shape": list(layer.summary.input_shape),
                "expanded_params": layer.summary.expanded_params,
                "collapsed_params": layer.summary.collapsed_params,
                "effective_kernel": layer.summary.effective_kernel,
                "effective_rank": layer.spectrum.effective_rank,
                "rank": layer.spectrum.rank,
                "spectrum_method": layer.spectrum.method,
                "spectrum_dtype": layer.spectrum.dtype,
                "ranks_approximate": layer.spectrum.approximate,
                "singular_values": list(layer.spectrum.singular_values),
            }
            for layer in result.layers
        ],
    }

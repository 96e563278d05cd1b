"""``epcli collapse``: an expanded checkpoint file in, a collapsed one out, with measured errors."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path

from epcli import __version__
from epcli.convert import collapse_state_dict
from epcli.devices import resolve_device
from epcli.errors import UsageError
from epcli.formats.checkpoint import Checkpoint, load_checkpoint, save_collapsed_checkpoint
from epcli.jobs.summary import LayerSummary, summarize_layer
from epcli.jobs.verify import ProgressCallback, verify_checkpoint
from epcli.verify import VerifySettings

__all__ = [
    "OUTPUT_FORMATS",
    "CollapseResult",
    "LayerCollapse",
    "collapse_file",
    "default_output",
    "file_sha256",
    "resolve_output",
    "write_collapsed",
]

OUTPUT_FORMATS = {"safetensors": ".safetensors", "pt": ".pt"}
ERROR_SETTINGS = VerifySettings(samples=32, batch_size=32, seed=0, dtype="float64")
"""How the per-layer error of the written weights is measured: float64, so only the collapse and the cast count."""


@dataclass(frozen=True)
class LayerCollapse:
    summary: LayerSummary
    max_abs_error: float
    max_rel_error: float


@dataclass(frozen=True)
class CollapseResult:
    source: Path
    output: Path
    source_sha256: str
    layers: tuple[LayerCollapse, ...]
    model_max_abs_error: float | None  # None without an embedded architecture

    @property
    def expanded_params(self) -> int:
        return sum(layer.summary.expanded_params for layer in self.layers)

    @property
    def collapsed_params(self) -> int:
        return sum(layer.summary.collapsed_params for layer in self.layers)

    @property
    def compression(self) -> float:
        return self.expanded_params / self.collapsed_params if self.collapsed_params else 1.0


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def default_output(source: Path, file_format: str) -> Path:
    """``<stem>.collapsed.<format>`` beside the source."""
    return source.with_name(f"{source.stem}.collapsed{OUTPUT_FORMATS[file_format]}")


def resolve_output(source: Path, output: Path | None, file_format: str | None, force: bool) -> Path:
    """Pick the output path; refuse to clobber the source or (without ``force``) an existing file."""
    if file_format is not None and file_format not in OUTPUT_FORMATS:
        raise UsageError(f"--format must be one of {sorted(OUTPUT_FORMATS)}, got {file_format!r}")
    if output is None:
        output = default_output(source, file_format or "safetensors")
    elif file_format is not None and output.suffix != OUTPUT_FORMATS[file_format]:
        raise UsageError(f"{output}: the suffix does not match --format {file_format}; use {OUTPUT_FORMATS[file_format]}")
    if output.suffix not in OUTPUT_FORMATS.values():
        raise UsageError(f"{output}: unsupported output suffix {output.suffix!r}; use .safetensors or .pt")
    if output.resolve() == source.resolve():
        raise UsageError(f"{output}: the output would overwrite the source checkpoint; choose another path with -o")
    if output.exists() and not force:
        raise UsageError(f"{output} already exists; pass --force to overwrite it")
    if output.is_dir():
        raise UsageError(f"{output} is a directory; give a file path with -o")
    return output


def collapse_file(
    source: Path,
    output: Path | None = None,
    *,
    file_format: str | None = None,
    force: bool = False,
    model_factory: str | None = None,
    device: str = "cpu",
    progress: ProgressCallback | None = None,
) -> CollapseResult:
    """Collapse every EP layer of ``source`` (the math on ``device``) and write the result atomically."""
    resolve_device(device)  # a bad device fails before any work
    output = resolve_output(source, output, file_format, force)
    checkpoint = load_checkpoint(source, model_factory=model_factory)
    return write_collapsed(checkpoint, output, device=device, progress=progress)


def write_collapsed(
    checkpoint: Checkpoint, output: Path, *, device: str = "cpu", progress: ProgressCallback | None = None
) -> CollapseResult:
    """Collapse a loaded expanded checkpoint, measure each layer's error, write ``output`` atomically."""
    source = checkpoint.path
    if checkpoint.kind != "expanded":
        raise UsageError(f"{source}: already collapsed; nothing to do")
    collapsed_state = collapse_state_dict(checkpoint.state_dict, checkpoint.ep_layers, device=resolve_device(device))
    settings = replace(ERROR_SETTINGS, device=device)
    report = verify_checkpoint(checkpoint, settings, collapsed_state=collapsed_state, progress=progress)
    by_name = {c.name: c for c in report.comparisons}
    layers = tuple(
        LayerCollapse(
            summarize_layer(path, config, checkpoint.layer_input_shapes[path]),
            by_name[path].max_abs_error,
            by_name[path].max_rel_error,
        )
        for path, config in checkpoint.ep_layers.items()
    )
    model = by_name.get("<model>")
    sha = file_sha256(source)
    provenance = {
        "source_name": source.name,
        "source_sha256": sha,
        "collapsed_by": f"epcli {__version__}",
        "error_check": {"dtype": ERROR_SETTINGS.dtype, "samples": ERROR_SETTINGS.samples, "seed": ERROR_SETTINGS.seed},
        "layer_max_abs_error": {layer.summary.path: layer.max_abs_error for layer in layers},
        "model_max_abs_error": None if model is None else model.max_abs_error,
    }
    save_collapsed_checkpoint(checkpoint, output, provenance=provenance, collapsed_state=collapsed_state)
    return CollapseResult(source, output, sha, layers, None if model is None else model.max_abs_error)

"""The names of the files the commands write: defaults beside the source, and the checks of a given name.

Nothing here imports torch, so the CLI checks an output's name (its suffix, not a directory) before it loads
torch: a misspelt ``-o`` fails as fast as any other usage error. The jobs run the same checks again, so the
library API checks what it is given too; what exists at the path is checked later, with the other files a
write implies (:func:`~epcli.storage.paths.check_targets`).
"""

from __future__ import annotations

from pathlib import Path

from epcli.errors import UsageError
from epcli.storage.paths import check_output_name, is_index, sharded_base

__all__ = [
    "OUTPUT_FORMATS",
    "check_compress_names",
    "check_export_names",
    "default_compressed_output",
    "default_output",
    "remake_artifact",
    "resolve_output",
    "source_stem",
]

OUTPUT_FORMATS = {"safetensors": ".safetensors", "pt": ".pt"}


def _named(source: Path) -> Path:
    """The source under a name (``.`` or ``..``, a directory argument, has none until resolved)."""
    return source if source.name else source.resolve()


def source_stem(source: Path) -> str:
    """``<stem>`` of ``<stem>.pt``, ``<stem>.safetensors`` and ``<stem>.safetensors.index.json``."""
    source = _named(source)
    return (sharded_base(source) if is_index(source) else source).stem or "model"


def _beside(source: Path, name: str) -> Path:
    source = _named(source)
    return source.with_name(name) if source.name else source / name


def default_output(source: Path, file_format: str) -> Path:
    """``<stem>.collapsed.<format>`` beside the source (``<stem>`` of ``<stem>.safetensors.index.json`` too)."""
    return _beside(source, f"{source_stem(source)}.collapsed{OUTPUT_FORMATS[file_format]}")


def default_compressed_output(source: Path) -> Path:
    """``<stem>.compressed.safetensors`` beside the source."""
    return _beside(source, f"{source_stem(source)}.compressed.safetensors")


def resolve_output(source: Path, output: Path | None, file_format: str | None, option: str = "-o") -> Path:
    """Pick the output path and check its name (what exists there is checked with the other files it implies).

    ``option`` is how the user named the output (``-o``, or export's ``--safetensors``, which fixes the format).
    """
    if file_format is not None and file_format not in OUTPUT_FORMATS:
        raise UsageError(f"--format must be one of {sorted(OUTPUT_FORMATS)}, got {file_format!r}")
    if output is None:
        return default_output(source, file_format or "safetensors")
    example = default_output(source, file_format or "safetensors").name
    if option == "-o" and output.suffix.lower() == ".onnx":
        raise UsageError(f"{output}: {option} writes a collapsed checkpoint; for ONNX run epcli export CKPT --onnx {output}")
    suffixes = OUTPUT_FORMATS.values() if option == "-o" or file_format is None else (OUTPUT_FORMATS[file_format],)
    check_output_name(output, suffixes, option=option, example=example)
    if file_format is not None and output.suffix != OUTPUT_FORMATS[file_format]:
        raise UsageError(
            f"{output}: the suffix does not match --format {file_format}; use {OUTPUT_FORMATS[file_format]}"
        )
    return output


def check_export_names(source: Path, onnx_path: Path | None, safetensors_path: Path | None, dtype: str) -> None:
    """What ``epcli export`` is asked to write: something, ONNX only in float32, names with the right suffixes."""
    if onnx_path is None and safetensors_path is None:
        raise UsageError("nothing to export: give --onnx OUT.onnx and/or --safetensors OUT.safetensors")
    if onnx_path is not None and dtype != "float32":
        raise UsageError("ONNX export is float32; run with --dtype float32")
    if onnx_path is not None:
        check_output_name(onnx_path, (".onnx",), option="--onnx", example=f"{source_stem(source)}.onnx")
    if safetensors_path is not None:
        resolve_output(source, safetensors_path, "safetensors", option="--safetensors")


def check_compress_names(source: Path, output: Path | None, onnx_path: Path | None) -> Path:
    """The compressed file's name (default: :func:`default_compressed_output`) and the ONNX one's; returns the first."""
    output = output or default_compressed_output(source)
    if output.suffix.lower() == ".onnx":
        raise UsageError(
            f"{output}: -o writes the compressed checkpoint; for ONNX add --onnx {output} (with -o NAME.safetensors, "
            "or the default name beside the source)"
        )
    check_output_name(output, (".safetensors", ".pt"), option="-o", example=default_compressed_output(source).name)
    if onnx_path is not None:
        check_output_name(onnx_path, (".onnx",), option="--onnx", example=f"{output.stem}.onnx")
    return output


def remake_artifact(source: Path, artifact: Path) -> str:
    """How to write ``artifact`` again from ``source``: the fix for an artifact that is unusable as a file (empty, a
    write that did not finish), which a checkpoint's fix (save it again) does not fit."""
    if artifact.suffix.lower() == ".onnx":
        return (
            f"write it again with epcli export {source} --onnx {artifact} (epcli compress {source} --onnx {artifact} "
            "for a compressed model)"
        )
    output = sharded_base(artifact) if is_index(artifact) else artifact
    return (
        f"write it again with epcli collapse {source} -o {output} (epcli compress {source} -o {output} for a "
        "compressed model)"
    )

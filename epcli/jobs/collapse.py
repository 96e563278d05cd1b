"""``epcli collapse``: an expanded checkpoint file in, a collapsed one out, one EP layer at a time.

The file is opened once, without reading its tensors (every check that needs no data runs
first, on meta tensors); the output is planned and written from that opened file by
:mod:`epcli.artifacts.collapsed`, which keeps peak memory to about one layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from epcli.artifacts.collapsed import CollapseResult, check_shard_limit, plan_output, write_collapsed
from epcli.checkpoint.inputs import InputSpec
from epcli.checkpoint.load import open_checkpoint
from epcli.devices import resolve_device
from epcli.progress import ProgressCallback

__all__ = ["collapse_file"]


def collapse_file(
    source: Path,
    output: Path | None = None,
    *,
    file_format: str | None = None,
    force: bool = False,
    model_factory: str | None = None,
    inputs: Sequence[InputSpec] | None = None,
    state_key: str | None = None,
    device: str = "cpu",
    max_shard_bytes: int | None = None,
    model_check: bool | None = None,
    progress: ProgressCallback | None = None,
) -> CollapseResult:
    """Collapse every EP layer of ``source`` one at a time (the math on ``device``) and write the result atomically.

    ``max_shard_bytes`` (``.safetensors`` only; default
    :data:`~epcli.artifacts.collapsed.DEFAULT_MAX_SHARD_BYTES`) shards larger outputs. ``model_check``: None
    checks the whole model when the checkpoint is small enough, True always, False never. ``model_factory``
    (checked before any work), ``inputs`` and ``state_key`` are as in :func:`~epcli.load_checkpoint`: with them
    ``source`` may be a checkpoint another tool wrote.
    """
    resolve_device(device)  # a bad device or shard limit fails before the source is opened
    check_shard_limit(max_shard_bytes)
    opened = open_checkpoint(source, model_factory=model_factory, inputs=inputs, state_key=state_key)
    plan = plan_output(opened, output, file_format=file_format, force=force, max_shard_bytes=max_shard_bytes)
    return write_collapsed(plan, device=device, model_check=model_check, progress=progress)

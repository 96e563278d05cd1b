"""Which device the collapse and the checks run on: the CPU unless CUDA is asked for and present."""

from __future__ import annotations

import torch

from epcli.errors import UsageError
from epcli.text import plural

__all__ = ["DEVICES", "resolve_device"]

DEVICES = ("cpu", "cuda")


def resolve_device(name: str) -> torch.device:
    """``"cpu"`` or ``"cuda"`` (optionally ``"cuda:N"``); CUDA only when this torch build sees a GPU."""
    kind = name.split(":", 1)[0]
    if kind not in DEVICES:
        raise UsageError(f"unknown device {name!r}; use one of {', '.join(DEVICES)}")
    if kind == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}, but no GPU is visible"
            raise UsageError(f"--device {name}: CUDA is not available (torch {torch.__version__} is {build}); use --device cpu")
        try:
            device = torch.device(name)
        except RuntimeError as e:
            raise UsageError(f"--device {name}: {e}") from e
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: only {plural(torch.cuda.device_count(), 'CUDA device')} visible")
        return device
    return torch.device("cpu")

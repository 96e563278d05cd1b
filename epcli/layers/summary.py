"""Per-layer facts shared by ``collapse`` and ``inspect``: sizes and kernels from the config alone."""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable
from dataclasses import dataclass

from epcli.layers import EPConfig, EPConvConfig
from epcli.layers.registry import build_layer, expected_state

__all__ = ["LayerSummary", "natural_order", "summarize_layer"]


def natural_order(paths: Iterable[str]) -> list[str]:
    """Layer paths as a reader counts them: ``2`` before ``10`` (files list keys sorted as text: ``0, 10, 2``)."""

    def key(path: str) -> list[int | str]:
        return [
            int(part) if odd else part for odd, part in zip(itertools.cycle((False, True)), re.split(r"(\d+)", path))
        ]

    return sorted(paths, key=key)


@dataclass(frozen=True)
class LayerSummary:
    """What an EP layer costs expanded and collapsed."""

    path: str
    layer_type: str
    config: EPConfig
    input_shape: tuple[int, ...]
    expanded_params: int
    collapsed_params: int
    effective_kernel: tuple[int, ...] | None  # conv only: the collapsed kernel per spatial dim


def summarize_layer(path: str, config: EPConfig, input_shape: tuple[int, ...]) -> LayerSummary:
    """Parameter counts from the config alone (the layer is built on the meta device: no memory, no init cost)."""
    expanded = sum(p.numel() for p in build_layer(config, device="meta").parameters())
    kernel = config.kernel_size if isinstance(config, EPConvConfig) else None
    collapsed = sum(t.numel() for t in expected_state(config, collapsed=True).values())  # meta tensors: no memory
    return LayerSummary(
        path=path,
        layer_type=config.layer_type,
        config=config,
        input_shape=input_shape,
        expanded_params=expanded,
        collapsed_params=collapsed,
        effective_kernel=kernel,
    )

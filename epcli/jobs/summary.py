"""Per-layer facts shared by ``collapse`` and ``inspect``: sizes, kernels, spectra."""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from epcli.layers import EPConfig, EPConvConfig
from epcli.layers.registry import build_layer, expected_state

__all__ = ["LayerSummary", "Spectrum", "natural_order", "summarize_layer", "spectrum"]


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


@dataclass(frozen=True)
class Spectrum:
    """Singular values of a collapsed weight (as ``[out, in * K * K]``) and its effective rank.

    Effective rank is ``exp(H(p))`` with ``p = s / sum(s)`` (Roy & Vetterli, 2007): the
    quantity the low-rank simplicity bias is about.
    """

    singular_values: tuple[float, ...]
    effective_rank: float
    rank: int  # numerical rank: singular values above max(shape) * eps * s_max


def spectrum(weight: Tensor) -> Spectrum:
    matrix = weight.detach().to(torch.float64).reshape(weight.shape[0], -1)  # [out, in(*K*K)]
    values = torch.linalg.svdvals(matrix)
    total = float(values.sum())
    if total == 0:
        return Spectrum(tuple(values.tolist()), 0.0, 0)
    p = values / total
    p = p[p > 0]
    entropy = float(-(p * p.log()).sum())
    threshold = max(matrix.shape) * torch.finfo(torch.float64).eps * float(values[0])
    return Spectrum(tuple(values.tolist()), math.exp(entropy), int((values > threshold).sum()))

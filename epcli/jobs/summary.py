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

__all__ = [
    "EXACT_SPECTRUM_MAX_SIDE",
    "SPECTRUM_METHODS",
    "LayerSummary",
    "Spectrum",
    "natural_order",
    "spectrum",
    "summarize_layer",
]


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


EXACT_SPECTRUM_MAX_SIDE = 512
"""Largest smaller side of a collapsed weight whose singular values are computed exactly (a float64 SVD).

Measured on 2 cores: at 512 the SVD takes a fraction of a second; at 1024 a few seconds and at 2048
about 20 s, several times the layer's collapse, while the Gram matrix's eigenvalues (below) take a
fraction of that and are accurate to about 1e-8 of the largest singular value (float32 singular values,
the other cheap method measured, were slower at 2048 and only accurate to about 1e-6).
"""

SPECTRUM_METHODS = {
    "svd": "exact: singular values by a float64 SVD",
    "gram": "approximate: square roots of the eigenvalues of the float64 Gram matrix W W^T",
}


@dataclass(frozen=True)
class Spectrum:
    """Singular values of a collapsed weight (as ``[out, in * K * K]``) and its effective rank.

    Effective rank is ``exp(H(p))`` with ``p = s / sum(s)`` (Roy & Vetterli, 2007): the
    quantity the low-rank simplicity bias is about. ``method`` is a key of
    :data:`SPECTRUM_METHODS`; with ``"gram"`` the singular values are accurate to about
    ``sqrt(n * eps) * s_max`` (float64 eps), so the numerical rank counts only values above that.
    """

    singular_values: tuple[float, ...]
    effective_rank: float
    rank: int  # numerical rank: singular values above the method's resolution (see spectrum)
    method: str

    @property
    def approximate(self) -> bool:
        return self.method != "svd"


def spectrum(weight: Tensor, *, exact: bool | None = None) -> Spectrum:
    """The spectrum of ``weight``: exact (float64 SVD) when ``exact`` or, by default, when its smaller side is at
    most :data:`EXACT_SPECTRUM_MAX_SIDE`; otherwise from the eigenvalues of its float64 Gram matrix.

    Numerical rank thresholds follow each method's precision: ``max(shape) * eps * s_max`` for the SVD, and
    ``sqrt(max(shape) * eps) * s_max`` for the Gram matrix (its eigenvalues, the squared singular values,
    are accurate to ``max(shape) * eps * s_max**2``).
    """
    matrix = weight.detach().to(torch.float64).reshape(weight.shape[0], -1)  # [out, in(*K*K)]
    rows, cols = matrix.shape
    eps = torch.finfo(torch.float64).eps
    if exact or (exact is None and min(rows, cols) <= EXACT_SPECTRUM_MAX_SIDE):
        method, values = "svd", torch.linalg.svdvals(matrix)
        resolution = max(rows, cols) * eps
    else:
        method = "gram"
        gram = matrix @ matrix.T if rows <= cols else matrix.T @ matrix  # [k, k], k = min(rows, cols)
        del matrix
        # ascending eigenvalues -> descending singular values; rounding can make the smallest slightly negative
        values = torch.linalg.eigvalsh(gram).flip(0).clamp_(min=0).sqrt_()
        resolution = math.sqrt(max(rows, cols) * eps)
    total = float(values.sum())
    if total == 0:
        return Spectrum(tuple(values.tolist()), 0.0, 0, method)
    p = values / total
    p = p[p > 0]
    entropy = float(-(p * p.log()).sum())
    threshold = resolution * float(values[0])
    return Spectrum(tuple(values.tolist()), math.exp(entropy), int((values > threshold).sum()), method)

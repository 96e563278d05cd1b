"""The singular-value spectrum of a collapsed weight: effective and numerical rank, exact or from the Gram matrix."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["EXACT_SPECTRUM_MAX_SIDE", "SPECTRUM_METHODS", "Spectrum", "spectrum", "spectrum_method"]


EXACT_SPECTRUM_MAX_SIDE = 512
"""Largest smaller side of a collapsed weight whose singular values are computed exactly (a float64 SVD).

Measured on 2 cores: at 512 the SVD takes a fraction of a second; at 2048 about 20 s, several times the
layer's collapse. Larger layers get the eigenvalues of their Gram matrix, collapse and all computed in float32
(float64 for a float64 weight): at 4096 that is about half the float64 collapse alone, which is what lets
``epcli inspect`` run no slower than ``epcli collapse`` of the same file.
"""

SPECTRUM_METHODS = {
    "svd": "exact: singular values by a float64 SVD of the collapsed weight",
    "gram": "approximate: square roots of the eigenvalues of the Gram matrix W W^T, computed with the collapse "
    "in float32 (float64 for a float64 weight)",
}


def spectrum_method(shape: Sequence[int], dtype: torch.dtype, exact: bool | None = None) -> tuple[str, torch.dtype]:
    """The method (a key of :data:`SPECTRUM_METHODS`) and working dtype for the spectrum of a collapsed weight of
    this shape and stored ``dtype``: exact when ``exact`` or, by default, when its smaller side is at most
    :data:`EXACT_SPECTRUM_MAX_SIDE`. The working dtype is also the one to collapse the layer in."""
    rows, cols = shape[0], math.prod(shape[1:])
    if exact or (exact is None and min(rows, cols) <= EXACT_SPECTRUM_MAX_SIDE):
        return "svd", torch.float64
    return "gram", _precision(dtype)


def _precision(dtype: torch.dtype) -> torch.dtype:
    """The precision a stored weight is analysed at: float64 for a float64 weight, float32 for any narrower one."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class Spectrum:
    """Singular values of a collapsed weight (as ``[out, in * K * K]``), its effective and numerical rank.

    Effective rank is ``exp(H(p))`` with ``p = s / sum(s)`` (Roy & Vetterli, 2007): the quantity the low-rank
    simplicity bias is about. The numerical rank counts singular values above ``max(shape) * eps * s_max``, with
    ``eps`` that of float32 (float64 for a float64 weight): what ``torch.linalg.matrix_rank`` gives for the
    stored weight. ``method`` is a key of :data:`SPECTRUM_METHODS`; with ``"gram"`` the values are accurate to
    about ``sqrt(eps) * s_max`` of the working dtype at worst (3e-4 in float32, 1e-8 in float64; values in the
    rounding noise are reported as 0, see :func:`spectrum`), so values near the threshold can be miscounted.
    """

    singular_values: tuple[float, ...]
    effective_rank: float
    rank: int
    method: str
    dtype: str  # the working dtype of the method

    @property
    def approximate(self) -> bool:
        return self.method != "svd"


def spectrum(weight: Tensor, *, exact: bool | None = None) -> Spectrum:
    """The spectrum of ``weight`` (as stored) by :func:`spectrum_method`.

    With the Gram matrix, whose eigenvalues are the squared singular values, rounding turns the zero eigenvalues
    of a rank-deficient weight into noise of either sign, about ``sqrt(eps) * s_max`` after the square root
    (3e-4 in float32): far above the rank threshold, and enough to inflate the effective rank of a low-rank
    layer several times. The most negative eigenvalue is pure rounding (the Gram matrix is positive
    semi-definite), so singular values up to twice its square root are reported as 0.
    """
    method, work = spectrum_method(weight.shape, weight.dtype, exact)
    matrix = weight.detach().to(work).reshape(weight.shape[0], -1)  # [out, in(*K*K)]
    rows, cols = matrix.shape
    threshold = max(rows, cols) * torch.finfo(_precision(weight.dtype)).eps
    if method == "svd":
        values = torch.linalg.svdvals(matrix)
    else:
        gram = matrix @ matrix.T if rows <= cols else matrix.T @ matrix  # [k, k], k = min(rows, cols)
        del matrix
        eigenvalues = torch.linalg.eigvalsh(gram).to(torch.float64).flip(0)  # descending
        noise = 2 * math.sqrt(max(0.0, -float(eigenvalues[-1])))
        values = eigenvalues.clamp_(min=0).sqrt_()
        values[values <= noise] = 0
    values = values.to(torch.float64)
    singular_values, working = tuple(values.tolist()), str(work).removeprefix("torch.")
    total = float(values.sum())
    if total == 0:
        return Spectrum(singular_values, 0.0, 0, method, working)
    p = values / total
    p = p[p > 0]
    entropy = float(-(p * p.log()).sum())
    rank = int((values > threshold * float(values[0])).sum())
    return Spectrum(singular_values, math.exp(entropy), rank, method, working)

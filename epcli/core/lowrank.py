"""Truncated-SVD factors of a collapsed weight, plain or data-aware (whitened).

The whitening and the factors are computed in float64; the SVD itself in a precision the caller picks:
``compress`` takes that of the layer (at least float32), since the factors are stored in it, and a float64 SVD
costs twice the memory and time of a float32 one for digits the stored factors cannot hold.

A weight ``W [out, n]`` (a Linear, or one group of a conv as ``[out/g, in/g * K]``) is factored as
``B [out, r] @ A [r, n]``. Plain truncation keeps the top singular values of ``W``: it minimises
``||W - BA||_F``. Whitened truncation (SVD-LLM's truncation-aware data whitening) minimises the *output* error
on calibration inputs ``X [m, n]`` instead: with ``X^T X + ridge * I = S S^T`` (Cholesky, ``S`` lower),
``||(W - BA) X^T||_F^2 + ridge ||W - BA||_F^2 = ||(W - BA) S||_F^2``, so truncating the SVD of ``W S`` to ``r``
values makes that error exactly the energy of the discarded singular values of ``W S``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["DEFAULT_RIDGE", "Factors", "Truncation", "conv_factors", "group_matrices", "truncation", "whitening"]

DEFAULT_RIDGE = 1e-3
"""Ridge added to the calibration Gram matrix, relative to its mean diagonal.

Directions the calibration inputs never take (e.g. digit pixels that are always 0) make ``X^T X`` singular; the
ridge charges weight error there too, so a factor never grows without bound in a direction held-out data may take.
"""


def whitening(gram: Tensor, ridge: float = DEFAULT_RIDGE) -> Tensor:
    """The lower Cholesky factor ``S`` of ``gram + ridge * mean(diag(gram)) * I``, in float64."""
    gram = gram.to(torch.float64)
    scale = float(gram.diagonal().mean()) if gram.numel() else 0.0
    shift = ridge * scale if scale > 0 else 1.0  # an all-zero Gram (no signal): plain truncation
    eye = torch.eye(gram.shape[0], dtype=torch.float64, device=gram.device)
    factor: Tensor = torch.linalg.cholesky(gram + shift * eye)
    return factor


@dataclass(frozen=True)
class Truncation:
    """The SVD of ``W S`` (``S`` = identity for plain truncation), ready to be cut at any rank.

    ``u [out, k]``, ``singular_values [k]`` (descending), ``vh [k, n]`` with ``k = min(out, n)``;
    ``whiten`` is ``S [n, n]`` or None.
    """

    u: Tensor
    singular_values: Tensor
    vh: Tensor
    whiten: Tensor | None

    @property
    def full_rank(self) -> int:
        return int(self.singular_values.numel())

    def discarded_energy(self, rank: int) -> float:
        """``sum_{i >= rank} s_i^2``: the squared (whitened) error of keeping ``rank`` values."""
        return float(self.singular_values[rank:].square().sum())

    def factors(self, rank: int) -> tuple[Tensor, Tensor]:
        """``B [out, rank]``, ``A [rank, n]`` (float64) with ``B @ A`` the truncated weight; the singular values
        are split evenly (``sqrt(s)`` to each side) so neither factor is badly scaled."""
        if not 1 <= rank <= self.full_rank:
            raise ValueError(f"rank must be in [1, {self.full_rank}] for this weight, got {rank}")
        root = self.singular_values[:rank].to(torch.float64).sqrt()
        b = self.u[:, :rank].to(torch.float64) * root  # [out, r]
        a = root[:, None] * self.vh[:rank].to(torch.float64)  # [r, n]
        if self.whiten is not None:  # A S = a: undo the whitening on the input side
            a = torch.linalg.solve_triangular(self.whiten, a, upper=False, left=False)
        return b, a

    def kept(self, limit: int, dtype: torch.dtype) -> Factors:
        """The factors at ``limit`` (the largest rank that will ever be kept), cast to ``dtype``: all that is needed
        to cut at any rank up to it, with the SVD and the whitening dropped (see :class:`Factors`)."""
        if limit < 1:
            out, n = self.u.shape[0], self.vh.shape[1]
            empty = self.u.new_empty
            return Factors(empty(out, 0, dtype=dtype), empty(0, n, dtype=dtype), self.singular_values)
        b, a = self.factors(limit)
        return Factors(b.to(dtype), a.to(dtype), self.singular_values)


@dataclass(frozen=True)
class Factors:
    """A truncation's factors ``B [out, limit]`` and ``A [limit, n]`` at the largest rank that will be kept, and
    every singular value (for the energies).

    The factors at a lower rank ``r`` are the first ``r`` columns of ``B`` and rows of ``A``: the singular values
    are split per column, and undoing the whitening acts on each row of ``A`` alone. So cutting needs no SVD,
    and :meth:`factors` gives views, not copies.
    """

    b: Tensor
    a: Tensor
    singular_values: Tensor

    @property
    def full_rank(self) -> int:
        return int(self.singular_values.numel())

    @property
    def limit(self) -> int:
        return int(self.a.shape[0])

    def discarded_energy(self, rank: int) -> float:
        """As :meth:`Truncation.discarded_energy`."""
        return float(self.singular_values[rank:].square().sum())

    def factors(self, rank: int) -> tuple[Tensor, Tensor]:
        """Views ``B [out, rank]``, ``A [rank, n]`` of the kept factors."""
        if not 1 <= rank <= self.limit:
            raise ValueError(f"rank must be in [1, {self.limit}] for these factors, got {rank}")
        return self.b[:, :rank], self.a[:rank]


def truncation(weight: Tensor, whiten: Tensor | None = None, *, precision: torch.dtype = torch.float64) -> Truncation:
    """The SVD of ``weight [out, n]`` (times ``whiten [n, n]`` when given, in float64), computed in ``precision``."""
    matrix = weight.detach()
    if whiten is not None:
        whiten = whiten.to(device=matrix.device, dtype=torch.float64)
        matrix = matrix.to(torch.float64) @ whiten  # [out, n]
    u, s, vh = torch.linalg.svd(matrix.to(precision), full_matrices=False)
    return Truncation(u, s, vh, whiten)


def conv_factors(
    weight: Tensor, groups: int, truncations: Sequence[Truncation | Factors], rank: int
) -> tuple[Tensor, Tensor]:
    """A grouped conv weight ``[out, in/g, *k]`` as a ``k``-conv to ``g * rank`` channels (groups ``g``) and a
    pointwise conv back to ``out`` (groups ``g``): weights ``[g * rank, in/g, *k]`` and ``[out, rank, 1, ...]``.

    ``truncations[j]`` is that of group ``j``'s weight ``weight[j*out/g : (j+1)*out/g]`` as ``[out/g, in/g * K]``.
    With one group and :class:`Factors`, both weights are views of the factors.
    """
    out, per_group, *kernel = weight.shape
    assert len(truncations) == groups, "one truncation per group"
    firsts, seconds = [], []
    for truncated in truncations:
        b, a = truncated.factors(rank)  # b [out/g, r], a [r, in/g * K]
        firsts.append(a.reshape(rank, per_group, *kernel))  # [r, in/g, *k]
        seconds.append(b)
    first = firsts[0] if groups == 1 else torch.cat(firsts)  # [g * r, in/g, *k]
    second = (seconds[0] if groups == 1 else torch.cat(seconds)).reshape(out, rank, *([1] * len(kernel)))  # [out, r, 1, ...]
    return first, second


def group_matrices(weight: Tensor, groups: int) -> list[Tensor]:
    """Each group's weight of a conv ``[out, in/g, *k]`` (or a Linear, ``groups=1``) as a matrix ``[out/g, in/g * K]``."""
    out = weight.shape[0]
    return list(weight.reshape(groups, out // groups, -1).unbind(0))  # g x [out/g, in/g * K]

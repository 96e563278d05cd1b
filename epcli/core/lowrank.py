"""Truncated-SVD factors of a collapsed weight, plain or data-aware (whitened), computed in float64.

A weight ``W [out, n]`` (a Linear, or one group of a conv as ``[out/g, in/g * K]``) is factored as
``B [out, r] @ A [r, n]``. Plain truncation keeps the top singular values of ``W``: it minimises
``||W - BA||_F``. Whitened truncation (SVD-LLM's truncation-aware data whitening) minimises the *output* error
on calibration inputs ``X [m, n]`` instead: with ``X^T X + ridge * I = S S^T`` (Cholesky, ``S`` lower),
``||(W - BA) X^T||_F^2 + ridge ||W - BA||_F^2 = ||(W - BA) S||_F^2``, so truncating the SVD of ``W S`` to ``r``
values makes that error exactly the energy of the discarded singular values of ``W S``.

The truncation is taken from the top eigenpairs of the float64 Gram matrix of ``W S``'s smaller side, not from
an SVD (see :func:`eigenbasis`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

__all__ = [
    "DEFAULT_RIDGE", "Cut", "Eigenbasis", "Factors", "conv_factors", "eigenbasis", "group_matrices", "ridged",
]

DEFAULT_RIDGE = 1e-3
"""Ridge added to the calibration Gram matrix, relative to its mean diagonal.

Directions the calibration inputs never take (e.g. digit pixels that are always 0) make ``X^T X`` singular; the
ridge charges weight error there too, so a factor never grows without bound in a direction held-out data may take.
"""


def ridged(gram: Tensor, ridge: float = DEFAULT_RIDGE) -> Tensor:
    """``gram + ridge * mean(diag(gram)) * I`` in float64: ``S S^T``."""
    shifted = gram.to(torch.float64, copy=True)
    scale = float(shifted.diagonal().mean()) if shifted.numel() else 0.0
    shifted.diagonal().add_(ridge * scale if scale > 0 else 1.0)  # an all-zero Gram (no signal): plain truncation
    return shifted


@dataclass(frozen=True)
class Factors:
    """The factors ``B [out, limit]``, ``A [limit, n]`` of a weight's best approximation at the largest rank that
    will be kept, the (whitened) energies ``s_i^2`` of those ``limit`` singular values and the weight's whole
    (whitened) energy.

    The factors at a lower rank ``r`` are the first ``r`` columns of ``B`` and rows of ``A``, so cutting needs no
    new decomposition and :meth:`factors` gives views, not copies.
    """

    b: Tensor
    a: Tensor
    energies: Tensor  # float64, descending
    total: float

    @property
    def full_rank(self) -> int:
        return min(self.shape)

    @property
    def limit(self) -> int:
        return int(self.a.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """The weight's ``(out, n)``."""
        return int(self.b.shape[0]), int(self.a.shape[1])

    def discarded_energy(self, rank: int) -> float:
        """``sum_{i >= rank} s_i^2``: the squared (whitened) error of keeping ``rank`` values."""
        return max(self.total - float(self.energies[:rank].sum()), 0.0)

    def factors(self, rank: int) -> tuple[Tensor, Tensor]:
        """Views ``B [out, rank]``, ``A [rank, n]`` of the kept factors."""
        if not 1 <= rank <= self.limit:
            raise ValueError(f"rank must be in [1, {self.limit}] for these factors, got {rank}")
        return self.b[:, :rank], self.a[:rank]


@dataclass(frozen=True)
class Eigenbasis:
    """The top ``limit`` eigenpairs of a weight's (whitened) float64 Gram matrix on its smaller side: all that
    :meth:`factors` needs besides the weight itself.

    ``energies`` (ascending, as LAPACK gives them) are the squared singular values ``s_i^2`` of ``W S``,
    ``vectors`` their eigenvectors (left singular vectors when :attr:`left`, else right ones), ``total`` the whole
    energy, ``chol`` the whitening ``S`` (on the right side only; on the left it enters the Gram matrix alone).
    """

    energies: Tensor
    vectors: Tensor
    total: float
    shape: tuple[int, int]  # the weight's (out, n)
    chol: Tensor | None

    @property
    def left(self) -> bool:
        """The Gram matrix is ``W W^T`` (the weight is no taller than wide), not ``W^T W``."""
        return self.shape[0] <= self.shape[1]

    def factors(self, weight: Tensor, dtype: torch.dtype) -> Factors:
        """The factors of ``weight`` (the one the basis is of) at the rank limit, in ``dtype``, each block flipped
        to descending order as it is made."""
        (out, n), limit, vectors = self.shape, self.energies.numel(), self.vectors
        if limit < 1:
            none = torch.zeros(0, dtype=torch.float64)
            return Factors(weight.new_empty(out, 0, dtype=dtype), weight.new_empty(0, n, dtype=dtype), none, self.total)
        singular = self.energies.clamp(min=0).sqrt()
        root = torch.where(singular > 0, singular.sqrt(), torch.ones_like(singular))  # s split evenly; 0s left whole
        if self.left:  # W ~ U (U^T W)
            b = _blocks(lambda part: (part * root).flip(1), vectors, dim=0, out=(out, limit), dtype=dtype)
            a = _blocks(lambda part: ((vectors.T @ part) / root[:, None]).flip(0), weight, dim=1, out=(limit, n), dtype=dtype)
        else:  # W S ~ (W S V) V^T, so W ~ (W S V)(V^T S^-1)
            right = vectors if self.chol is None else self.chol @ vectors  # S V [n, limit]
            b = _blocks(lambda part: ((part @ right) / root).flip(1), weight, dim=0, out=(out, limit), dtype=dtype)
            del right
            a64 = root[:, None] * vectors.T
            if self.chol is not None:
                a64 = torch.linalg.solve_triangular(self.chol, a64, upper=False, left=False)  # A S = root V^T
            a = a64.to(dtype).flip(0)
        return Factors(b, a, self.energies.clamp(min=0).flip(0), self.total)


def eigenbasis(weight: Tensor, covariance: Tensor | None = None, *, limit: int) -> Eigenbasis:
    """The :class:`Eigenbasis` of ``weight [out, n]`` (plain, or whitened by ``covariance = S S^T``, the
    :func:`ridged` Gram matrix of the layer's inputs) for factors up to rank ``limit``.

    No SVD of the weight is taken: a float32 one holds about six copies of the weight; this holds the float64
    Gram matrix and ``limit`` eigenvectors (about three), and float64 copies of the weight only a block at a
    time. Only the pairs that can be kept are computed (LAPACK's MRRR, through SciPy). Float64 rounding leaves
    the singular values exact to about 1e-8 of the largest: finer than a float32 SVD of a float32 weight. The
    weight and the covariance are let go once the Gram matrix is formed: a caller passing its only references
    frees them for the eigensolve (and passes the weight again to :meth:`Eigenbasis.factors`).
    """
    out, n = weight.shape
    chol = None
    if out <= n:  # M = W S, M M^T = W (S S^T) W^T (as Eigenbasis.left says)
        kernel = _outer(weight, covariance)
    else:  # M^T M = S^T (W^T W) S
        kernel = _outer(weight.T, None)
        if covariance is not None:
            chol = torch.linalg.cholesky(covariance)
            kernel = chol.T @ kernel @ chol
    del weight, covariance
    total = float(kernel.trace())  # a NaN or inf anywhere in the weight reaches the diagonal
    if not math.isfinite(total):
        raise ValueError("the weight (or its whitening) holds values that are not finite")  # LAPACK would not stop
    if limit < 1:
        energies, vectors = torch.zeros(0, dtype=torch.float64), kernel.new_zeros(kernel.shape[0], 0)
    else:
        energies, vectors = _top_eigenpairs(kernel, limit)  # the kernel is overwritten
    return Eigenbasis(energies, vectors, total, (out, n), chol)


_BLOCK = 256
"""Rows or columns of a weight cast to float64 at a time."""


def _outer(matrix: Tensor, middle: Tensor | None) -> Tensor:
    """``X X^T``, or ``X middle X^T`` (``middle`` float64), of ``X [k, m]`` in float64, ``X`` cast a block at a
    time."""
    k, m = matrix.shape
    if middle is None:
        kernel = torch.zeros(k, k, dtype=torch.float64, device=matrix.device)
        for start in range(0, m, _BLOCK):
            part = matrix[:, start:start + _BLOCK].to(torch.float64)
            kernel.addmm_(part, part.T)
        return kernel
    inner = _blocks(lambda part: middle @ part.T, matrix, dim=0, out=(m, k), dtype=torch.float64, out_dim=1)
    return _blocks(lambda part: part @ inner, matrix, dim=0, out=(k, k), dtype=torch.float64)


def _blocks(
    compute: Callable[[Tensor], Tensor],
    matrix: Tensor,
    *,
    dim: int,
    out: tuple[int, int],
    dtype: torch.dtype,
    out_dim: int | None = None,
) -> Tensor:
    """A new ``out``-shaped tensor in ``dtype`` filled block by block along ``out_dim`` (default ``dim``) with
    ``compute`` of the float64 blocks of ``matrix`` along ``dim``."""
    result = torch.empty(out, dtype=dtype, device=matrix.device)
    target = dim if out_dim is None else out_dim
    for start in range(0, matrix.shape[dim], _BLOCK):
        part = matrix.narrow(dim, start, min(_BLOCK, matrix.shape[dim] - start)).to(torch.float64)
        result.narrow(target, start, part.shape[dim]).copy_(compute(part))
    return result


def _top_eigenpairs(kernel: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """The ``count`` largest eigenvalues (ascending) of the symmetric float64 ``kernel`` and their eigenvectors;
    ``kernel`` is LAPACK's work array (it is its own transpose, so it is passed in Fortran order)."""
    from scipy.linalg import eigh  # only compress needs it: not imported with the package

    k = kernel.shape[0]
    values, vectors = eigh(
        kernel.cpu().numpy().T, subset_by_index=[k - count, k - 1], driver="evr", overwrite_a=True,
        check_finite=False,
    )
    return torch.from_numpy(values).to(kernel.device), torch.from_numpy(vectors).to(kernel.device)


class Cut(Protocol):
    """What gives a weight's factors at a rank: :class:`Factors`, or factors kept elsewhere."""

    def factors(self, rank: int) -> tuple[Tensor, Tensor]: ...


def conv_factors(weight: Tensor, groups: int, truncations: Sequence[Cut], rank: int) -> tuple[Tensor, Tensor]:
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

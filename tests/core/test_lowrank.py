"""Truncated-SVD factors against independent references: numpy's SVD, the output error they stand for, and
the convolutions they replace."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from epcli.core.lowrank import DEFAULT_RIDGE, Factors, conv_factors, eigenbasis, group_matrices, ridged


def top_factors(weight, gram=None, *, limit, dtype, ridge=DEFAULT_RIDGE):
    return eigenbasis(weight, None if gram is None else ridged(gram, ridge), limit=limit).factors(weight, dtype)


def _svd_truncation(matrix: np.ndarray, rank: int) -> np.ndarray:
    """The reference: numpy's SVD, cut at ``rank``."""
    u, s, vh = np.linalg.svd(matrix, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


@pytest.mark.parametrize("shape", [(12, 20), (20, 12), (16, 16)], ids=["wide", "tall", "square"])
def test_plain_factors_are_the_truncated_svd(shape):
    """At every rank up to the limit: numpy's SVD truncation, the energies its squared singular values, and the
    factors at a lower rank the leading columns and rows of those at the limit, balanced (equal norms)."""
    weight = torch.randn(*shape, dtype=torch.float64)
    s = np.linalg.svd(weight.numpy(), compute_uv=False)
    limit = min(shape) - 2
    kept = top_factors(weight.float(), limit=limit, dtype=torch.float64)
    assert (kept.limit, kept.full_rank, kept.shape) == (limit, min(shape), shape)
    np.testing.assert_allclose(kept.energies.numpy(), s[:limit] ** 2, rtol=1e-6)  # float32 weight, float64 math
    assert kept.total == pytest.approx(float((s**2).sum()), rel=1e-6)
    for rank in (1, 5, limit):
        b, a = kept.factors(rank)
        assert b.shape == (shape[0], rank) and a.shape == (rank, shape[1]) and b.dtype == torch.float64
        reference = _svd_truncation(weight.float().double().numpy(), rank)
        np.testing.assert_allclose((b @ a).numpy(), reference, atol=1e-9)
        assert kept.discarded_energy(rank) == pytest.approx(float((s[rank:] ** 2).sum()), rel=1e-6)
        np.testing.assert_allclose(b.norm(dim=0).numpy(), a.norm(dim=1).numpy(), rtol=1e-9)


@pytest.mark.parametrize("shape", [(10, 16), (16, 10)], ids=["wide", "tall"])
def test_whitened_truncation_error_is_the_discarded_energy(shape):
    """||(W - BA) X^T||^2 + ridge ||W - BA||^2 equals the discarded energy, and the truncation is numpy's SVD of
    W S cut and unwhitened: on either side of the weight."""
    out, n = shape
    inputs = torch.randn(200, n, dtype=torch.float64) @ torch.randn(n, n, dtype=torch.float64)  # correlated
    weight = torch.randn(out, n, dtype=torch.float64)
    gram = inputs.T @ inputs
    ridge = 1e-3 * float(gram.diagonal().mean())
    chol = np.linalg.cholesky(gram.numpy() + ridge * np.eye(n))
    kept = top_factors(weight, gram, limit=min(shape) - 1, dtype=torch.float64)
    for rank in (2, 6, kept.limit):
        b, a = kept.factors(rank)
        error = weight - b @ a
        measured = float((error @ inputs.T).square().sum()) + ridge * float(error.square().sum())
        assert measured == pytest.approx(kept.discarded_energy(rank), rel=1e-8)
        reference = _svd_truncation(weight.numpy() @ chol, rank) @ np.linalg.inv(chol)
        np.testing.assert_allclose((b @ a).numpy(), reference, atol=1e-8 * float(weight.abs().max()))


def test_whitening_beats_plain_truncation_on_the_data():
    """Same rank, less output error on the calibration inputs than the best weight-space truncation."""
    inputs = torch.randn(300, 24, dtype=torch.float64) * torch.logspace(0, -3, 24, dtype=torch.float64)
    weight = torch.randn(16, 24, dtype=torch.float64)
    plain = top_factors(weight, limit=4, dtype=torch.float64).factors(4)
    whitened = top_factors(weight, inputs.T @ inputs, limit=4, dtype=torch.float64, ridge=1e-9).factors(4)
    errors = [float(((weight - b @ a) @ inputs.T).norm()) for b, a in (plain, whitened)]
    assert errors[1] < 0.75 * errors[0]


def test_a_rank_deficient_or_zero_weight_gives_finite_factors():
    """Zero singular values (a rank-2 weight cut at 4; an all-zero weight) leave no NaN or inf in the factors."""
    low = torch.randn(8, 2, dtype=torch.float64) @ torch.randn(2, 9, dtype=torch.float64)
    for weight in (low, torch.zeros(8, 9, dtype=torch.float64)):
        kept = top_factors(weight, limit=4, dtype=torch.float32)
        b, a = kept.factors(4)
        assert torch.isfinite(b).all() and torch.isfinite(a).all()
        torch.testing.assert_close((b @ a).double(), weight, atol=1e-5 * max(1.0, float(weight.abs().max())), rtol=0)
        assert kept.discarded_energy(2) == pytest.approx(0.0, abs=1e-12 * max(kept.total, 1.0))


def test_a_limit_of_zero_keeps_no_factors():
    kept = top_factors(torch.randn(3, 5), limit=0, dtype=torch.float32)
    assert kept.b.shape == (3, 0) and kept.a.shape == (0, 5) and kept.full_rank == 3 and kept.total > 0


def test_a_rank_out_of_range_is_refused():
    with pytest.raises(ValueError, match=r"rank must be in \[1, 2\]"):
        top_factors(torch.randn(3, 5), limit=2, dtype=torch.float32).factors(3)


@pytest.mark.parametrize(
    ("conv", "groups", "in_ch", "out_ch", "kernel", "spatial"),
    [
        (F.conv1d, 1, 3, 8, (5,), (17,)),
        (F.conv2d, 1, 4, 6, (3, 3), (9, 7)),
        (F.conv2d, 2, 4, 6, (3, 2), (8, 8)),
        (F.conv3d, 3, 6, 9, (2, 3, 1), (5, 6, 4)),
    ],
)
def test_conv_factors_compose_to_the_truncated_conv(conv, groups, in_ch, out_ch, kernel, spatial):
    """The k-conv to g*r channels then the grouped pointwise conv equals the conv with each group's truncated
    weight; at full rank, the original conv."""
    weight = torch.randn(out_ch, in_ch // groups, *kernel, dtype=torch.float64)
    x = torch.randn(2, in_ch, *spatial, dtype=torch.float64)
    cuts: list[Factors] = [
        top_factors(matrix, limit=min(matrix.shape), dtype=torch.float64) for matrix in group_matrices(weight, groups)
    ]
    for rank in (1, cuts[0].limit):
        first, second = conv_factors(weight, groups, cuts, rank)
        assert first.shape == (groups * rank, in_ch // groups, *kernel)
        assert second.shape == (out_ch, rank, *([1] * len(kernel)))
        truncated = torch.cat([b @ a for b, a in (cut.factors(rank) for cut in cuts)]).reshape(weight.shape)
        composed = conv(conv(x, first, stride=1, padding=1, groups=groups), second, groups=groups)
        torch.testing.assert_close(composed, conv(x, truncated, padding=1, groups=groups), atol=1e-10, rtol=0)
    torch.testing.assert_close(composed, conv(x, weight, padding=1, groups=groups), atol=1e-10, rtol=0)


def test_a_weight_that_is_not_finite_is_refused_before_lapack_sees_it():
    weight = torch.randn(4, 6)
    weight[2, 3] = torch.nan
    with pytest.raises(ValueError, match="not finite"):
        eigenbasis(weight, limit=2)

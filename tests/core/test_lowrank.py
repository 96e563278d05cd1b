"""Truncated-SVD factors against independent references: numpy's SVD, the output error they stand for, and
the convolutions they replace."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from epcli.core.lowrank import conv_factors, group_matrices, truncation, whitening


def test_plain_factors_are_the_truncated_svd():
    weight = torch.randn(12, 20, dtype=torch.float64)
    u, s, vh = np.linalg.svd(weight.numpy(), full_matrices=False)
    for rank in (1, 5, 12):
        b, a = truncation(weight.float()).factors(rank)
        assert b.shape == (12, rank) and a.shape == (rank, 20) and b.dtype == torch.float64
        reference = (u[:, :rank] * s[:rank]) @ vh[:rank]
        np.testing.assert_allclose((b @ a).numpy(), reference, atol=1e-5)  # float32 input, float64 math
    assert truncation(weight).discarded_energy(5) == pytest.approx(float((s[5:] ** 2).sum()))


def test_whitened_truncation_error_is_the_discarded_energy():
    """||(W - BA) X^T||^2 + ridge ||W - BA||^2 equals the energy of the discarded singular values of W S."""
    inputs = torch.randn(200, 16, dtype=torch.float64) @ torch.randn(16, 16, dtype=torch.float64)  # correlated
    weight = torch.randn(10, 16, dtype=torch.float64)
    gram = inputs.T @ inputs
    ridge = 1e-3 * float(gram.diagonal().mean())
    cut = truncation(weight, whitening(gram))
    for rank in (2, 6, 9):
        b, a = cut.factors(rank)
        error = weight - b @ a
        measured = float((error @ inputs.T).square().sum()) + ridge * float(error.square().sum())
        assert measured == pytest.approx(cut.discarded_energy(rank), rel=1e-9)
    b, a = cut.factors(cut.full_rank)
    torch.testing.assert_close(b @ a, weight, atol=1e-10, rtol=0)


def test_whitening_beats_plain_truncation_on_the_data():
    """Same rank, less output error on the calibration inputs than the best weight-space truncation."""
    inputs = torch.randn(300, 24, dtype=torch.float64) * torch.logspace(0, -3, 24, dtype=torch.float64)
    weight = torch.randn(16, 24, dtype=torch.float64)
    plain = truncation(weight).factors(4)
    whitened = truncation(weight, whitening(inputs.T @ inputs, ridge=1e-9)).factors(4)
    errors = [float(((weight - b @ a) @ inputs.T).norm()) for b, a in (plain, whitened)]
    assert errors[1] < 0.75 * errors[0]


def test_a_rank_out_of_range_is_refused():
    with pytest.raises(ValueError, match=r"rank must be in \[1, 3\]"):
        truncation(torch.randn(3, 5)).factors(4)


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
    cuts = [truncation(matrix) for matrix in group_matrices(weight, groups)]
    for rank in (1, cuts[0].full_rank):
        first, second = conv_factors(weight, groups, cuts, rank)
        assert first.shape == (groups * rank, in_ch // groups, *kernel)
        assert second.shape == (out_ch, rank, *([1] * len(kernel)))
        truncated = torch.cat([b @ a for b, a in (cut.factors(rank) for cut in cuts)]).reshape(weight.shape)
        composed = conv(conv(x, first, stride=1, padding=1, groups=groups), second, groups=groups)
        torch.testing.assert_close(composed, conv(x, truncated, padding=1, groups=groups), atol=1e-10, rtol=0)
    torch.testing.assert_close(composed, conv(x, weight, padding=1, groups=groups), atol=1e-10, rtol=0)

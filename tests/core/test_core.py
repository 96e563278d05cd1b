"""The pure collapse functions against direct computations written out here."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from epcli.core import LINEAR, BatchNormFold, ChainLayer, collapse_chain, skip_edges

AssertScaledClose = Callable[[Tensor, Tensor], None]
RandomiseBatchNorm = Callable[[nn.Module], None]

f64 = torch.float64


# ---- skip graph --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("depth", "intervals", "expected"),
    [
        (4, [1], [(0, 1), (1, 2), (2, 3), (3, 4)]),
        (4, [2], [(0, 2), (2, 4)]),
        (5, [2], [(0, 2), (2, 4)]),  # the last layer gets no skip: 6 > depth
        (4, [-1], [(0, 4)]),
        (3, [4], []),  # interval larger than the depth
        (4, [2, -1], [(0, 2), (2, 4), (0, 4)]),
        (4, [4, -1], [(0, 4)]),  # -1 means 4: a repeat
        (2, [2, 2, 1], [(0, 2), (0, 1), (1, 2)]),
        (1, [-1, 1], [(0, 1)]),
        (6, [1, 2, 3], [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (5, 6), (0, 2), (2, 4), (4, 6), (0, 3), (3, 6)]),
        (8, [3, -1], [(0, 3), (3, 6), (0, 8)]),
    ],
)
def test_skip_edges_follow_the_rule_interval_by_interval(
    depth: int, intervals: list[int], expected: list[tuple[int, int]]
) -> None:
    assert list(skip_edges(depth, intervals)) == expected


# ---- linear chains -----------------------------------------------------------------------
def _random_layer(out_dim: int, in_dim: int, bias: bool, norm: bool) -> ChainLayer:
    fold = BatchNormFold(torch.rand(out_dim, dtype=f64) + 0.5, torch.randn(out_dim, dtype=f64)) if norm else None
    return ChainLayer(
        torch.randn(out_dim, in_dim, dtype=f64) / in_dim**0.5, torch.randn(out_dim, dtype=f64) if bias else None, fold
    )


def _naive_forward(x: Tensor, layers: list[ChainLayer], skips: dict[tuple[int, int], ChainLayer | None]) -> Tensor:
    """Node by node, exactly as the graph is defined: layer, then norm, then every skip landing here."""

    def apply(layer: ChainLayer, v: Tensor) -> Tensor:
        v = v @ layer.weight.T
        return v if layer.bias is None else v + layer.bias

    nodes = [x]
    for j, layer in enumerate(layers):
        v = apply(layer, nodes[j])
        if layer.norm is not None:
            v = v * layer.norm.scale + layer.norm.shift
        for (source, destination), projection in skips.items():
            if destination == j + 1:
                v = v + (nodes[source] if projection is None else apply(projection, nodes[source]))
        nodes.append(v)
    return nodes[-1]


CHAINS: dict[str, tuple[list[int], bool, bool, dict[tuple[int, int], bool]]] = {
    # name: (node sizes, layer biases, norms, skip -> learnable)
    "plain": ([3, 5, 5, 2], True, False, {}),
    "norms-no-bias": ([4, 4, 4], False, True, {}),
    "identity-skips": ([4, 4, 4, 4, 4], True, True, {(0, 2): False, (2, 4): False, (0, 4): False}),
    "projected-skips": ([3, 6, 6, 2], True, False, {(0, 1): True, (1, 2): True, (0, 3): True, (1, 3): True}),
    "mixed": ([4, 4, 4, 4], False, False, {(0, 1): False, (0, 3): True, (1, 3): False}),
}


@pytest.fixture(params=["plain", "lean", "lean-row-by-row"])
def lean(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """The composition :func:`collapse_chain` uses: plain, or lean (blocks of rows cast as they are used, norms
    and skips applied in place), with its default blocks (one block for these sizes) or one row per block."""
    if request.param == "lean-row-by-row":
        monkeypatch.setattr("epcli.core.affine._BLOCK_BYTES", 1)
    return request.param != "plain"


@pytest.mark.parametrize("dtype", [f64, torch.float32])
@pytest.mark.parametrize("name", list(CHAINS))
def test_collapse_chain_linear_matches_naive_forward(
    name: str, dtype: torch.dtype, lean: bool, assert_scaled_close: AssertScaledClose
) -> None:
    """Float32 layers are promoted before any arithmetic (the reference runs on the same values in float64),
    and the layers handed in are left as they were, whatever the composition overwrites."""
    sizes, bias, norm, learnable = CHAINS[name]

    def rounded(layer: ChainLayer) -> ChainLayer:
        def cast(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(dtype)

        return ChainLayer(cast(layer.weight), cast(layer.bias), layer.norm)  # type: ignore[arg-type]

    layers = [rounded(_random_layer(sizes[j + 1], sizes[j], bias, norm)) for j in range(len(sizes) - 1)]
    skips = {
        (s, d): rounded(_random_layer(sizes[d], sizes[s], bias, False)) if learn else None
        for (s, d), learn in learnable.items()
    }
    given = [t.clone() for layer in [*layers, *skips.values()] if layer is not None for t in (layer.weight, layer.bias)
             if t is not None]
    affine = collapse_chain(LINEAR, sizes[0], list(layers), skips, lean=lean)
    assert affine.weight.dtype == f64
    exact = [ChainLayer(layer.weight.double(), None if layer.bias is None else layer.bias.double(), layer.norm)
             for layer in layers]
    exact_skips = {edge: None if p is None else ChainLayer(p.weight.double(), None if p.bias is None else p.bias.double())
                   for edge, p in skips.items()}
    x = torch.randn(7, sizes[0], dtype=f64)
    collapsed = x @ affine.weight.T + (0 if affine.bias is None else affine.bias)
    assert_scaled_close(collapsed, _naive_forward(x, exact, exact_skips))
    assert (affine.bias is None) == (not bias and not norm)
    after = [t for layer in [*layers, *skips.values()] if layer is not None for t in (layer.weight, layer.bias)
             if t is not None]
    assert all(torch.equal(a, b) for a, b in zip(given, after, strict=True))


def _storages(*tensors: Tensor | None) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors if t is not None}


@pytest.mark.parametrize(
    "chain",
    [
        # depth 1: the collapse is the layer itself
        [ChainLayer(torch.randn(3, 4, dtype=f64), torch.randn(3, dtype=f64))],
        # the second layer's bias passes through the composition unchanged (the first has none)
        [ChainLayer(torch.randn(4, 4, dtype=f64)), ChainLayer(torch.randn(2, 4, dtype=f64), torch.randn(2, dtype=f64))],
    ],
    ids=["depth-1", "bias-passes-through"],
)
def test_collapse_chain_never_aliases_float64_inputs(chain: list[ChainLayer], lean: bool) -> None:
    """Float64 layers are used without copies; whatever would reach the result as it is must be copied."""
    before = [(layer.weight.clone(), None if layer.bias is None else layer.bias.clone()) for layer in chain]
    affine = collapse_chain(LINEAR, 4, chain, {}, lean=lean)
    inputs = _storages(*(t for layer in chain for t in (layer.weight, layer.bias)))
    assert not inputs & _storages(affine.weight, affine.bias)
    if len(chain) == 1:
        torch.testing.assert_close(affine.weight, chain[0].weight, rtol=0, atol=0)
    torch.testing.assert_close(affine.bias, chain[-1].bias, rtol=0, atol=0)
    affine.weight.add_(1.0)  # writing to the result leaves the layers alone
    affine.bias.add_(1.0)  # type: ignore[union-attr]
    for layer, (weight, bias) in zip(chain, before, strict=True):
        assert torch.equal(layer.weight, weight) and (bias is None or torch.equal(layer.bias, bias))  # type: ignore[arg-type]


# ---- batch-norm folding --------------------------------------------------------------------
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
def test_batch_norm_fold_matches_eval_batch_norm(
    affine: bool, randomise_batch_norm: RandomiseBatchNorm, assert_scaled_close: AssertScaledClose
) -> None:
    norm = nn.BatchNorm1d(5, eps=1e-3, affine=affine).double()
    if affine:
        randomise_batch_norm(norm)
    else:
        with torch.no_grad():
            norm.running_mean.normal_()
            norm.running_var.uniform_(0.5, 2.0)
    fold = BatchNormFold.from_statistics(norm.running_mean, norm.running_var, norm.eps, norm.weight, norm.bias)
    x = torch.randn(6, 5, dtype=f64)
    assert_scaled_close(x * fold.scale + fold.shift, norm.eval()(x))

"""Collapsed eval forward == expanded forward over the grid of layer structures.

Each grid point is its own item. Whether a structure is valid is decided here from the
original code's rule (node sizes in, hidden..., out; identity skips need equal sizes), so both the
accepted and the rejected sets are checked against the layers' own validation.

By default a 3-way covering subset runs (every combination of three axis values that any
valid, resp. rejected, grid point has; see ``covering_subset`` in ``tests/conftest.py``):
about 8 % of the 11,232 points. ``pytest --exhaustive tests/layers/test_grid.py`` runs them all.
"""

from __future__ import annotations

import itertools
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from epcli import EPConv2d, EPLinear
from epcli.layers import EPLayer

Intervals = int | list[int]
Residual = bool | str
Kernels = int | list[int]
AssertScaledClose = Callable[[Tensor, Tensor], None]
RandomiseBatchNorm = Callable[[nn.Module], None]
Covering = Callable[[Sequence[Sequence[object]], int], list[int]]

BATCH_NORMS = [False, True]
RESIDUALS: list[Residual] = [False, "none", "learn"]
INTERVALS: list[Intervals] = [1, 2, 4, -1, [1, 2], [2, -1], [1, 2, 3], [1, 2, 4, -1]]
BIASES = [False, True]
DEPTHS = [1, 2, 4, 8, 16]
WIDTHS = [0.5, 1, 4]
STRIDES = [1, 2]
INT_KERNELS = [1, 5]
LIST_KERNELS = [[3], [1, 3], [3, 1], [5, 3, 1], [1, 3, 5], [3] * 8, [3] + [1] * 7]

LINEAR_BATCH = 5
CONV_BATCH = 2


def _text(value: object) -> str:
    return "+".join(map(str, value)) if isinstance(value, list) else str(value)


def _hash(text: str) -> int:
    """A stable per-case number, to pick deterministic subsets of the grid."""
    return zlib.crc32(text.encode())


def expected_skips(depth: int, intervals: Intervals) -> set[tuple[int, int]]:
    """The original code's rule: for each interval n (-1 = depth) a skip m - n -> m for m = n, 2n, ... <= depth."""
    steps = {depth if n == -1 else n for n in (intervals if isinstance(intervals, list) else [intervals])}
    return {(m - n, m) for n in steps for m in range(n, depth + 1, n)}


@dataclass(frozen=True)
class Structure:
    """The grid axes shared by EPLinear and EPConv2d."""

    batch_norm: bool
    residual: Residual
    intervals: Intervals
    bias: bool
    width: float

    @property
    def base_id(self) -> str:
        return (
            f"bn{int(self.batch_norm)}-res_{str(self.residual).lower()}-iv{_text(self.intervals)}"
            f"-bias{int(self.bias)}-w{self.width}"
        )

    def sizes(self, key: str, same: int, mismatched: list[tuple[int, int]]) -> tuple[int, int]:
        """(in, out): equal for identity skips; learnable skips sometimes project between different sizes."""
        if self.residual != "learn":
            return same, same
        return [(same, same), *mismatched][_hash(key) % (1 + len(mismatched))]

    def kwargs(self) -> dict[str, object]:
        return {
            "width": self.width,
            "bias": self.bias,
            "batch_norm": self.batch_norm,
            "residual": bool(self.residual),
            "residual_intervals": self.intervals,
            "residual_mode": self.residual if isinstance(self.residual, str) else "none",
        }

    @property
    def bias_is_none(self) -> bool:
        """Only layer biases, batch-norm shifts and projection biases (which follow ``bias``) contribute one."""
        return not self.bias and not self.batch_norm


STRUCTURES = [Structure(*axes) for axes in itertools.product(BATCH_NORMS, RESIDUALS, INTERVALS, BIASES, WIDTHS)]


@dataclass(frozen=True)
class Case:
    """One grid point: a structure at a depth, with (in, out) sizes chosen by the subclass."""

    structure: Structure
    depth: int

    @property
    def id(self) -> str:
        raise NotImplementedError

    @property
    def dims(self) -> tuple[int, int]:
        raise NotImplementedError

    @property
    def axes(self) -> tuple[object, ...]:
        """The values a covering subset must combine: the grid axes and the per-case choices derived from the id."""
        s = self.structure
        return (s.batch_norm, str(s.residual), _text(s.intervals), s.bias, s.width, self.depth, self.dims)

    @property
    def nodes(self) -> list[int]:
        """Sizes of nodes 0 .. depth: in, hidden = int(out * width) ..., out."""
        in_dim, out_dim = self.dims
        return [in_dim, *[int(out_dim * self.structure.width)] * (self.depth - 1), out_dim]

    @property
    def skips(self) -> set[tuple[int, int]]:
        return expected_skips(self.depth, self.structure.intervals) if self.structure.residual else set()

    @property
    def is_valid(self) -> bool:
        """Identity skips need equal sizes at both ends; learnable ones project."""
        nodes = self.nodes
        return self.structure.residual != "none" or all(nodes[s] == nodes[d] for s, d in self.skips)


@dataclass(frozen=True)
class LinearCase(Case):
    @property
    def id(self) -> str:
        return f"{self.structure.base_id}-d{self.depth}"

    @property
    def dims(self) -> tuple[int, int]:
        return self.structure.sizes(self.id, 4, [(3, 5), (6, 3)])

    def build(self) -> EPLinear:
        return EPLinear(*self.dims, depth=self.depth, **self.structure.kwargs())


@dataclass(frozen=True)
class ConvCase(Case):
    stride: int
    kernels: Kernels

    @property
    def id(self) -> str:
        depth = f"-d{self.depth}" if isinstance(self.kernels, int) else ""
        return f"{self.structure.base_id}-s{self.stride}-k{_text(self.kernels)}{depth}"

    @property
    def dims(self) -> tuple[int, int]:
        return self.structure.sizes(self.id, 2, [(2, 3), (3, 2)])

    @property
    def axes(self) -> tuple[object, ...]:
        geometry_mode = min(_hash(self.id) % 6, 3)  # the branch ``geometry`` takes (3: the usual one)
        return (*super().axes, self.stride, _text(self.kernels), geometry_mode)

    @property
    def kernel_list(self) -> list[int]:
        """Per-layer kernel sizes, from the original code's rule (an int k means [k] + [1] * (depth - 1))."""
        return [self.kernels] + [1] * (self.depth - 1) if isinstance(self.kernels, int) else self.kernels

    @property
    def effective_kernel(self) -> int:
        return sum(self.kernel_list) - self.depth + 1

    @property
    def geometry(self) -> tuple[int, list[tuple[int, int]]]:
        """Padding and input sizes (one odd square, one even-by-odd): mostly "same" padding on maps
        a little larger than the kernel; a deterministic subset uses no padding, padding larger than
        the kernel, or maps smaller than the kernel (so long skips read zero padding)."""
        k = self.effective_kernel
        usual = [(k + 2, k + 2), (k + 3, k + 4)]
        mode = _hash(self.id) % 6
        if mode == 0:
            return 0, usual
        if mode == 1:
            return k + 1, usual
        if mode == 2 and k >= 3:
            return k // 2, [(k - 2, k - 2), (k - 1, k - 2)]
        return k // 2, usual

    def build(self) -> EPConv2d:
        depth = self.depth if isinstance(self.kernels, int) else None
        padding = self.geometry[0]
        return EPConv2d(*self.dims, self.kernels, padding, self.stride, depth=depth, **self.structure.kwargs())


LINEAR_CASES = [LinearCase(s, d) for s, d in itertools.product(STRUCTURES, DEPTHS)]
CONV_CASES = [
    ConvCase(s, d, stride, k)
    for s, stride in itertools.product(STRUCTURES, STRIDES)
    for k, d in [*itertools.product(INT_KERNELS, DEPTHS), *((k, len(k)) for k in LIST_KERNELS)]
]


def _grid(cases: Sequence[Case], valid: bool) -> pytest.MarkDecorator:
    """Parametrise ``case`` with the valid (or invalid) cases: a 3-way covering subset, or all with --exhaustive."""
    chosen = [c for c in cases if c.is_valid == valid]
    return pytest.mark.grid(chosen, axes=lambda c: c.axes, strength=3, ids=lambda c: c.id)


def check_structure(layer: EPLayer, case: Case) -> None:
    """The modules the original code builds: one block per layer with an optional norm, one projection per learnable skip."""
    nodes, batch_norm = case.nodes, case.structure.batch_norm
    assert len(layer.layer_dict) == case.depth
    for j, block in enumerate(layer.layer_dict.values()):
        assert tuple(block[0].weight.shape[:2]) == (nodes[j + 1], nodes[j])
        assert (block[1].num_features if len(block) == 2 else None) == (nodes[j + 1] if batch_norm else None)
    learnt = {f"{s}_{d}" for s, d in case.skips} if case.structure.residual == "learn" else set()
    assert set(layer.residual_dict.keys()) == learnt


def check_collapse(
    layer: EPLayer,
    inputs: list[Tensor],
    collapsed_forward: Callable[[Tensor, Tensor, Tensor | None], Tensor],
    weight_shape: tuple[int, ...],
    bias_is_none: bool,
    assert_scaled_close: AssertScaledClose,
) -> None:
    """In float64 and float32 the collapsed weight/bias reproduce the expanded forward, and eval runs exactly them.

    Both dtypes are checked against the float64 expanded forward: a float32 expanded chain
    loses more to rounding than the float64 collapse cast to float32 does, so it would be the
    worse reference. Parameters and inputs are float32-representable, so the reference is
    the same map for both.
    """
    layer.double()
    expected = [layer(x.double(), override=True) for x in inputs]
    for dtype in (torch.float64, torch.float32):
        layer.to(dtype)
        weight, bias = layer.weight, layer.bias
        assert tuple(weight.shape) == weight_shape
        assert weight.dtype == dtype
        assert (bias is None) == bias_is_none
        for x, reference in zip(inputs, expected, strict=True):
            collapsed = collapsed_forward(x.to(dtype), weight, bias)
            assert_scaled_close(collapsed, reference)
            assert torch.equal(layer(x.to(dtype)), collapsed)


def _prepare(layer: EPLayer, randomise_batch_norm: RandomiseBatchNorm) -> EPLayer:
    """Non-trivial batch-norms, float32-representable parameters, eval mode."""
    randomise_batch_norm(layer)
    return layer.float().eval()


@_grid(LINEAR_CASES, valid=True)
@torch.no_grad()
def test_linear_collapse_matches_expanded(
    case: LinearCase, randomise_batch_norm: RandomiseBatchNorm, assert_scaled_close: AssertScaledClose
) -> None:
    in_features, out_features = case.dims
    layer = case.build()
    check_structure(layer, case)
    _prepare(layer, randomise_batch_norm)
    x = torch.randn(LINEAR_BATCH, in_features)
    check_collapse(layer, [x], F.linear, (out_features, in_features), case.structure.bias_is_none, assert_scaled_close)


@_grid(CONV_CASES, valid=True)
@torch.no_grad()
def test_conv_collapse_matches_expanded(
    case: ConvCase, randomise_batch_norm: RandomiseBatchNorm, assert_scaled_close: AssertScaledClose
) -> None:
    in_channels, out_channels = case.dims
    padding, input_sizes = case.geometry
    layer = case.build()
    check_structure(layer, case)
    assert [block[0].kernel_size[0] for block in layer.layer_dict.values()] == case.kernel_list
    _prepare(layer, randomise_batch_norm)
    k = case.effective_kernel

    def conv(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.conv2d(x, weight, bias, case.stride, padding)

    inputs = [torch.randn(CONV_BATCH, in_channels, height, width) for height, width in input_sizes]
    weight_shape = (out_channels, in_channels, k, k)
    check_collapse(layer, inputs, conv, weight_shape, case.structure.bias_is_none, assert_scaled_close)


@_grid(LINEAR_CASES, valid=False)
def test_linear_rejects_mismatched_identity_skip(case: LinearCase) -> None:
    with pytest.raises(ValueError, match="identity skip"):
        case.build()


@_grid(CONV_CASES, valid=False)
def test_conv_rejects_mismatched_identity_skip(case: ConvCase) -> None:
    with pytest.raises(ValueError, match="identity skip"):
        case.build()


def test_covering_subset_holds_every_combination(covering: Covering) -> None:
    """The default run's selection: every triple of axis values of the valid linear grid, in far fewer points."""
    assert covering([(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (1, 0, 0), (1, 0, 1), (1, 1, 0), (1, 1, 1)], 2) == [
        0, 3, 5, 6,  # the 4-row pairwise array of three binary axes (all 8 rows hold the same pairs)
    ]
    rows = [c.axes for c in LINEAR_CASES if c.is_valid]
    chosen = [rows[i] for i in covering(rows, 3)]

    def triples(selection: list[tuple[object, ...]]) -> set[object]:
        return {(cols, tuple(r[c] for c in cols)) for r in selection for cols in itertools.combinations(range(7), 3)}

    assert triples(chosen) == triples(rows)
    assert len(chosen) < len(rows) / 4


@pytest.mark.parametrize("kernels", [[2], [2, 2], [4, 1], [1, 4], [2, 3, 4]], ids=_text)
@pytest.mark.parametrize("stride", STRIDES)
@pytest.mark.parametrize("padding", [0, 3])
@torch.no_grad()
def test_conv_even_kernels_without_skips(
    kernels: list[int],
    stride: int,
    padding: int,
    randomise_batch_norm: RandomiseBatchNorm,
    assert_scaled_close: AssertScaledClose,
) -> None:
    """Even kernels are allowed without skips; the collapsed kernel may then be even too."""
    k = sum(kernels) - len(kernels) + 1
    layer = _prepare(EPConv2d(2, 3, kernels, padding, stride, batch_norm=True), randomise_batch_norm)
    inputs = [torch.randn(CONV_BATCH, 2, height, width) for height, width in [(k + 3, k + 3), (k + 4, k + 5)]]
    check_collapse(
        layer, inputs, lambda x, w, b: F.conv2d(x, w, b, stride, padding), (3, 2, k, k), False, assert_scaled_close
    )

"""The collapse's forward propagation against a naive collapse that expands every path.

Run from the repository root (about two minutes)::

    python benchmarks/collapse_vs_naive.py

The layer is an EPLinear (width x width, biases, identity skips every 1 and 2 layers, so each
layer has a parallel identity edge and every other pair of layers a skip around it: the
number of paths from input to output grows as 5 ** (depth / 2)). Two collapses are timed,
interleaved round by round, medians, one torch thread, float64:

- ``layer.collapse()``: one matrix product per edge (forward propagation of affine maps);
- the naive reference written here: enumerate every path from node 0 to node ``depth``
  through layer edges and skip edges, multiply the maps along each path (depth-first, so
  paths share their prefix products), and sum. Biases ride along in homogeneous coordinates:
  a layer is ``[[W, b], [0, 1]]``, an identity skip ``[[I, 0], [0, 0]]``, so each node's
  constant coordinate stays 1 and the path sum is exactly the collapsed affine map.

The naive collapse gets a time budget per point; ">budget" marks a point it did not finish.
Two series: depth 4 .. 64 at width 64, and width 32 .. 512 at depth 8 (625 paths).

What to look for: the naive time follows the path count (x5 per two layers of depth) while
the collapse stays near linear in depth, so the ratio explodes with depth and the naive one
runs out of budget in the mid-teens. Against width both do matrix products; the ratio grows
with width as the products come to dominate the fixed costs, towards the ratio of the
number of products ("products" column: one per prefix of a path for the naive one, one per
layer for the collapse; identity skips are additions). Where both finish they agree to
float64 rounding (relative max |diff| ~1e-15).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from _timing import interleaved_medians, machine_summary, speedup
from torch import Tensor, nn

from epcli import EPLinear
from epcli.core import Affine

SKIPS = [1, 2]
DEPTHS = (4, 6, 8, 10, 12, 14, 16, 24, 32, 64)
DEPTH_SERIES_WIDTH = 64
WIDTHS = (32, 64, 128, 256, 512)
WIDTH_SERIES_DEPTH = 8
BUDGET_SECONDS = 10.0
"""Time the naive collapse may take on its first (untimed) run before the point is marked over budget."""
POINT_SECONDS = 4.0
"""Rough time spent on the timed naive runs of one point, which sets the number of rounds."""
MIN_ROUNDS = 3
MAX_ROUNDS = 7


class BudgetExceeded(Exception):
    """The naive collapse ran past its deadline."""


# ---- the naive reference ---------------------------------------------------------------
def _homogeneous(weight: Tensor, bias: Tensor | None, constant: float) -> Tensor:
    """``[[weight, bias], [0, constant]]`` in float64: an affine map acting on ``[x; 1]``."""
    rows, cols = weight.shape
    matrix = torch.zeros(rows + 1, cols + 1, dtype=torch.float64)
    matrix[:rows, :cols] = weight
    if bias is not None:
        matrix[:rows, cols] = bias
    matrix[rows, cols] = constant
    return matrix


def outgoing_edges(layer: EPLinear) -> dict[int, list[tuple[int, Tensor]]]:
    """For each node, its edges ``(destination, homogeneous map)``: the layer to the next node and its skips."""
    config = layer.config
    if config.batch_norm or config.learnable_skips:
        raise ValueError("the naive reference handles plain layers with identity skips only")
    edges: dict[int, list[tuple[int, Tensor]]] = {node: [] for node in range(config.depth)}
    with torch.no_grad():
        for index in range(config.depth):
            linear = layer.get_submodule(f"layer_dict.{index}.0")  # the chain's Linear, as in the state dict
            assert isinstance(linear, nn.Linear)
            edges[index].append((index + 1, _homogeneous(linear.weight, linear.bias, 1.0)))
        for source, destination in config.skips:
            size = config.node_dims[source]
            edges[source].append((destination, _homogeneous(torch.eye(size, dtype=torch.float64), None, 0.0)))
    return edges


def naive_collapse(layer: EPLinear, deadline: float = math.inf) -> tuple[Tensor, Tensor]:
    """Collapsed (weight, bias) in float64 as the sum over all input-to-output paths of the product of their maps.

    Raises :class:`BudgetExceeded` once ``time.perf_counter()`` passes ``deadline``.
    """
    edges = outgoing_edges(layer)
    depth = layer.depth
    size = layer.in_features + 1
    total = torch.zeros(layer.out_features + 1, size, dtype=torch.float64)

    def walk(node: int, product: Tensor) -> None:
        if node == depth:
            total.add_(product)
            return
        if time.perf_counter() > deadline:
            raise BudgetExceeded
        for destination, matrix in edges[node]:
            walk(destination, matrix @ product)

    walk(0, torch.eye(size, dtype=torch.float64))
    return total[:-1, :-1], total[:-1, -1]


def paths_to_nodes(depth: int, skips: tuple[tuple[int, int], ...]) -> list[int]:
    """Number of paths from node 0 to each node 0 .. ``depth`` (one layer edge per step plus the skips)."""
    paths = [1] + [0] * depth
    incoming = {node: [node - 1] for node in range(1, depth + 1)}
    for source, destination in skips:
        incoming[destination].append(source)
    for node in range(1, depth + 1):
        paths[node] = sum(paths[source] for source in incoming[node])
    return paths


# ---- one point ------------------------------------------------------------------------
@dataclass(frozen=True)
class Point:
    depth: int
    width: int
    paths: int
    naive_products: int
    """Matrix products of the naive walk: one per path prefix, i.e. the paths to every node 1 .. depth."""
    collapse_seconds: float
    naive_seconds: float | None
    relative_diff: float | None


def relative_diff(collapsed: Affine, naive: tuple[Tensor, Tensor]) -> float:
    """max |naive - collapse| over weight and bias, relative to the largest collapsed entry."""
    weight, bias = naive
    assert collapsed.bias is not None  # the layers here have biases
    diff = max(float((weight - collapsed.weight).abs().max()), float((bias - collapsed.bias).abs().max()))
    return diff / max(float(collapsed.weight.abs().max()), float(collapsed.bias.abs().max()))


def measure(depth: int, width: int) -> Point:
    """Both collapses of one freshly built layer, interleaved; the naive one only if its first run fits the budget."""
    torch.manual_seed(0)
    layer = EPLinear(width, width, depth=depth, residual=True, residual_intervals=SKIPS)
    paths = paths_to_nodes(depth, layer.config.skips)
    layer.collapse()  # warm-up; the naive collapse's first, budgeted run is its own
    start = time.perf_counter()
    try:
        naive: tuple[Tensor, Tensor] | None = naive_collapse(layer, deadline=start + BUDGET_SECONDS)
    except BudgetExceeded:
        naive = None
    candidates: dict[str, Callable[[], object]] = {"collapse": layer.collapse}
    rounds = MAX_ROUNDS
    if naive is not None:
        candidates["naive"] = lambda: naive_collapse(layer)
        rounds = max(MIN_ROUNDS, min(MAX_ROUNDS, int(POINT_SECONDS / (time.perf_counter() - start))))
    medians = interleaved_medians(candidates, rounds, warmup=0)
    return Point(
        depth=depth,
        width=width,
        paths=paths[-1],
        naive_products=sum(paths[1:]),
        collapse_seconds=medians["collapse"],
        naive_seconds=medians.get("naive"),
        relative_diff=None if naive is None else relative_diff(layer.collapse(), naive),
    )


HEADER = ("depth", "width", "paths", "products", "collapse ms", "naive ms", "naive/collapse", "rel max|diff|")
WIDTHS_OF_COLUMNS = (5, 5, 9, 14, 11, 10, 14, 13)


def row(point: Point) -> tuple[str, ...]:
    """The printed cells of one point."""
    naive = point.naive_seconds
    return (
        str(point.depth),
        str(point.width),
        f"{point.paths:.3g}",
        f"{point.naive_products:.3g} : {point.depth}",
        f"{point.collapse_seconds * 1e3:.3f}",
        ">budget" if naive is None else f"{naive * 1e3:.3f}",
        "-" if naive is None else f"{speedup(naive, point.collapse_seconds):.1f}x",
        "-" if point.relative_diff is None else f"{point.relative_diff:.1e}",
    )


def print_series(title: str, points: list[Point]) -> None:
    print(f"\n{title}")
    for cells in (HEADER, *map(row, points)):
        print(" ".join(f"{cell:>{width}}" for cell, width in zip(cells, WIDTHS_OF_COLUMNS)))


def main() -> None:
    torch.set_num_threads(1)
    print(machine_summary())
    print(f"one torch thread; identity skips {SKIPS}; naive budget {BUDGET_SECONDS:.0f} s per point; medians of "
          f"{MIN_ROUNDS} to {MAX_ROUNDS} interleaved rounds; rel max|diff| = max |naive - collapse| / max |collapse|")
    start = time.perf_counter()
    print_series(f"against depth (width {DEPTH_SERIES_WIDTH})", [measure(d, DEPTH_SERIES_WIDTH) for d in DEPTHS])
    print_series(f"against width (depth {WIDTH_SERIES_DEPTH})", [measure(WIDTH_SERIES_DEPTH, w) for w in WIDTHS])
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()

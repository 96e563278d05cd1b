"""The EP layer graph and its exact collapse by forward propagation.

Nodes ``0 .. depth``: node 0 is the layer input, node ``j + 1`` is layer ``j``
applied to node ``j`` (then its batch-norm), plus every skip that lands on it.
Each node is tracked as one affine map of the input, so the collapse costs one
composition per edge: linear in depth, never an expansion over all paths.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from epcli.core.affine import Affine, BatchNormFold, LinearAlgebra
from epcli.core.conv import ConvAlgebra

__all__ = ["LINEAR", "ChainLayer", "SkipEdge", "collapse_chain", "skip_edges"]

LINEAR = LinearAlgebra()

SkipEdge = tuple[int, int]
"""A skip ``(source node, destination node)``."""


def skip_edges(depth: int, intervals: Iterable[int]) -> tuple[SkipEdge, ...]:
    """Skips for each interval n (-1 means depth, repeats ignored): m - n -> m for m = n, 2n, ... <= depth.

    Ordered by interval first, as the original implementation adds them.
    """
    edges: list[SkipEdge] = []
    for n in dict.fromkeys(depth if n == -1 else n for n in intervals):
        edges.extend((m - n, m) for m in range(n, depth + 1, n))
    return tuple(edges)


@dataclass(frozen=True)
class ChainLayer:
    """One layer of the chain: its weight, optional bias and optional folded batch-norm."""

    weight: Tensor
    bias: Tensor | None = None
    norm: BatchNormFold | None = None


def _cast(layer: ChainLayer, dtype: torch.dtype) -> ChainLayer:
    """The layer's tensors in ``dtype``; no copy when they already are (see :func:`_unaliased`).

    Autograd history is kept, so a collapse run with grad enabled is differentiable;
    callers that want plain tensors run it under ``torch.no_grad()``.
    """

    def cast(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.to(dtype)

    norm = layer.norm
    if norm is not None:
        norm = BatchNormFold(cast(norm.scale), cast(norm.shift))  # type: ignore[arg-type]
    return ChainLayer(cast(layer.weight), cast(layer.bias), norm)  # type: ignore[arg-type]


def _unaliased(result: Affine, inputs: Iterable[ChainLayer | None]) -> Affine:
    """``result`` with a copy of any tensor that shares memory with an input (e.g. a depth-1 chain's own
    weight, or a bias passed through unchanged): the collapse must never alias a layer's parameters."""
    pointers = {
        t.untyped_storage().data_ptr()
        for layer in inputs
        if layer is not None
        for t in (layer.weight, layer.bias)
        if t is not None
    }

    def own(t: Tensor | None) -> Tensor | None:
        return None if t is None or t.untyped_storage().data_ptr() not in pointers else t.clone()

    weight, bias = own(result.weight), own(result.bias)
    return Affine(result.weight if weight is None else weight, result.bias if bias is None else bias)


def collapse_chain(
    algebra: LinearAlgebra | ConvAlgebra,
    in_features: int,
    layers: Sequence[ChainLayer],
    skips: Mapping[SkipEdge, ChainLayer | None],
    *,
    unalias: bool = True,
    dtype: torch.dtype = torch.float64,
) -> Affine:
    """Collapse an EP chain to one affine map, in float64 (``dtype``: see :meth:`EPLayer.collapse`).

    ``layers[j]`` maps node j to node j + 1; ``skips`` maps each skip edge to its
    learnable projection, or None for an identity skip. Nodes are dropped once no
    later skip reads them, so memory stays at the few nodes still needed. Each
    layer is cast to ``dtype`` only when its turn comes, and tensors already in it are
    not copied at all, so at most one layer's cast copy exists beside the nodes.
    ``unalias=False`` skips the copy of results that alias an input (it reads storage
    pointers, which traced tensors do not have); for results used once inside a forward.
    """
    projections = {edge: None if p is None else _cast(p, dtype) for edge, p in skips.items()}
    incoming: dict[int, list[tuple[int, ChainLayer | None]]] = {}
    last_read: dict[int, int] = {}
    for (source, destination), projection in projections.items():
        incoming.setdefault(destination, []).append((source, projection))
        last_read[source] = max(last_read.get(source, -1), destination)

    # the input node is the identity map: never multiplied by, built only when an identity skip reads it
    reads_input = any(source == 0 and projection is None for (source, _), projection in projections.items())
    layer = _cast(layers[0], dtype)
    nodes: dict[int, Affine] = {0: algebra.identity(in_features, layer.weight)} if reads_input else {}
    current = Affine(layer.weight, layer.bias)  # layer 0 composed with the identity
    for j, stored in enumerate(layers):
        if j > 0:  # the previous layer's cast copy goes here: three matrices at a time, not four
            layer = _cast(stored, dtype)
            current = algebra.compose(layer.weight, layer.bias, current)
        if layer.norm is not None:
            current = current.scaled(layer.norm.scale, layer.norm.shift)
        destination = j + 1
        for source, projection in incoming.get(destination, ()):
            if projection is None:
                branch = nodes[source]
            elif source == 0:
                branch = Affine(projection.weight, projection.bias)  # the projection composed with the identity
            else:
                branch = algebra.compose(projection.weight, projection.bias, nodes[source])
            current = algebra.add(current, branch)
        nodes = {i: v for i, v in nodes.items() if last_read.get(i, -1) > destination}
        nodes[destination] = current
    return _unaliased(current, [*layers, *skips.values()]) if unalias else current

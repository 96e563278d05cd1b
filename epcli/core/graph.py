"""The EP layer graph and its exact collapse by forward propagation.

Nodes ``0 .. depth``: node 0 is the layer input, node ``j + 1`` is layer ``j``
applied to node ``j`` (then its batch-norm), plus every skip that lands on it.
Each node is tracked as one affine map of the input, so the collapse costs one
composition per edge: linear in depth, never an expansion over all paths.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from epcli.core.affine import Affine, BatchNormFold, LinearAlgebra, sum_biases
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
    """The layer's weight and bias in ``dtype`` (its norm is cast where it is applied); no copy when they
    already are (see :func:`_unaliased`).

    Autograd history is kept, so a collapse run with grad enabled is differentiable;
    callers that want plain tensors run it under ``torch.no_grad()``.
    """

    def cast(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.to(dtype)

    return ChainLayer(layer.weight.to(dtype), cast(layer.bias))


def _storages(layer: ChainLayer | None) -> set[int]:
    """The storages of a chain layer's weight and bias (see :func:`_unaliased`)."""
    if layer is None:
        return set()
    return {t.untyped_storage().data_ptr() for t in (layer.weight, layer.bias) if t is not None}


def _unaliased(result: Affine, inputs: set[int]) -> Affine:
    """``result`` with a copy of any tensor whose storage is one of ``inputs`` (e.g. a depth-1 chain's own
    weight, or a bias passed through unchanged): the collapse must never alias a layer's parameters."""

    def own(t: Tensor | None) -> Tensor | None:
        return None if t is None or t.untyped_storage().data_ptr() not in inputs else t.clone()

    weight, bias = own(result.weight), own(result.bias)
    return Affine(result.weight if weight is None else weight, result.bias if bias is None else bias)


def collapse_chain(
    algebra: LinearAlgebra | ConvAlgebra,
    in_features: int,
    layers: Iterable[ChainLayer],
    skips: Mapping[SkipEdge, ChainLayer | None],
    *,
    unalias: bool = True,
    dtype: torch.dtype = torch.float64,
    lean: bool = False,
) -> Affine:
    """Collapse an EP chain to one affine map, in float64 (``dtype``: see :meth:`EPLayer.collapse`).

    ``layers`` yields layer j, which maps node j to node j + 1; ``skips`` maps each skip edge to its
    learnable projection, or None for an identity skip. Nodes are dropped once no
    later skip reads them, so memory stays at the few nodes still needed. Each
    layer is cast to ``dtype`` only when its turn comes, and tensors already in it are
    not copied at all, so at most one layer's cast copy exists beside the nodes; ``layers`` is read once, in
    order, and no reference to a layer is kept after its turn (hand over an iterator that holds none either,
    and each layer's memory is given back as the collapse goes).
    ``unalias=False`` skips the copy of results that alias an input (it reads storage
    pointers, which traced tensors do not have); for results used once inside a forward.
    ``lean=True`` (no autograd) composes with :meth:`~LinearAlgebra.compose_lean` (no cast copy of a whole
    layer), and folds batch-norms and adds skips in place on products of its own.
    """
    incoming: dict[int, list[tuple[int, ChainLayer | None]]] = {}
    last_read: dict[int, int] = {}
    for (source, destination), projection in skips.items():
        incoming.setdefault(destination, []).append((source, projection))
        last_read[source] = max(last_read.get(source, -1), destination)
    inputs: set[int] = set()
    for projection in skips.values():
        inputs |= _storages(projection) if unalias else set()

    # the input node is the identity map: never multiplied by, built only when an identity skip reads it
    reads_input = any(source == 0 and projection is None for (source, _), projection in skips.items())
    nodes: dict[int, Affine] = {}
    current: Affine | None = None
    owned = False  # whether current's weight is a tensor of this collapse's own, which lean ops may overwrite
    for j, stored in enumerate(layers):
        inputs |= _storages(stored) if unalias else set()
        if current is None:  # layer 0, composed with the identity
            cast = _cast(stored, dtype)
            if reads_input:
                nodes[0] = algebra.identity(in_features, cast.weight)
            current = Affine(cast.weight, cast.bias)
            owned = cast.weight is not stored.weight  # the cast made a copy
            del cast
        elif lean:
            current = algebra.compose_lean(stored.weight, stored.bias, current)
            owned = True
        else:  # the previous layer's cast copy is gone: three matrices at a time, not four
            cast = _cast(stored, dtype)
            current = algebra.compose(cast.weight, cast.bias, current)
            del cast
        norm = stored.norm
        del stored  # before the next layer is read
        if norm is not None:
            norm = BatchNormFold(norm.scale.to(dtype), norm.shift.to(dtype))
            current = _scaled(current, norm, in_place=lean and owned)
            owned = True
        destination = j + 1
        for source, projection in incoming.get(destination, ()):
            if projection is None:
                branch = nodes[source]
            elif source == 0:  # the projection composed with the identity
                cast = _cast(projection, dtype)
                branch = Affine(cast.weight, cast.bias)
            elif lean:
                branch = algebra.compose_lean(projection.weight, projection.bias, nodes[source])
            else:
                cast = _cast(projection, dtype)
                branch = algebra.compose(cast.weight, cast.bias, nodes[source])
            if lean and owned and branch.weight.shape == current.weight.shape:
                current = Affine(current.weight.add_(branch.weight), sum_biases(current.bias, branch.bias))
            else:
                current = algebra.add(current, branch)
                owned = True
        nodes = {i: v for i, v in nodes.items() if last_read.get(i, -1) > destination}
        nodes[destination] = current
    if current is None:
        raise ValueError("an EP chain has at least one layer")
    return _unaliased(current, inputs) if unalias else current


def _scaled(affine: Affine, norm: BatchNormFold, *, in_place: bool) -> Affine:
    """A folded batch-norm applied to ``affine`` (:meth:`Affine.scaled`); ``in_place``: over its weight."""
    if not in_place:
        return affine.scaled(norm.scale, norm.shift)
    per_row = norm.scale.reshape(-1, *([1] * (affine.weight.dim() - 1)))
    bias = norm.shift if affine.bias is None else affine.bias * norm.scale + norm.shift
    return Affine(affine.weight.mul_(per_row), bias)

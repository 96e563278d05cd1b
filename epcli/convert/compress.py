"""Low-rank factoring of a plain model's Linear / ConvNd layers at chosen ranks (the transform, not the search).

:func:`layer_plans` runs the model once on calibration batches (recording each layer's output positions, for
MACs, and with ``whiten`` the Gram matrix of its inputs) and takes the SVD of every layer's (whitened) weight;
:func:`factored_copy` then builds the model with chosen layers replaced by their
:mod:`~epcli.layers.lowrank` modules. Which ranks to choose, measured on the whole model, is
:func:`epcli.verification.compress.compress_model`'s job.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from torch import Tensor, nn

from epcli.convert.model import replaced_copy
from epcli.core.lowrank import DEFAULT_RIDGE, Truncation, conv_factors, group_matrices, truncation, whitening
from epcli.core.spectrum import spectrum
from epcli.layers.lowrank import LOW_RANK, LowRankConv, LowRankLinear

__all__ = ["LayerPlan", "factored_copy", "layer_plans"]

Plain = nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d


@dataclass(frozen=True)
class LayerPlan:
    """One plain layer's SVDs (one per group) and costs; ``positions`` is how often its weight is applied per
    sample (output pixels of a conv, tokens of a Linear), so MACs are ``weight elements * positions``."""

    path: str
    layer_type: str
    truncations: tuple[Truncation, ...]
    params: int
    weight_numel: int
    positions: int
    effective_rank: float

    @property
    def full_rank(self) -> int:
        return self.truncations[0].full_rank

    @property
    def groups(self) -> int:
        return len(self.truncations)

    @property
    def macs(self) -> int:
        return self.weight_numel * self.positions

    @property
    def rank_limit(self) -> int:
        """The largest rank whose factors hold fewer weights (and so take fewer MACs) than the layer."""
        out = self.truncations[0].u.shape[0] * self.groups
        per_rank = self.groups * self.truncations[0].vh.shape[1] + out  # down's g * n and up's out weights
        return min(self.full_rank, (self.weight_numel - 1) // per_rank)

    def factored_weights(self, rank: int) -> int:
        return rank * (self.groups * self.truncations[0].vh.shape[1] + self.truncations[0].u.shape[0] * self.groups)

    def factored_params(self, rank: int) -> int:
        return self.params - self.weight_numel + self.factored_weights(rank)

    def factored_macs(self, rank: int) -> int:
        return self.factored_weights(rank) * self.positions

    @cached_property
    def tails(self) -> tuple[float, ...]:
        """``tails[r]``: the fraction of the layer's (whitened) energy that keeping ``r`` values per group
        discards, for ``r`` up to the full rank."""
        energies = torch.stack([t.singular_values.square() for t in self.truncations]).sum(0)  # [k]
        total = float(energies.sum())
        discarded = energies.flip(0).cumsum(0).flip(0).tolist() + [0.0]  # discarded[r] = sum_{i >= r}
        return tuple(d / total if total > 0 else 0.0 for d in discarded)

    def rank_at(self, threshold: float) -> int | None:
        """The smallest rank discarding at most ``threshold`` of the energy, or None when it would not save."""
        return next((r for r in range(1, self.rank_limit + 1) if self.tails[r] <= threshold), None)


def _compressible(model: nn.Module) -> dict[str, Plain]:
    """Every plain Linear / ConvNd, except the halves of a layer factored already."""
    halves = {id(half) for m in model.modules() if isinstance(m, (LowRankLinear, LowRankConv)) for half in m.children()}
    return {name: m for name, m in model.named_modules() if type(m) in LOW_RANK and id(m) not in halves}


def layer_plans(
    model: nn.Module, batches: Sequence[tuple[Tensor, ...]], *, whiten: bool, ridge: float = DEFAULT_RIDGE
) -> dict[str, LayerPlan]:
    """Every plain Linear / ConvNd of ``model`` (float64, eval mode) with its SVDs, after one pass over ``batches``
    (whitened by the layer's input Gram matrix when ``whiten``)."""
    layers = _compressible(model)
    grams: dict[str, list[Tensor]] = {}
    positions: dict[str, int] = {}
    with _recording(layers, grams, positions, whiten=whiten), torch.no_grad():
        for batch in batches:
            model(*batch)
    plans = {}
    for path, layer in layers.items():
        groups = getattr(layer, "groups", 1)
        weight = layer.weight.detach()
        cuts = []
        for index, matrix in enumerate(group_matrices(weight, groups)):
            gram = grams[path][index] if whiten and path in grams else None
            cuts.append(truncation(matrix, None if gram is None else whitening(gram, ridge)))
        plans[path] = LayerPlan(
            path=path,
            layer_type=type(layer).__name__,
            truncations=tuple(cuts),
            params=sum(p.numel() for p in layer.parameters()),
            weight_numel=weight.numel(),
            positions=positions.get(path, 1),
            effective_rank=spectrum(weight).effective_rank,
        )
    return plans


@contextmanager
def _recording(
    layers: Mapping[str, Plain], grams: dict[str, list[Tensor]], positions: dict[str, int], *, whiten: bool
) -> Iterator[None]:
    """Forward hooks that add each layer's input Gram matrices (per group) and note its output positions."""

    def hook(path: str, layer: Plain) -> Any:
        def record(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
            out_channels = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
            positions[path] = output.numel() // max(1, output.shape[0] * out_channels)
            if whiten:
                rows = _input_rows(layer, args[0])
                sums = grams.setdefault(path, [torch.zeros(0)] * len(rows))
                grams[path] = [s + r.T @ r if s.numel() else r.T @ r for s, r in zip(sums, rows, strict=True)]

        return record

    handles = [layer.register_forward_hook(hook(path, layer)) for path, layer in layers.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _input_rows(layer: Plain, x: Tensor) -> list[Tensor]:
    """What each group's weight matrix multiplies, one row per application: ``[m, in/g * K]`` per group.

    A conv's input patches come from a conv with the same window whose weight is the identity, so stride,
    padding (any mode) and dilation are those of the layer, in 1, 2 or 3 dimensions alike.
    """
    x = x.detach().to(torch.float64)
    if isinstance(layer, nn.Linear):
        return [x.reshape(-1, layer.in_features)]  # [m, in]
    per_group = layer.in_channels // layer.groups
    kernel = tuple(layer.kernel_size)
    size = per_group * math.prod(kernel)
    patches = type(layer)(
        per_group, size, kernel, layer.stride, layer.padding, layer.dilation,  # type: ignore[arg-type]
        bias=False, padding_mode=layer.padding_mode, device=x.device, dtype=torch.float64,
    )
    with torch.no_grad():
        patches.weight.copy_(torch.eye(size, dtype=torch.float64).reshape(size, per_group, *kernel))
        rows = []
        for part in x.chunk(layer.groups, dim=1):  # [N, in/g, *spatial] per group
            unfolded = patches(part)  # [N, in/g * K, *out_spatial]
            rows.append(unfolded.movedim(1, -1).reshape(-1, size))  # [N * positions, in/g * K]
    return rows


def factored_copy(model: nn.Module, plans: Mapping[str, LayerPlan], ranks: Mapping[str, int]) -> nn.Module:
    """A copy of ``model`` (input untouched; dtype and device kept) in which each layer at a path of ``ranks`` is
    its low-rank module at that rank (per group), built from ``plans``' float64 SVDs and cast at the end."""
    layers = _compressible(model)
    replacements = {id(layers[path]): _factored(layers[path], plans[path], rank) for path, rank in ranks.items()}
    return replaced_copy(model, replacements)


def _factored(layer: Plain, plan: LayerPlan, rank: int) -> nn.Module:
    weight = layer.weight
    factory = {"device": weight.device, "dtype": weight.dtype}
    module: LowRankLinear | LowRankConv
    if isinstance(layer, nn.Linear):
        module = LowRankLinear(layer.in_features, rank, layer.out_features, layer.bias is not None, **factory)
        up, down = plan.truncations[0].factors(rank)
    else:
        module = LOW_RANK[type(layer)](
            layer.in_channels, rank, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
            layer.dilation, layer.groups, layer.bias is not None, layer.padding_mode, **factory,
        )  # type: ignore[assignment]
        down, up = conv_factors(weight, layer.groups, plan.truncations, rank)
    with torch.no_grad():
        module.down.weight.copy_(down)
        module.up.weight.copy_(up)
        if layer.bias is not None and module.up.bias is not None:
            module.up.bias.copy_(layer.bias)
    return module.train(layer.training)

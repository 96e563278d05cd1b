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
from typing import Any, cast

import torch
from torch import Tensor, nn

from epcli.convert.model import replaced_copy
from epcli.core.lowrank import DEFAULT_RIDGE, Truncation, conv_factors, group_matrices, truncation, whitening
from epcli.core.spectrum import spectrum
from epcli.errors import CheckpointError
from epcli.layers.lowrank import LOW_RANK, LowRankConv, LowRankLinear
from epcli.layers.registry import is_transformers_conv1d

__all__ = ["LayerPlan", "factored_copy", "factored_skeleton", "layer_plans"]

Plain = nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d
"""A layer compress factors: one of these (matched exactly: a subclass may have its own forward), or transformers'
``Conv1D`` (GPT-2's linear layer, weight stored ``[in, out]``), which is typed as ``nn.Linear`` here: code tells
the two kinds apart by ``isinstance(layer, _CONVS)`` and reads weights through :func:`_weight`."""
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


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


def _is_plain(module: nn.Module) -> bool:
    return type(module) in LOW_RANK or is_transformers_conv1d(type(module))


def _weight(layer: Plain) -> Tensor:
    """The weight as ``nn.Linear`` / ``nn.ConvNd`` store it, ``[out, in/g, *kernel]`` (``Conv1D``'s, transposed)."""
    weight: Tensor = layer.weight
    return weight.T if is_transformers_conv1d(type(layer)) else weight


def _compressible(model: nn.Module) -> dict[str, Plain]:
    """Every plain layer, except the halves of a layer factored already and a layer whose weight is tied to another
    module's (GPT-2's and nanoGPT's ``lm_head`` shares the token embedding's): the shared weight stays stored for
    the other module, so factoring it would add parameters, not save them."""
    halves = {id(half) for m in model.modules() if isinstance(m, (LowRankLinear, LowRankConv)) for half in m.children()}
    owners: dict[int, int] = {}
    for module in model.modules():  # each module once, however often it occurs
        for parameter in module.parameters(recurse=False):
            owners[id(parameter)] = owners.get(id(parameter), 0) + 1
    return {
        name: cast(Plain, m)
        for name, m in model.named_modules()
        if _is_plain(m) and id(m) not in halves and owners[id(m.weight)] == 1
    }


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
        weight = _weight(layer).detach()
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
            positions[path] = output.numel() // max(1, output.shape[0] * _weight(layer).shape[0])
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
    if not isinstance(layer, _CONVS):  # nn.Linear or Conv1D
        return [x.reshape(-1, _weight(layer).shape[1])]  # [m, in]
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


def factored_skeleton(model: nn.Module, ranks: Mapping[str, int]) -> nn.Module:
    """A copy of ``model`` in which the layer at each path of ``ranks`` is its low-rank module at that rank (per
    group), on the meta device: the skeleton a compressed file's tensors are loaded into (strictly).

    Raises :class:`~epcli.errors.CheckpointError` naming the path when ``model`` has no module there, the module
    is not a layer ``epcli compress`` factors, or the rank is over the layer's full rank."""
    modules = dict(model.named_modules())
    replacements: dict[int, nn.Module] = {}
    for path, rank in ranks.items():
        layer = modules.get(path)
        if layer is None:
            raise CheckpointError(
                f"has no module {path!r}, which the file records as factored at rank {rank}; build the model the "
                "file was compressed from"
            )
        if not _is_plain(layer):
            raise CheckpointError(
                f"has a {type(layer).__name__} at {path!r}, which the file records as a factored Linear, Conv1d/2d/3d "
                f"or transformers Conv1D (rank {rank}); build the model the file was compressed from"
            )
        weight = _weight(cast(Plain, layer))
        out, per_group, *kernel = weight.shape
        full_rank = min(out // getattr(layer, "groups", 1), per_group * math.prod(kernel))
        if rank > full_rank:
            raise CheckpointError(
                f"has a {type(layer).__name__} at {path!r} of full rank {full_rank} (weight {list(weight.shape)}), "
                f"which the file records as factored at rank {rank}; build the model the file was compressed from"
            )
        replacements[id(layer)] = _low_rank(cast(Plain, layer), rank, device="meta")
    return replaced_copy(model, replacements)


def _low_rank(layer: Plain, rank: int, **factory: Any) -> LowRankLinear | LowRankConv:
    """The factored module that replaces ``layer`` at ``rank`` (per group), its weights not yet set."""
    bias = layer.bias is not None
    if not isinstance(layer, _CONVS):  # nn.Linear or Conv1D
        out, features = _weight(layer).shape
        return LowRankLinear(features, rank, out, bias, **factory)
    module: LowRankConv = LOW_RANK[type(layer)](
        layer.in_channels, rank, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
        layer.dilation, layer.groups, bias, layer.padding_mode, **factory,
    )  # type: ignore[assignment]
    return module


def _factored(layer: Plain, plan: LayerPlan, rank: int) -> nn.Module:
    weight = layer.weight
    module = _low_rank(layer, rank, device=weight.device, dtype=weight.dtype)
    if not isinstance(layer, _CONVS):
        up, down = plan.truncations[0].factors(rank)
    else:
        down, up = conv_factors(weight, layer.groups, plan.truncations, rank)
    with torch.no_grad():
        module.down.weight.copy_(down)
        module.up.weight.copy_(up)
        if layer.bias is not None and module.up.bias is not None:
            module.up.bias.copy_(layer.bias)
    return module.train(layer.training)

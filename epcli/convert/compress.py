"""Low-rank factoring of a plain model's Linear / ConvNd layers at chosen ranks (the transform, not the search).

:func:`layer_plans` runs the model once on calibration batches (recording each layer's output positions, for
MACs, and with ``whiten`` the Gram matrix of its inputs) and keeps, from the truncated SVD of every layer's
(whitened) weight, its factors at the largest rank that saves, in the layer's dtype; :func:`factored` then puts chosen
layers' :mod:`~epcli.layers.lowrank` modules, views of those factors, in the model's place for a measurement, and
:func:`factor_in_place` for good. Which ranks to choose, measured on the whole model, is
:func:`epcli.verification.compress.compress_model`'s job.

Given a :class:`~epcli.storage.scratch.ScratchTensors`, the layers' weights (:func:`offload_layers`) and their
factors wait on disk between uses, so that only one layer's weights, or one candidate's factors, are ever held.
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
from epcli.convert.offload import offload, offloaded_weight, restore
from epcli.core.lowrank import DEFAULT_RIDGE, Factors, conv_factors, eigenbasis, group_matrices, ridged
from epcli.core.spectrum import spectrum
from epcli.errors import CheckpointError, UsageError
from epcli.layers.lowrank import LOW_RANK, LowRankConv, LowRankLinear
from epcli.layers.registry import is_transformers_conv1d
from epcli.storage.mapped_pages import trim_heap
from epcli.storage.scratch import ScratchTensors

__all__ = [
    "LayerPlan", "ParkedFactors", "factor_in_place", "factored", "factored_skeleton", "in_model_dtype", "layer_plans",
    "offload_layers",
]

Plain = nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d
"""A layer compress factors: one of these (matched exactly: a subclass may have its own forward), or transformers'
``Conv1D`` (GPT-2's linear layer, weight stored ``[in, out]``), which is typed as ``nn.Linear`` here: code tells
the two kinds apart by ``isinstance(layer, _CONVS)`` and reads weights through :func:`_weight`."""
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class ParkedFactors(Factors):
    """:class:`~epcli.core.lowrank.Factors` whose ``B`` (transposed) and ``A`` wait in a scratch store, so that
    the factors at rank ``r`` are the first ``r`` rows of each; ``b`` and ``a`` are meta tensors of their shapes.
    Cutting reads them: new tensors, not views."""

    store: ScratchTensors
    keys: tuple[int, int]  # B^T [limit, out], A [limit, n]

    @classmethod
    def park(cls, factors: Factors, store: ScratchTensors) -> ParkedFactors:
        keys = store.put(factors.b.T), store.put(factors.a)
        b, a = (torch.empty(t.shape, dtype=t.dtype, device="meta") for t in (factors.b, factors.a))
        return cls(b, a, factors.energies, factors.total, store, keys)

    def factors(self, rank: int) -> tuple[Tensor, Tensor]:
        """``B [out, rank]`` (a transposed view of what was read), ``A [rank, n]``."""
        super().factors(rank)  # the range check
        return self.store.get(self.keys[0], rows=rank).T, self.store.get(self.keys[1], rows=rank)


@dataclass(frozen=True)
class LayerPlan:
    """One plain layer's factors up to :attr:`rank_limit` (one per group) and costs; ``positions`` is how often its
    weight is applied per sample (output pixels of a conv, tokens of a Linear), so MACs are ``weight elements *
    positions``."""

    path: str
    layer_type: str
    factors: tuple[Factors, ...]
    params: int
    weight_numel: int
    positions: int
    effective_rank: float

    @property
    def full_rank(self) -> int:
        return self.factors[0].full_rank

    @property
    def groups(self) -> int:
        return len(self.factors)

    @property
    def macs(self) -> int:
        return self.weight_numel * self.positions

    @property
    def rank_limit(self) -> int:
        """The largest rank whose factors hold fewer weights (and so take fewer MACs) than the layer."""
        return self.factors[0].limit

    def factored_weights(self, rank: int) -> int:
        return rank * _per_rank(self.groups, *self.factors[0].shape)

    def factored_params(self, rank: int) -> int:
        return self.params - self.weight_numel + self.factored_weights(rank)

    def factored_macs(self, rank: int) -> int:
        return self.factored_weights(rank) * self.positions

    @cached_property
    def tails(self) -> tuple[float, ...]:
        """``tails[r]``: the fraction of the layer's (whitened) energy that keeping ``r`` values per group
        discards, for ``r`` up to the rank limit."""
        total = sum(f.total for f in self.factors)
        zero = torch.zeros(1, dtype=torch.float64)
        kept = torch.stack([torch.cat([zero, f.energies.cumsum(0)]) for f in self.factors]).sum(0)  # kept[r]
        return tuple(max(total - k, 0.0) / total if total > 0 else 0.0 for k in kept.tolist())

    def rank_at(self, threshold: float) -> int | None:
        """The smallest rank discarding at most ``threshold`` of the energy, or None when it would not save."""
        return next((r for r in range(1, self.rank_limit + 1) if self.tails[r] <= threshold), None)


def _per_rank(groups: int, out_per_group: int, n: int) -> int:
    """Weights a factored layer holds per unit of rank: ``down``'s ``g * n`` and ``up``'s ``out``."""
    return groups * (n + out_per_group)


def _rank_limit(weight_numel: int, groups: int, out_per_group: int, n: int) -> int:
    """The largest rank whose factors hold fewer weights than the layer's ``weight_numel``."""
    return min(out_per_group, n, (weight_numel - 1) // _per_rank(groups, out_per_group, n))


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


def offload_layers(model: nn.Module, store: ScratchTensors) -> None:
    """Park the weight of every layer :func:`layer_plans` would factor in ``store``, read back only while the
    layer runs (:mod:`~epcli.convert.offload`), until :func:`factor_in_place` builds the result. For models
    whose code epcli knows (an embedded architecture): user code may read a weight outside its layer's forward."""
    for layer in _compressible(model).values():
        offload(layer, store)


def layer_plans(
    model: nn.Module,
    batches: Sequence[tuple[Tensor, ...]],
    *,
    whiten: bool,
    ridge: float = DEFAULT_RIDGE,
    scratch: ScratchTensors | None = None,
) -> dict[str, LayerPlan]:
    """Every plain Linear / ConvNd of ``model`` (eval mode) with its factors, after one pass over ``batches``
    (whitened by the layer's input Gram matrix when ``whiten``).

    Each layer's factors at the rank limit (:func:`~epcli.core.lowrank.eigenbasis`, in float64) are kept in the
    layer's dtype (parked in ``scratch`` when given), and the decomposition dropped: only one layer's is ever
    held, and the factors kept are fewer weights than the layer's. Whitening takes one pass per layer, each
    recording only that layer's float64 Gram matrix (larger than its weight), which is dropped with its
    decomposition."""
    layers = _compressible(model)
    grams: dict[str, list[Tensor]] = {}
    positions: dict[str, int] = {}

    def run(gram_of: str | None) -> None:
        with _recording(layers, grams, positions, gram_of=gram_of), torch.no_grad():
            for batch in batches:
                model(*in_model_dtype(model, batch))

    if not whiten:
        run(None)
    plans = {}
    for path, layer in layers.items():
        if whiten:
            run(path)
        groups = getattr(layer, "groups", 1)
        weight = _weight(layer)  # its shape and dtype: an offloaded layer's weight is read when needed
        limit = _rank_limit(weight.numel(), groups, weight.shape[0] // groups, weight[0].numel())
        kept = []
        layer_grams: list[Tensor | None] = list(grams.pop(path, [None] * groups))  # a layer never run: plain
        for index in range(groups):
            # the weight read and the Gram matrix taken are let go before the eigensolve; the weight is read again
            try:
                basis = eigenbasis(_group(layer, groups, index), _covariance(layer_grams, ridge), limit=limit)
            except ValueError as e:
                raise UsageError(f"layer {path!r}: {e}; only a finite model can be compressed") from e
            factors = basis.factors(_group(layer, groups, index), weight.dtype)
            del basis
            kept.append(factors if scratch is None else ParkedFactors.park(factors, scratch))
            del factors  # before the next group's
        plans[path] = LayerPlan(
            path=path,
            layer_type=type(layer).__name__,
            factors=tuple(kept),
            params=sum(p.numel() for p in layer.parameters()),
            weight_numel=weight.numel(),
            positions=positions.get(path, 1),
            effective_rank=spectrum(_read_weight(layer)).effective_rank,
        )
        trim_heap()  # LAPACK's and NumPy's small blocks would otherwise pin a layer's worth of freed heap each
    return plans


def _covariance(grams: list[Tensor | None], ridge: float) -> Tensor | None:
    """The next group's Gram matrix, taken from ``grams`` and ridged (None: plain truncation)."""
    gram = grams.pop(0)
    return None if gram is None else ridged(gram, ridge)


def _read_weight(layer: Plain) -> Tensor:
    """:func:`_weight`'s values: read from the scratch store when the layer is offloaded."""
    weight = offloaded_weight(layer)
    return weight.T if is_transformers_conv1d(type(layer)) else weight


def _group(layer: Plain, groups: int, index: int) -> Tensor:
    """Group ``index``'s weight matrix ``[out/g, in/g * K]``, freshly read when the layer is offloaded."""
    return group_matrices(_read_weight(layer), groups)[index]


def in_model_dtype(model: nn.Module, batch: Sequence[Tensor]) -> tuple[Tensor, ...]:
    """``batch`` (e.g. float64 calibration inputs) with its floating tensors cast to the model's dtype."""
    dtype = next((p.dtype for p in model.parameters()), torch.float64)
    return tuple(t.to(dtype) if t.is_floating_point() else t for t in batch)


@contextmanager
def _recording(
    layers: Mapping[str, Plain], grams: dict[str, list[Tensor]], positions: dict[str, int], *, gram_of: str | None
) -> Iterator[None]:
    """Forward hooks that note each layer's output positions, and add the input Gram matrices (per group) of the
    layer at ``gram_of``."""

    def hook(path: str, layer: Plain) -> Any:
        def record(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
            positions[path] = output.numel() // max(1, output.shape[0] * _weight(layer).shape[0])
            if path == gram_of:
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


@contextmanager
def factored(model: nn.Module, plans: Mapping[str, LayerPlan], ranks: Mapping[str, int]) -> Iterator[nn.Module]:
    """``model`` with each layer at a path of ``ranks`` replaced, while the block runs, by its low-rank module at
    that rank (per group), whose weights are views of ``plans``' factors: a candidate measured without a copy of
    the model or of its weights. Yields the model to run (the root's replacement when the root is replaced)."""
    layers = _compressible(model)
    replacements = {id(layers[path]): _factored(layers[path], plans[path], rank) for path, rank in ranks.items()}
    swapped = _swap(model, replacements)
    try:
        yield replacements.get(id(model), model)
    finally:
        _swap(model, {id(new): old for old, new in swapped})


def factor_in_place(model: nn.Module, plans: dict[str, LayerPlan], ranks: Mapping[str, int]) -> nn.Module:
    """``model`` with each layer at a path of ``ranks`` replaced by its low-rank module at that rank, holding copies
    of the factors; returns the model (the replacement when it is the root).

    ``plans`` is consumed: each layer's plan is dropped once its module is built, and with it the factors, so the
    copies and the layer they replace are never held together with every plan. Layers left whole that were
    offloaded (:func:`offload_layers`) read their weights back."""
    layers = _compressible(model)
    for path in [path for path in plans if path not in ranks]:
        del plans[path]
    for path, rank in ranks.items():
        layer = layers.pop(path)
        module = _factored(layer, plans.pop(path), rank, copied=True)
        _swap(model, {id(layer): module})
        if layer is model:
            model = module
        del layer, module
    for module in model.modules():
        restore(module)
    return model


def _swap(model: nn.Module, replacements: Mapping[int, nn.Module]) -> list[tuple[nn.Module, nn.Module]]:
    """Put each replacement wherever its module (by ``id``) is a child, however often; returns the pairs swapped,
    (old, new), once each."""
    swapped: dict[int, tuple[nn.Module, nn.Module]] = {}
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):  # every name, a module held twice included
            if child is not None and id(child) in replacements:
                new = replacements[id(child)]
                parent._modules[name] = new
                swapped.setdefault(id(child), (child, new))
    if id(model) in replacements:
        swapped.setdefault(id(model), (model, replacements[id(model)]))
    return list(swapped.values())


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


def _factored(layer: Plain, plan: LayerPlan, rank: int, *, copied: bool = False) -> nn.Module:
    """The low-rank module at ``rank``, its weights views of the plan's factors, or what was read of parked ones
    (``copied``: tensors that own their memory, contiguous), its bias the layer's own."""
    weight = layer.weight
    module = _low_rank(layer, rank, device="meta", dtype=weight.dtype)
    if not isinstance(layer, _CONVS):
        up, down = plan.factors[0].factors(rank)
    else:
        down, up = conv_factors(weight, layer.groups, plan.factors, rank)
    if copied:  # read factors are copies already
        parked = isinstance(plan.factors[0], ParkedFactors)
        down, up = (t.contiguous() if parked else t.clone(memory_format=torch.contiguous_format) for t in (down, up))
    module.down.weight = nn.Parameter(down, requires_grad=copied)
    module.up.weight = nn.Parameter(up, requires_grad=copied)
    module.up.bias = layer.bias
    return module.train(layer.training)

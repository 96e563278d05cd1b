"""``compress_model``: the smallest low-rank model whose whole-model error, measured, stays within a budget.

It lives here, not in :mod:`epcli.convert`, because the ranks are chosen by measuring the whole model with the
comparison engine (:func:`~epcli.verification.compare.compare_outputs`), which sits above the transforms.

Ranks are allocated by one global threshold ``t`` on normalised (whitened) singular-value energy: every layer
keeps the fewest values that discard at most a fraction ``t`` of its energy, and is factored only where that
saves parameters (and so MACs). The threshold is bisected over the finitely many values where some layer's rank
changes, each candidate judged by the real error of the whole model, in the dtypes it will be stored in, against
the original on the calibration batches. A layer's energy does not say how much its error moves the model's
output, so each layer the threshold leaves whole is then tried alone on top, at its largest rank that saves, and
kept where the whole model stays within the budget: when nothing is factored, every layer was measured alone and
failed. Only measured configurations are accepted, so the result is within the budget on those batches.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from epcli.checkpoint.inputs import InputSpec, random_inputs
from epcli.convert import collapse_model
from epcli.convert.compress import LayerPlan, factor_in_place, factored, in_model_dtype, layer_plans, offload_layers
from epcli.core.lowrank import DEFAULT_RIDGE
from epcli.errors import UsageError
from epcli.layers.registry import find_ep_layers
from epcli.storage.scratch import ScratchTensors
from epcli.verification.compare import Comparison, VerifySettings
from epcli.verification.model_check import ExpandedOutputs, expanded_outputs
from epcli.verification.samples import sample_batches

__all__ = [
    "ERROR_METRIC",
    "CompressionResult",
    "LayerCompression",
    "compress_against",
    "compress_model",
    "measure_model",
    "reference_outputs",
]

ERROR_METRIC = "max |compressed - original| / max |original| over every output element of the calibration samples"
"""What ``max_error`` bounds: the normwise relative error of the whole model's output (``max_rel_error``)."""


@dataclass(frozen=True)
class LayerCompression:
    """One plain layer: ``rank`` kept per group (None: left whole, as factoring would not pay at the rank the
    budget allows), its full rank, the effective rank of its weight, costs per sample before and after, and
    ``error``: the relative (whitened, with calibration data) Frobenius error of the layer's truncation."""

    path: str
    layer_type: str
    rank: int | None
    full_rank: int
    effective_rank: float
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    error: float


@dataclass(frozen=True)
class CompressionResult:
    """The layers, the whole-model error against the budget, and how both were measured."""

    layers: tuple[LayerCompression, ...]
    method: str  # "whitened" (calibration data given) or "svd"
    max_error: float
    model_max_rel_error: float
    model_max_abs_error: float
    samples: int
    threshold: float | None  # the energy threshold chosen; None: none factors a layer (one may be factored alone)
    evaluations: int  # whole-model measurements made

    @property
    def params_before(self) -> int:
        return sum(layer.params_before for layer in self.layers)

    @property
    def params_after(self) -> int:
        return sum(layer.params_after for layer in self.layers)

    @property
    def macs_before(self) -> int:
        return sum(layer.macs_before for layer in self.layers)

    @property
    def macs_after(self) -> int:
        return sum(layer.macs_after for layer in self.layers)

    @property
    def factored(self) -> tuple[LayerCompression, ...]:
        return tuple(layer for layer in self.layers if layer.rank is not None)

    @property
    def ranks(self) -> dict[str, int]:
        return {layer.path: layer.rank for layer in self.layers if layer.rank is not None}


Calibration = Tensor | Sequence[tuple[Tensor, ...]]


def compress_model(
    model: nn.Module,
    *,
    max_error: float,
    calibration: Calibration | None = None,
    inputs: Sequence[InputSpec] | None = None,
    samples: int = 64,
    batch_size: int = 32,
    seed: int = 0,
    ridge: float = DEFAULT_RIDGE,
) -> tuple[nn.Module, CompressionResult]:
    """A new model (input untouched; EP layers collapsed first; dtype and device kept; eval mode) with plain
    Linear / ConvNd layers replaced by :class:`~epcli.LowRankLinear` / ``LowRankConv{1,2,3}d`` where that saves
    parameters, at ranks keeping the whole model's :data:`ERROR_METRIC` within ``max_error``.

    ``calibration`` (one tensor, batch first, or batches: each a tensor or a tuple of model inputs) is what the error is
    measured on, and whitens each layer's truncation by its own inputs ("whitened"); without it the error is
    measured on ``samples`` seeded random inputs drawn from ``inputs`` and the truncation is plain
    ("svd"). ``max_error=0`` keeps every layer whole (no truncation is exact in floating point). When no layer
    can be factored within the budget, the model comes back whole and ``result.factored`` is empty (the command
    line refuses to write such a file).
    """
    _check_budget(max_error)  # before the reference run
    settings = VerifySettings(samples=samples, batch_size=batch_size, seed=seed, dtype="float64")
    reference = reference_outputs(model, calibration, inputs, settings)
    return compress_against(reference, model, max_error=max_error, whiten=calibration is not None, ridge=ridge)


def reference_outputs(
    model: nn.Module,
    calibration: Calibration | None,
    inputs: Sequence[InputSpec] | None,
    settings: VerifySettings,
    *,
    consume: bool = False,
) -> ExpandedOutputs:
    """The original model's float64 outputs on the calibration batches, or on seeded batches drawn from ``inputs``
    as ``settings`` says: what every candidate is measured against. ``model`` is not touched, unless ``consume``
    (a caller that drops it afterwards): then it is cast in place instead of copied."""
    owned = model if consume else copy.deepcopy(model)
    return expanded_outputs(owned, (), settings, _batches(calibration, inputs, settings))


def compress_against(
    reference: ExpandedOutputs,
    model: nn.Module,
    *,
    max_error: float,
    whiten: bool,
    ridge: float = DEFAULT_RIDGE,
    consume: bool = False,
    scratch: ScratchTensors | None = None,
) -> tuple[nn.Module, CompressionResult]:
    """:func:`compress_model` with the reference outputs given (e.g. to measure an export against them too);
    ``whiten`` whitens each truncation by the layer's inputs on the reference's batches. ``model`` is not touched,
    unless ``consume`` (a caller that drops it afterwards, its EP layers collapsed already): then it is factored in
    place, and no copy of it is ever made.

    Every candidate is measured in the model's own dtype, as it will be stored, with its factored layers views of
    the factors put in the model's place for the measurement (:func:`~epcli.convert.compress.factored`): the
    peak is the collapsed model, its factors (fewer weights than its layers) and one layer's decomposition. With
    ``scratch`` (for a model built from an embedded architecture: see
    :func:`~epcli.convert.compress.offload_layers`), the layers' weights and factors wait there between uses, and
    the peak is one layer's decomposition, or one candidate's factors."""
    _check_budget(max_error)
    if find_ep_layers(model):
        model = collapse_model(model)  # a new model
    elif not consume:
        model = copy.deepcopy(model)
    model.eval()
    if scratch is not None:
        offload_layers(model, scratch)
    settings = VerifySettings(samples=1, dtype="float64")  # the batches are given: only the dtype matters
    plans = layer_plans(model, reference.batches, whiten=whiten, ridge=ridge, scratch=scratch)
    thresholds = sorted({p.tails[r] for p in plans.values() for r in range(1, p.rank_limit + 1)})
    measured: dict[tuple[tuple[str, int], ...], tuple[Comparison, ...]] = {}

    def ranks_at(index: int) -> dict[str, int]:
        if index < 0:
            return {}
        chosen = {path: plan.rank_at(thresholds[index]) for path, plan in plans.items()}
        return {path: rank for path, rank in chosen.items() if rank is not None}

    def measure(ranks: dict[str, int]) -> tuple[Comparison, ...]:
        key = tuple(sorted(ranks.items()))
        if key not in measured:
            with factored(model, plans, ranks) as candidate:
                measured[key] = measure_model(reference, candidate, settings)
        return measured[key]

    def passes(ranks: dict[str, int]) -> bool:
        return _rel(measure(ranks)) <= max_error

    low, high = -1, len(thresholds)  # -1: nothing factored, within any budget but the dtype's rounding
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if passes(ranks_at(middle)) else (low, middle)
    ranks = ranks_at(low)
    for path in sorted(plans, key=lambda path: plans[path].tails[plans[path].rank_limit]):  # least energy lost first
        plan = plans[path]
        if path not in ranks and plan.rank_limit >= 1 and passes({**ranks, path: plan.rank_limit}):
            ranks[path] = plan.rank_limit
    final = measure(ranks)  # measured already, unless nothing passed: then the model as it is
    result = CompressionResult(
        layers=tuple(_layer(plan, ranks.get(path)) for path, plan in plans.items()),
        method="whitened" if whiten else "svd",
        max_error=max_error,
        model_max_rel_error=_rel(final),
        model_max_abs_error=max((c.max_abs_error for c in final), default=0.0),
        samples=final[0].samples if final else 0,
        threshold=None if low < 0 else thresholds[low],
        evaluations=len(measured),
    )
    return factor_in_place(model, plans, ranks), result  # the plans are dropped as their layers are factored


def measure_model(
    reference: ExpandedOutputs, candidate: nn.Module, settings: VerifySettings
) -> tuple[Comparison, ...]:
    """``candidate`` (in its own dtype: float64 inputs are cast to it) against the reference outputs."""
    run: Callable[..., object] = lambda *batch: candidate(*in_model_dtype(candidate, batch))  # noqa: E731
    return reference.compare(run, "compressed", settings)


def _check_budget(max_error: float) -> None:
    if not (math.isfinite(max_error) and max_error >= 0):
        raise UsageError(f"max_error must be a finite number >= 0, got {max_error!r}")


def _rel(comparisons: Sequence[Comparison]) -> float:
    """The budgeted error (NaN, from a non-finite output, never passes)."""
    worst = max((c.max_rel_error for c in comparisons), default=0.0)
    return math.inf if math.isnan(worst) else worst


def _batches(
    calibration: Calibration | None, inputs: Sequence[InputSpec] | None, settings: VerifySettings
) -> list[tuple[Tensor, ...]]:
    if isinstance(calibration, Tensor):
        return sample_batches((calibration,), settings.batch_size)
    if calibration is not None:
        batches = [(batch,) if isinstance(batch, Tensor) else tuple(batch) for batch in calibration]
        if not batches:
            raise UsageError("calibration holds no batches; give at least one sample")
        return batches
    if not inputs:
        raise UsageError("give calibration samples, or the model's input specs (inputs=[InputSpec(shape)])")
    return list(
        random_inputs(inputs, settings.samples, settings.batch_size, settings.seed, dtype=torch.float64)
    )


def _layer(plan: LayerPlan, rank: int | None) -> LayerCompression:
    return LayerCompression(
        path=plan.path,
        layer_type=plan.layer_type,
        rank=rank,
        full_rank=plan.full_rank,
        effective_rank=plan.effective_rank,
        params_before=plan.params,
        params_after=plan.params if rank is None else plan.factored_params(rank),
        macs_before=plan.macs,
        macs_after=plan.macs if rank is None else plan.factored_macs(rank),
        error=0.0 if rank is None else math.sqrt(plan.tails[rank]),
    )

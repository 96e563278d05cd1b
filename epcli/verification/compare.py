"""Seeded random-input (or given-input) comparisons of an expanded model against its collapsed form.

Pure computation: callers hand in callables (torch modules, an onnxruntime
session, collapsed weights) and get a frozen :class:`VerifyReport` back. Nothing
here reads files or prints.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from epcli.checkpoint.inputs import InputSpec, random_inputs, tensor_leaves
from epcli.checkpoint.user_code import run_forward
from epcli.devices import resolve_device
from epcli.errors import ModelInputError, ShapeMismatchError, UsageError
from epcli.limits import MAX_CHECK_BYTES, MAX_SAMPLES, is_int
from epcli.text import plural, quote

__all__ = [
    "BUDGET_RULE",
    "DEFAULT_TOLERANCES",
    "PASS_RULE",
    "STORAGE_TOLERANCES",
    "SUPPORTED_DTYPES",
    "Comparison",
    "Tolerance",
    "VerifyReport",
    "VerifySettings",
    "compare",
    "compare_outputs",
    "fit_batch",
    "least_precise",
    "random_batches",
    "seeded_batches",
]

PASS_RULE = "|collapsed - expanded| <= atol + rtol * |expanded|, for every element"
BUDGET_RULE = "max |compressed - expanded| / max |expanded| <= max_error, for every output"
"""How a compressed artifact is judged: by the budget it was compressed to (``max_error``), not atol / rtol."""


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float


DEFAULT_TOLERANCES: dict[str, Tolerance] = {
    # float32: a collapsed chain rounds differently from the expanded one; outputs are O(1)-O(10)
    "float32": Tolerance(atol=1e-4, rtol=1e-4),
    "float64": Tolerance(atol=1e-10, rtol=1e-9),
}
SUPPORTED_DTYPES = {"float32": torch.float32, "float64": torch.float64}

STORAGE_TOLERANCES: dict[str, Tolerance] = {
    # 8 machine epsilons (bfloat16 eps 2**-7, float16 eps 2**-10): a collapsed weight stored in the dtype is
    # rounded once (relative error <= eps / 2), and an output sums many such products; measured worst errors
    # are 0.15-2.2 eps (test zoo; a 4-layer CNN), 3.6x or more below these (docs/benchmarks.md, "Precision")
    "bfloat16": Tolerance(atol=2.0**-4, rtol=2.0**-4),
    "float16": Tolerance(atol=2.0**-7, rtol=2.0**-7),
}
"""Default tolerances for a model *stored* in a low-precision dtype, whatever dtype the comparison runs in."""


@dataclass(frozen=True)
class VerifySettings:
    """How many seeded standard-normal inputs, in which dtype, judged at which tolerance."""

    samples: int = 64
    batch_size: int = 32
    seed: int = 0
    dtype: str = "float32"
    atol: float | None = None
    rtol: float | None = None
    device: str = "cpu"
    model_dtype: str | None = None
    """The dtype the model is stored in; a bfloat16/float16 model loosens the default tolerances to its own."""

    def __post_init__(self) -> None:
        if self.dtype not in SUPPORTED_DTYPES:
            raise UsageError(f"dtype must be one of {sorted(SUPPORTED_DTYPES)}, got {self.dtype!r}")
        for name in ("samples", "batch_size"):
            value = getattr(self, name)
            if not is_int(value) or not 1 <= value <= MAX_SAMPLES:
                raise UsageError(
                    f"{name} must be a whole number from 1 to {MAX_SAMPLES} (epcli's limit), got {quote(value)}"
                )
        for name in ("atol", "rtol"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise UsageError(f"{name} must be a finite number >= 0, got {value!r}")
        resolve_device(self.device)  # fail before any work, not at the first batch

    def for_model(self, tensors: Iterable[Tensor]) -> VerifySettings:
        """These settings with ``model_dtype`` set from the model's floating tensors: the least precise one."""
        least = least_precise(tensors)
        return self if least is None else replace(self, model_dtype=str(least).removeprefix("torch."))

    @property
    def tolerance(self) -> Tolerance:
        default = DEFAULT_TOLERANCES[self.dtype]
        storage = STORAGE_TOLERANCES.get(self.model_dtype or "")
        if storage is not None:
            default = Tolerance(max(default.atol, storage.atol), max(default.rtol, storage.rtol))
        return Tolerance(
            atol=default.atol if self.atol is None else self.atol,
            rtol=default.rtol if self.rtol is None else self.rtol,
        )

    @property
    def torch_dtype(self) -> torch.dtype:
        return SUPPORTED_DTYPES[self.dtype]

    @property
    def torch_device(self) -> torch.device:
        return resolve_device(self.device)


@dataclass(frozen=True)
class Comparison:
    """Errors of one candidate against its reference over all samples.

    Relative errors are normwise (error over the reference's magnitude), so they
    stay finite where single reference elements are zero. ``min_atol`` is the
    smallest atol that would pass at the given rtol.
    """

    name: str
    scope: str  # "layer" or "model"
    candidate: str
    samples: int
    max_abs_error: float
    mean_abs_error: float
    max_rel_error: float
    mean_rel_error: float
    min_atol: float
    passed: bool


@dataclass(frozen=True)
class VerifyReport:
    """The comparisons made, and what a reader needs to judge them.

    ``model_check_skipped`` says why the whole model was not compared (None when it
    was), so "all passed" is never read as covering more than it did; ``notes`` are
    facts that qualify the numbers (a stale artifact, a precision bound).
    """

    settings: VerifySettings
    tolerance: Tolerance
    comparisons: tuple[Comparison, ...]
    model_check_skipped: str | None = None
    notes: tuple[str, ...] = ()
    max_error: float | None = None
    """The budget a compressed artifact is judged by (:data:`BUDGET_RULE`); None: ``tolerance`` (:data:`PASS_RULE`)."""

    @property
    def pass_rule(self) -> str:
        return PASS_RULE if self.max_error is None else BUDGET_RULE

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.comparisons)

    @property
    def failures(self) -> tuple[Comparison, ...]:
        return tuple(c for c in self.comparisons if not c.passed)


COMPARE_BYTES = 5 * 8
"""Bytes per output element that comparing a batch costs: both sides, the error, the magnitude and the excess over
rtol, all in float64 (:class:`_Errors`)."""


def fit_batch(settings: VerifySettings, *, run_bytes: int, held_bytes: int, what: str) -> VerifySettings:
    """``settings`` with a batch size that keeps a check within :data:`~epcli.limits.MAX_CHECK_BYTES`.

    A check holds ``held_bytes`` per sample for all its samples (the inputs and expected outputs kept to compare
    against) and runs batches that cost ``run_bytes`` per sample (every module's output, the comparison's
    temporaries). What does not fit with a batch of one is refused, naming ``what`` (the inputs) and the budget:
    a :class:`UsageError` when fewer samples would fit (the count is the caller's: ``--samples``, or the samples of
    ``--inputs``), a :class:`ModelInputError` when one sample alone does not (the input's shape is too big).
    """
    held = settings.samples * held_bytes
    batch = (MAX_CHECK_BYTES - held) // max(run_bytes, 1)
    if batch < 1:
        fitting = (MAX_CHECK_BYTES - run_bytes) // held_bytes if held_bytes else 0  # samples a batch of one allows
        count = settings.samples if fitting >= 1 else 1
        holding = (
            f"{count * held_bytes / 2**20:.0f} MiB to hold the inputs and outputs of {plural(count, 'sample')} and "
            if held else ""
        )
        skip = ", or skip the whole-model check (collapse --no-model-check)" if held else ""
        needs = (
            f"a check on {what} needs {holding}{run_bytes / 2**20:.0f} MiB per sample for a forward pass (every "
            "module's output and the comparison's float64 copies), more than a "
            f"check's memory budget of {MAX_CHECK_BYTES // 2**20} MiB (epcli's limit, MAX_CHECK_BYTES)"
        )
        if fitting >= 1:
            raise UsageError(f"{needs}; give fewer samples (--samples, or fewer in the --inputs file): {fitting} fit{skip}")
        raise ModelInputError(f"{needs}, even with one sample; give a smaller input shape{skip}")
    return replace(settings, batch_size=min(settings.batch_size, batch))


def seeded_batches(specs: Sequence[InputSpec], settings: VerifySettings) -> Iterator[tuple[Tensor, ...]]:
    """The check's inputs drawn from ``specs``: ``settings.samples`` in batches, seeded, in the check's dtype
    and on its device (:func:`~epcli.checkpoint.inputs.random_inputs`)."""
    return random_inputs(
        specs,
        settings.samples,
        settings.batch_size,
        settings.seed,
        dtype=settings.torch_dtype,
        device=settings.torch_device,
    )


def random_batches(input_shape: Sequence[int], settings: VerifySettings) -> Iterator[Tensor]:
    """Standard-normal batches ``[b, *input_shape]``, the same for the same seed on every machine.

    Drawn in float64 on the CPU and cast, so float32 and float64 runs (and every device) see the same values.
    """
    for (batch,) in seeded_batches((InputSpec(tuple(input_shape)),), settings):
        yield batch


def compare(
    name: str,
    scope: str,
    candidate_label: str,
    reference: Callable[[Tensor], Tensor],
    candidate: Callable[[Tensor], Tensor],
    input_shape: Sequence[int],
    settings: VerifySettings,
) -> Comparison:
    """Run both callables on the same seeded batches and measure how far apart they are."""
    (comparison,) = compare_outputs(
        name, scope, candidate_label, reference, candidate, (InputSpec(tuple(input_shape)),), settings
    )
    return comparison


def compare_outputs(
    name: str,
    scope: str,
    candidate_label: str,
    reference: Callable[..., Any],
    candidate: Callable[..., Any],
    inputs: Sequence[InputSpec] | Sequence[tuple[Tensor, ...]],
    settings: VerifySettings,
) -> tuple[Comparison, ...]:
    """Both callables on the same batches, one :class:`Comparison` per tensor in the output.

    ``inputs`` are specs (seeded batches are drawn from them, ``settings.samples`` in all)
    or the batches themselves (e.g. a user's samples, one tensor per model input, batch first).
    A tensor output is compared as ``name``; the leaves of a tuple / dict / dataclass
    output as ``name`` plus their path (``<model>[0]``, ``<model>.logits``).
    """
    if inputs and all(isinstance(spec, InputSpec) for spec in inputs):
        specs = [spec for spec in inputs if isinstance(spec, InputSpec)]
        batches: Iterable[tuple[Tensor, ...]] = seeded_batches(specs, settings)
    else:
        batches = [tuple(batch) for batch in inputs if isinstance(batch, tuple)]
    tolerance = settings.tolerance
    errors: dict[str, _Errors] = {}
    samples = 0
    with torch.no_grad():
        for batch in batches:
            samples += batch[0].shape[0]
            expected = tensor_leaves(run_forward(reference, *batch, doing=f"computing {name}"))
            produced = run_forward(candidate, *batch, doing=f"computing {name}")
            if not expected:
                raise ShapeMismatchError(f"{name}: the expanded model's output holds no tensors")
            if _positional(produced) and len(produced) == len(expected):
                got = {path: tensor for (path, _), tensor in zip(expected, produced, strict=True)}
            else:
                got = dict(tensor_leaves(produced))
            if set(got) != {path for path, _ in expected}:
                raise ShapeMismatchError(
                    f"{name}: {candidate_label} gives outputs {sorted(got)}, expanded gives "
                    f"{[path for path, _ in expected]}"
                )
            for path, want in expected:
                errors.setdefault(path, _Errors()).add(f"{name}{path}", candidate_label, got[path], want, tolerance)
    return tuple(
        errors[path].comparison(f"{name}{path}", scope, candidate_label, samples, tolerance) for path in errors
    )


def _positional(output: Any) -> bool:
    """A plain tuple of tensors: what an ONNX session returns when its outputs are not named by their paths
    (another exporter's file), paired with the leaves in order (a model's own tuple output pairs the same way)."""
    return type(output) is tuple and all(isinstance(t, Tensor) for t in output)


@dataclass
class _Errors:
    """Running error sums of one output tensor over the batches."""

    max_abs: float = 0.0
    sum_abs: float = 0.0
    max_ref: float = 0.0
    sum_ref: float = 0.0
    min_atol: float = 0.0
    count: int = 0
    finite: bool = True

    def add(self, name: str, label: str, got: Tensor, expected: Tensor, tolerance: Tolerance) -> None:
        if got.shape != expected.shape:
            raise ShapeMismatchError(
                f"{name}: {label} gives shape {tuple(got.shape)}, expanded gives {tuple(expected.shape)}"
            )
        expected, got = expected.to("cpu", torch.float64), got.to("cpu", torch.float64)
        error = (got - expected).abs()
        if error.numel() == 0:
            return
        self.finite = self.finite and bool(torch.isfinite(error).all())
        magnitude = expected.abs()
        self.max_abs = max(self.max_abs, float(error.max()))
        self.sum_abs += float(error.sum())
        self.max_ref = max(self.max_ref, float(magnitude.max()))
        self.sum_ref += float(magnitude.sum())
        self.min_atol = max(self.min_atol, float((error - tolerance.rtol * magnitude).max()))
        self.count += error.numel()

    def comparison(self, name: str, scope: str, label: str, samples: int, tolerance: Tolerance) -> Comparison:
        if not self.finite:
            nan = float("nan")
            return Comparison(name, scope, label, samples, nan, nan, nan, nan, nan, False)
        count = max(self.count, 1)
        return Comparison(
            name=name,
            scope=scope,
            candidate=label,
            samples=samples,
            max_abs_error=self.max_abs,
            mean_abs_error=self.sum_abs / count,
            max_rel_error=self.max_abs / self.max_ref if self.max_ref > 0 else self.max_abs,
            mean_rel_error=self.sum_abs / self.sum_ref if self.sum_ref > 0 else self.sum_abs / count,
            min_atol=max(self.min_atol, 0.0),
            passed=self.min_atol <= tolerance.atol,
        )


def least_precise(tensors: Iterable[Tensor]) -> torch.dtype | None:
    """The dtype of the least precise floating tensor (largest epsilon); None when none is floating."""
    floating = {t.dtype for t in tensors if t.is_floating_point()}
    return max(floating, key=lambda dtype: torch.finfo(dtype).eps) if floating else None

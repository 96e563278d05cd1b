"""Seeded random-input comparisons of an expanded model against its collapsed form.

Pure computation: callers hand in callables (torch modules, an onnxruntime
session, collapsed weights) and get a frozen :class:`VerifyReport` back. Nothing
here reads files or prints.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from epcli.devices import resolve_device
from epcli.errors import ShapeMismatchError, UsageError

__all__ = [
    "DEFAULT_TOLERANCES",
    "PASS_RULE",
    "STORAGE_TOLERANCES",
    "SUPPORTED_DTYPES",
    "Comparison",
    "Tolerance",
    "VerifyReport",
    "VerifySettings",
    "compare",
    "random_batches",
]

PASS_RULE = "|collapsed - expanded| <= atol + rtol * |expanded|, for every element"


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
    # are 0.15-2.2 eps (test zoo; a 4-layer CNN), 3.6x or more below these (README, "Precision ...")
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
        if self.samples < 1 or self.batch_size < 1:
            raise UsageError("samples and batch_size must be >= 1")
        for name in ("atol", "rtol"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise UsageError(f"{name} must be a finite number >= 0, got {value!r}")
        resolve_device(self.device)  # fail before any work, not at the first batch

    def for_model(self, tensors: Iterable[Tensor]) -> VerifySettings:
        """These settings with ``model_dtype`` set from the model's floating tensors: the least precise one."""
        floating = {t.dtype for t in tensors if t.is_floating_point()}
        if not floating:
            return self
        least = max(floating, key=lambda dtype: torch.finfo(dtype).eps)
        return replace(self, model_dtype=str(least).removeprefix("torch."))

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

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.comparisons)

    @property
    def failures(self) -> tuple[Comparison, ...]:
        return tuple(c for c in self.comparisons if not c.passed)


def random_batches(input_shape: Sequence[int], settings: VerifySettings) -> Iterator[Tensor]:
    """Standard-normal batches ``[b, *input_shape]``, the same for the same seed on every machine.

    Drawn in float64 on the CPU and cast, so float32 and float64 runs (and every device) see the same values.
    """
    device = settings.torch_device
    generator = torch.Generator().manual_seed(settings.seed)
    remaining = settings.samples
    while remaining > 0:
        size = min(settings.batch_size, remaining)
        batch = torch.randn((size, *input_shape), generator=generator, dtype=torch.float64)
        yield batch.to(device=device, dtype=settings.torch_dtype)
        remaining -= size


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
    tolerance = settings.tolerance
    max_abs = sum_abs = max_ref = sum_ref = 0.0
    min_atol = 0.0
    count = 0
    finite = True
    with torch.no_grad():
        for batch in random_batches(input_shape, settings):
            expected = reference(batch).to("cpu", torch.float64)
            got = candidate(batch).to("cpu", torch.float64)
            if got.shape != expected.shape:
                raise ShapeMismatchError(
                    f"{name}: {candidate_label} gives shape {tuple(got.shape)}, expanded gives {tuple(expected.shape)}"
                )
            error = (got - expected).abs()
            finite = finite and bool(torch.isfinite(error).all())
            magnitude = expected.abs()
            max_abs = max(max_abs, float(error.max()))
            sum_abs += float(error.sum())
            max_ref = max(max_ref, float(magnitude.max()))
            sum_ref += float(magnitude.sum())
            min_atol = max(min_atol, float((error - tolerance.rtol * magnitude).max()))
            count += error.numel()
    if not finite:
        nan = float("nan")
        return Comparison(name, scope, candidate_label, settings.samples, nan, nan, nan, nan, nan, False)
    return Comparison(
        name=name,
        scope=scope,
        candidate=candidate_label,
        samples=settings.samples,
        max_abs_error=max_abs,
        mean_abs_error=sum_abs / count,
        max_rel_error=max_abs / max_ref if max_ref > 0 else max_abs,
        mean_rel_error=sum_abs / sum_ref if sum_ref > 0 else sum_abs / count,
        min_atol=max(min_atol, 0.0),
        passed=min_atol <= tolerance.atol,
    )

"""The expanded model's side of a whole-model check: the batches it runs on, cut to the memory budget, and its
outputs, taken before the model is collapsed or freed."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from epcli.checkpoint.inputs import InputSpec, describe_inputs, tensor_leaves
from epcli.checkpoint.user_code import run_forward
from epcli.convert import expanded_eval
from epcli.errors import EpcliError, ModelInputError
from epcli.text import quote
from epcli.verification.compare import (
    COMPARE_BYTES,
    Comparison,
    VerifySettings,
    compare_outputs,
    fit_batch,
    seeded_batches,
)

__all__ = ["ExpandedOutputs", "drawn_batches", "expanded_outputs", "rejected_inputs", "sample_bytes"]


@dataclass(frozen=True)
class ExpandedOutputs:
    """The expanded model's outputs on the comparison's batches, taken before the model is collapsed in place:
    what a candidate (the collapsed model, an ONNX session) is compared against once the expanded model is gone."""

    batches: Sequence[tuple[Tensor, ...]]
    outputs: Sequence[object]
    batch_size: int
    """The largest batch the memory budget allows while these are held (:func:`~.compare.fit_batch`)."""

    def compare(
        self, candidate: Callable[..., object], label: str, settings: VerifySettings, name: str = "<model>"
    ) -> tuple[Comparison, ...]:
        outputs = iter(self.outputs)
        return compare_outputs(name, "model", label, lambda *batch: next(outputs), candidate, self.batches, settings)


def expanded_outputs(
    model: nn.Module,
    specs: Sequence[InputSpec],
    settings: VerifySettings,
    batches: Sequence[tuple[Tensor, ...]] | None = None,
) -> ExpandedOutputs:
    """``model`` (one nobody else holds: cast in place, left in eval mode) run expanded on ``batches`` (the
    user's samples), or on seeded batches drawn from ``specs`` as
    :func:`~epcli.verification.compare.compare_outputs` draws them."""
    model.to(device=settings.torch_device, dtype=settings.torch_dtype).eval()
    with rejected_inputs(specs, batches), expanded_eval(model) as reference, torch.no_grad():
        settings, drawn = drawn_batches(model, reference, specs, settings, batches)
        return ExpandedOutputs(drawn, [run_forward(reference, *batch) for batch in drawn], settings.batch_size)


@contextlib.contextmanager
def rejected_inputs(specs: Sequence[InputSpec], batches: Sequence[tuple[Tensor, ...]] | None) -> Iterator[None]:
    """The model's own errors on its inputs as a :class:`ModelInputError` saying what it takes."""
    try:
        yield
    except (IndexError, RuntimeError) as e:  # an id beyond an embedding, a dtype a kernel does not take
        given = "the given samples" if batches is not None else "its inputs"
        if specs:
            described = f"{describe_inputs(specs)}: each input's dtype and, for integers, its range [low, high)"
        else:  # samples without specs (compress_model's calibration): what they are
            described = "; ".join(f"{t.dtype} {list(t.shape)}" for t in (batches or [()])[0]) or "no inputs"
        raise ModelInputError(
            f"the model rejected {given} ({described}): {quote(f'{type(e).__name__}: {e}', 300)}; give inputs in "
            "the shape, dtype and range the model takes (e.g. token ids in [0, vocab_size) as int64)"
        ) from e


def drawn_batches(
    model: nn.Module,
    reference: Callable[..., object],
    specs: Sequence[InputSpec],
    settings: VerifySettings,
    batches: Sequence[tuple[Tensor, ...]] | None,
) -> tuple[VerifySettings, list[tuple[Tensor, ...]]]:
    """The settings with the batch size the budget allows for ``reference`` (running ``model``), and the batches of
    the check: ``batches`` (the user's samples) cut to it, or seeded batches drawn from ``specs``."""
    if batches:  # the user's samples (their specs may not be given): the first one stands for all
        prototype = list(_moved(tuple(t[:1] for t in batches[0]), settings))
        what = f"the given samples ({', '.join(str(list(t.shape[1:])) for t in prototype)})"
    else:
        prototype = [spec.example(1, dtype=settings.torch_dtype, device=settings.torch_device) for spec in specs]
        what = describe_inputs(specs)

    def examples(size: int) -> list[Tensor]:  # an empty batch, or one sample
        return [t[:size] for t in prototype]

    run, held = sample_bytes(model, reference, examples)
    settings = fit_batch(settings, run_bytes=run, held_bytes=held, what=what)
    if batches is not None:
        return settings, [_moved(batch, settings) for batch in _rebatched(batches, settings.batch_size)]
    return settings, list(seeded_batches(specs, settings))


def _rebatched(batches: Sequence[tuple[Tensor, ...]], size: int) -> list[tuple[Tensor, ...]]:
    """The given batches cut into batches of at most ``size`` samples."""
    return [
        tuple(t[start : start + size] for t in batch) for batch in batches for start in range(0, batch[0].shape[0], size)
    ]


def _per_sample(tensor: Tensor) -> int:
    """Bytes of one sample of a tensor computed on an empty batch (the batch axis, wherever it is, counted as 1)."""
    return math.prod(max(size, 1) for size in tensor.shape) * tensor.element_size()


def sample_bytes(
    model: nn.Module, call: Callable[..., object], examples: Callable[[int], list[Tensor]]
) -> tuple[int, int]:
    """(run, held) bytes per sample of a check of ``call`` (which runs ``model``), from one call on an empty batch
    of ``examples`` (on one sample when the forward cannot take an empty batch, as a reshape with ``-1``
    cannot): while a batch runs, every module's output, the inputs as drawn (float64) and the comparison's
    temporaries; held for the whole check, the inputs and the outputs."""
    outputs = [0]

    def hook(module: nn.Module, args: object, output: object) -> None:
        outputs[0] += sum(_per_sample(t) for _, t in tensor_leaves(output))

    def measure(batch: int) -> tuple[list[Tensor], list[tuple[str, Tensor]]]:
        outputs[0] = 0
        inputs = examples(batch)
        return inputs, tensor_leaves(run_forward(call, *inputs))

    handles = [module.register_forward_hook(hook) for module in model.modules()]
    try:
        try:
            given, leaves = measure(0)
        except EpcliError:
            raise
        except Exception:  # the forward's own error on an empty batch: one sample says the same
            given, leaves = measure(1)
    finally:
        for handle in handles:
            handle.remove()
    inputs = sum(_per_sample(t) for t in given)
    returned = sum(_per_sample(t) for _, t in leaves)
    compared = sum(_per_sample(t) // t.element_size() for _, t in leaves) * COMPARE_BYTES
    drawn = sum(_per_sample(t) // t.element_size() for t in given) * 8
    return outputs[0] + drawn + compared, inputs + returned


def _moved(batch: tuple[Tensor, ...], settings: VerifySettings) -> tuple[Tensor, ...]:
    """A user's batch on the comparison's device, floating tensors in its dtype."""
    return tuple(
        t.to(device=settings.torch_device, dtype=settings.torch_dtype if t.is_floating_point() else t.dtype)
        for t in batch
    )

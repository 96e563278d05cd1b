"""What a model takes and gives: input specs, the inputs made from them, and the tensors of any output.

Every place that feeds a model (``save_checkpoint``'s probe, ``verify``, the model
check of ``collapse``, ONNX export) builds its inputs here, from one
:class:`InputSpec` per model input: a float sample shape (``InputSpec((3, 224, 224))``),
token ids in ``[low, high)`` (``InputSpec((16,), torch.int64, 0, 50257)``), or several.
Outputs may be a tensor or tuples / lists / dicts / dataclasses of tensors;
:func:`tensor_leaves` names each tensor by its path (``[0]``, ``.logits``): the one
flattening, which ONNX export names its outputs by and :class:`Leaves` carries back.
"""

from __future__ import annotations

import dataclasses
import numbers
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from epcli.errors import ConfigError
from epcli.limits import MAX_RANK, check_count, check_sample_shape, is_int
from epcli.text import quote

__all__ = [
    "INPUT_DTYPES",
    "MAX_INPUTS",
    "InputSpec",
    "Leaves",
    "describe_inputs",
    "input_specs",
    "parse_input",
    "plain_input",
    "random_inputs",
    "sample_shape",
    "tensor_leaves",
]

INPUT_DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "bool": torch.bool,
}
"""The dtypes a model input may have, by the names specs use in files and on the command line."""

MAX_INPUTS = 64
"""Inputs one model may take (a guard against hostile metadata)."""

_BOUND = 2.0**53
"""|low|, |high| at most this: every such integer is exact in float64, and ranges stay finite."""


def sample_shape(value: Any, what: str = "input_shape", *, scalar: bool = False) -> tuple[int, ...]:
    """A per-sample shape (no batch dim): a non-empty sequence of ints >= 1 (an int means a 1-D shape), or with
    ``scalar`` also ``()``: one number per sample, as a diffusion model's timestep of shape ``[batch]``.

    At most :data:`~epcli.limits.MAX_SAMPLE_ELEMENTS` elements, so a shape of
    ``2**70`` from a file is refused before any input is made for it.
    """
    items = [value] if is_int(value) else value
    if (
        isinstance(items, (str, bytes)) or not isinstance(items, (Sequence, torch.Size)) or not (items or scalar)
        or not all(is_int(v) and v >= 1 for v in items)
    ):
        kind = "a list of ints >= 1 such as [64], [1, 8, 8] or [] (one number per sample)" if scalar else (
            "a non-empty list of ints >= 1 such as [64] or [1, 8, 8]"
        )
        raise ConfigError(
            f"{what} must be the shape of one sample without the batch dimension, {kind}, got {quote(value)}"
        )
    if len(items) > MAX_RANK:
        raise ConfigError(f"{what} has {len(items)} dimensions, over epcli's limit of {MAX_RANK}")
    check_sample_shape(items, what)
    return tuple(int(v) for v in items)


@dataclass(frozen=True)
class InputSpec:
    """One model input: the shape of one sample (no batch dimension; ``()`` for one number per sample, as a
    timestep), its dtype, and the range of its values.

    Floating inputs are standard normal unless ``low`` / ``high`` bound them (then
    uniform in ``[low, high)``); integer inputs need both (ids in ``[low, high)``,
    e.g. ``InputSpec((16,), torch.int64, 0, 50257)`` for 16 tokens of GPT-2's vocabulary).
    """

    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32
    low: float | None = None
    high: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", sample_shape(self.shape, "InputSpec.shape", scalar=True))
        if self.dtype not in INPUT_DTYPES.values():
            given = f"the string {quote(self.dtype)}" if isinstance(self.dtype, str) else quote(self.dtype)
            raise ConfigError(
                f"InputSpec.dtype must be a torch dtype, one of {', '.join(f'torch.{n}' for n in sorted(INPUT_DTYPES))}; "
                f"got {given}"
            )
        if (self.low is None) != (self.high is None):
            raise ConfigError("InputSpec: give both low and high (values in [low, high)) or neither")
        if self.low is None or self.high is None:
            if self.dtype == torch.bool:
                object.__setattr__(self, "low", 0)
                object.__setattr__(self, "high", 2)
            elif not self.dtype.is_floating_point:
                raise ConfigError(
                    f"an integer input ({self.name}) needs its range: InputSpec(shape, {self.name}, low, high) for "
                    "values in [low, high), e.g. token ids 0..vocab_size"
                )
            return
        for bound in (self.low, self.high):
            if not isinstance(bound, numbers.Real) or isinstance(bound, bool) or not abs(bound) <= _BOUND:
                raise ConfigError(f"InputSpec low and high must be finite numbers up to 2**53, got {quote(bound)}")
        if not self.dtype.is_floating_point and not (is_int(self.low) and is_int(self.high)):
            raise ConfigError(f"an integer input's low and high must be integers, got {self.low!r}, {self.high!r}")
        if not self.low < self.high:
            raise ConfigError(f"InputSpec needs low < high (values in [low, high)), got [{self.low}, {self.high})")
        if not self.dtype.is_floating_point and self.dtype != torch.bool:
            info = torch.iinfo(self.dtype)
            if self.low < info.min or self.high - 1 > info.max:
                raise ConfigError(
                    f"[{self.low}, {self.high}) does not fit {self.name} ({info.min}..{info.max})"
                )

    @property
    def name(self) -> str:
        """The dtype's name, as specs write it (``"int64"``)."""
        return str(self.dtype).removeprefix("torch.")

    @property
    def is_float(self) -> bool:
        return self.dtype.is_floating_point

    def example(self, batch: int, *, dtype: torch.dtype | None = None, device: torch.device | None = None) -> Tensor:
        """A batch of one constant in range (0 when allowed, else ``low``): for probing shapes, not for checks."""
        value = 0.0 if self.low is None or self.low <= 0 < (self.high or 0) else self.low
        target = dtype if dtype is not None and self.is_float else self.dtype
        return torch.full((batch, *self.shape), value, dtype=target, device=device)

    def sample(self, batch: int, generator: torch.Generator, *, dtype: torch.dtype | None = None) -> Tensor:
        """Seeded values on the CPU (the same on every machine): floats drawn in float64 and cast to ``dtype``."""
        size = (batch, *self.shape)
        if not self.is_float:
            assert self.low is not None and self.high is not None  # set for every non-float spec
            drawn = torch.randint(int(self.low), int(self.high), size, generator=generator, dtype=torch.int64)
            return drawn.to(self.dtype)
        if self.low is None or self.high is None:
            values = torch.randn(size, generator=generator, dtype=torch.float64)
        else:
            values = self.low + (self.high - self.low) * torch.rand(size, generator=generator, dtype=torch.float64)
        return values.to(dtype or self.dtype)

    def to_dict(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "dtype": self.name, "low": self.low, "high": self.high}

    @classmethod
    def from_dict(cls, data: Any, where: str = "input") -> InputSpec:
        """A spec read from a file; :class:`ConfigError` names ``where`` and the field."""
        if not isinstance(data, dict) or set(data) != {"shape", "dtype", "low", "high"}:
            found = quote(sorted(data)) if isinstance(data, dict) else type(data).__name__
            raise ConfigError(f"{where} must be an object with keys dtype, high, low, shape; got {found}")
        dtype = INPUT_DTYPES.get(data["dtype"]) if isinstance(data["dtype"], str) else None
        if dtype is None:
            raise ConfigError(f"{where}: dtype must be one of {sorted(INPUT_DTYPES)}, got {quote(data['dtype'])}")
        try:
            return cls(sample_shape(data["shape"], f"{where}: shape", scalar=True), dtype, data["low"], data["high"])
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None

    def __str__(self) -> str:
        text = f"{self.name}[{','.join(map(str, self.shape))}]"
        return text if self.low is None or self.dtype == torch.bool else f"{text}:{self.low:g}:{self.high:g}"


def plain_input(specs: Sequence[InputSpec]) -> bool:
    """One float32 input of standard-normal samples with at least one dimension: what ``input_shape`` alone says."""
    return len(specs) == 1 and specs[0] == InputSpec(specs[0].shape) and bool(specs[0].shape)


def describe_inputs(specs: Sequence[InputSpec], equals: str = "=") -> str:
    """``input_shape=[3, 8, 8]`` for one plain float32 input (as users write it), else ``inputs=[int64[16]:0:9]``."""
    if plain_input(specs):
        return f"input_shape{equals}{list(specs[0].shape)}"
    return f"inputs{equals}[{', '.join(map(str, specs))}]"


def input_specs(input_shape: Any = None, inputs: Sequence[InputSpec] | None = None) -> tuple[InputSpec, ...]:
    """The specs from exactly one of ``input_shape`` (one float32 input) and ``inputs``."""
    if (input_shape is None) == (inputs is None):
        raise ConfigError(
            "give exactly one of input_shape= (one float input, e.g. (3, 224, 224)) and inputs=[InputSpec(...), ...]"
        )
    if inputs is None:
        return (InputSpec(sample_shape(input_shape)),)
    if isinstance(inputs, InputSpec) or not isinstance(inputs, Sequence) or not inputs:
        raise ConfigError(f"inputs must be a non-empty list of InputSpec, one per model input, got {quote(inputs)}")
    check_count(len(inputs), MAX_INPUTS, "the number of model inputs")
    bad = [i for i, spec in enumerate(inputs) if not isinstance(spec, InputSpec)]
    if bad:
        raise ConfigError(f"inputs[{bad[0]}] is a {type(inputs[bad[0]]).__name__}, not an InputSpec")
    return tuple(inputs)


_SPEC_TEXT = re.compile(r"^\s*(?P<dtype>[a-z0-9]+)\[(?P<shape>[0-9,\s]*)\](?::(?P<low>[^:]+):(?P<high>[^:]+))?\s*$")


def parse_input(text: str) -> InputSpec:
    """``"float32[3,224,224]"``, ``"int64[16]:0:50257"`` (values in [0, 50257)), ``"int64[]:0:1000"`` (one
    number per sample, e.g. a timestep) or ``"3,224,224"`` (float32)."""
    if re.fullmatch(r"\s*[0-9][0-9,\s]*", text):
        text = f"float32[{text}]"
    match = _SPEC_TEXT.match(text)
    example = (
        "write DTYPE[D1,D2,...] or DTYPE[D1,...]:LOW:HIGH, e.g. float32[3,224,224] or int64[16]:0:50257 "
        "(DTYPE[] for one number per sample, e.g. int64[]:0:1000)"
    )
    if match is None:
        raise ConfigError(f"input spec {text!r} is not understood; {example}")
    dtype = INPUT_DTYPES.get(match["dtype"])
    if dtype is None:
        raise ConfigError(f"input spec {text!r}: dtype {match['dtype']!r} is not one of {sorted(INPUT_DTYPES)}")
    try:
        shape = [int(part) for part in match["shape"].split(",")] if match["shape"].strip() else []
        low = high = None
        if match["low"] is not None:
            number = float if dtype.is_floating_point else int
            low, high = number(match["low"]), number(match["high"])
    except ValueError:
        raise ConfigError(f"input spec {text!r}: sizes and bounds must be numbers; {example}") from None
    try:
        return InputSpec(sample_shape(shape, "its shape", scalar=True), dtype, low, high)
    except ConfigError as e:
        raise ConfigError(f"input spec {text!r}: {e}") from None


def random_inputs(
    specs: Sequence[InputSpec],
    samples: int,
    batch_size: int,
    seed: int,
    *,
    dtype: torch.dtype,
    device: torch.device | None = None,
) -> Iterator[tuple[Tensor, ...]]:
    """Seeded batches, one tensor per spec; floating inputs in ``dtype`` (the comparison's), the rest as specified.

    One generator for all inputs, batch by batch: a single float spec gives the same
    values as earlier epcli versions gave for an ``input_shape``.
    """
    generator = torch.Generator().manual_seed(seed)
    remaining = samples
    while remaining > 0:
        size = min(batch_size, remaining)
        yield tuple(spec.sample(size, generator, dtype=dtype).to(device) for spec in specs)
        remaining -= size


class Leaves(dict[str, Tensor]):
    """An output already flattened, keyed by its paths (an ONNX session's, whose outputs are named by them):
    :func:`tensor_leaves` takes it as it is, so it is compared path by path with the model's own output."""


def tensor_leaves(output: Any, path: str = "") -> list[tuple[str, Tensor]]:
    """Every tensor in a model output, named by its path: ``""`` for a tensor, ``[0]``, ``.logits``, ``["a b"]``.

    Tuples, lists, dicts (Hugging Face ``ModelOutput`` too) and dataclasses are walked;
    ``None`` and other values (a loss of ``None``, an int) are left out.
    """
    if isinstance(output, Tensor):
        return [(path, output)]
    if isinstance(output, Leaves):
        return [(path + key, value) for key, value in output.items()]
    items: list[tuple[str, Any]]
    if isinstance(output, Mapping):
        items = [(f".{key}" if isinstance(key, str) and key.isidentifier() else f"[{key!r}]", value)
                 for key, value in output.items()]
    elif dataclasses.is_dataclass(output) and not isinstance(output, type):
        items = [(f".{field.name}", getattr(output, field.name)) for field in dataclasses.fields(output)]
    elif isinstance(output, (tuple, list)):
        items = [(f"[{index}]", value) for index, value in enumerate(output)]
    else:
        return []
    return [leaf for suffix, value in items for leaf in tensor_leaves(value, path + suffix)]


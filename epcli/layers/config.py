"""Frozen, validated configurations of EP layers.

A config holds every constructor argument of an EP layer, so a layer can be
rebuilt from it (``to_dict`` / ``from_dict`` carry it through JSON metadata).
Validation lives here, once, for layers built in code and read from files alike.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from epcli.core.conv import PADDING_MODES
from epcli.core.graph import SkipEdge, skip_edges
from epcli.errors import ConfigError
from epcli.limits import is_int

__all__ = [
    "CONFIG_VERSION",
    "RESIDUAL_MODES",
    "WEIGHT_LAYOUTS",
    "EPConfig",
    "EPConv1dConfig",
    "EPConv2dConfig",
    "EPConv3dConfig",
    "EPConvConfig",
    "EPLinearConfig",
]

CONFIG_VERSION = 1
"""Bumped whenever a field's meaning changes or a new field is required.

A new optional field whose default keeps the old meaning (``groups``, ``dilation``,
``padding_mode``, per-dim sizes) leaves it alone, so every file written so far still reads.
"""

RESIDUAL_MODES = ("none", "learn")
WEIGHT_LAYOUTS = ("out_in", "in_out")


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _as_tuple(value: Any) -> Any:
    """An int or a list of ints -> tuple of Python ints; anything else is left for validation to reject."""
    if is_int(value):
        return (int(value),)
    if isinstance(value, (list, tuple)):
        return tuple(int(v) if is_int(v) else v for v in value)
    return value


def _plain(value: Any) -> Any:
    """Tuples (nested too) -> lists, as JSON reads them back."""
    return [_plain(v) for v in value] if isinstance(value, tuple) else value


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)) and math.isfinite(value)


@dataclass(frozen=True, kw_only=True)
class EPConfig:
    """Fields shared by every EP layer; see the subclasses for the rest."""

    layer_type: ClassVar[str] = "EP layer"

    width: float = 1
    depth: int = 2
    bias: bool = True
    batch_norm: bool = False
    residual: bool = False
    residual_intervals: tuple[int, ...] = (2,)
    residual_mode: str = "none"
    collapse_on_eval: bool = True
    negative_slope: float = 0.0
    bn_eps: float = 1e-5
    bn_momentum: float | None = 0.1
    replaced_bias: bool | None = None
    """Whether the plain layer this one replaced had a bias, recorded only where the collapse differs from it
    (``overparameterize(..., allow_new_bias=True)``); None: the collapsed layer is the replaced one's architecture,
    or nothing was replaced."""

    # ---- derived structure -------------------------------------------------
    @property
    def in_dim(self) -> int:
        raise NotImplementedError

    @property
    def out_dim(self) -> int:
        raise NotImplementedError

    @property
    def hidden_dim(self) -> int:
        """Hidden width ``int(out * width)``, as in the original implementation."""
        return int(self.out_dim * self.width)

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        raise NotImplementedError

    @property
    def node_dims(self) -> tuple[int, ...]:
        """Features (channels) of nodes 0 .. depth: input, hidden ..., output."""
        return (self.in_dim, *[self.hidden_dim] * (self.depth - 1), self.out_dim)

    @property
    def skips(self) -> tuple[SkipEdge, ...]:
        """Skip edges (source node, destination node); empty unless ``residual``."""
        return skip_edges(self.depth, self.residual_intervals) if self.residual else ()

    @property
    def learnable_skips(self) -> bool:
        return self.residual and self.residual_mode == "learn"

    @property
    def collapsed_bias(self) -> bool:
        """Whether the collapsed layer has a bias: a layer or projection bias, or a batch-norm shift, contributes one."""
        return self.bias or self.batch_norm

    @property
    def deploy_changes(self) -> tuple[str, ...]:
        """How the collapsed layer's architecture differs from the plain layer this one replaced (empty: none).

        A plain model holding the collapse needs these changes to load it strictly; its original class does not
        have them (``from_pretrained`` drops an unexpected bias, and the deployed model is silently wrong).
        """
        if self.replaced_bias is None or self.replaced_bias == self.collapsed_bias:
            return ()
        if self.collapsed_bias:
            source = "batch-norm's shift" if self.batch_norm and not self.bias else "the EP layer's biases"
            return (f"adds a bias the replaced layer did not have ({source} folds into it)",)
        return ("drops the bias the replaced layer had",)

    # ---- validation ----------------------------------------------------------
    def _fail(self, argument: str, value: Any, requirement: str) -> ConfigError:
        return ConfigError(f"{self.layer_type}: {argument} must be {requirement}, got {_describe(value)}")

    def _require_int(self, argument: str, minimum: int) -> None:
        value = getattr(self, argument)
        if not is_int(value) or value < minimum:
            raise self._fail(argument, value, f"an int >= {minimum}")
        object.__setattr__(self, argument, int(value))  # NumPy ints -> int, for JSON metadata

    def __post_init__(self) -> None:
        if self.replaced_bias is not None and not isinstance(self.replaced_bias, (bool, np.bool_)):
            raise self._fail("replaced_bias", self.replaced_bias, "None, True or False")
        if self.replaced_bias is not None:
            object.__setattr__(self, "replaced_bias", bool(self.replaced_bias))
        object.__setattr__(self, "residual_intervals", _as_tuple(self.residual_intervals))
        for flag in ("bias", "batch_norm", "residual", "collapse_on_eval"):
            if not isinstance(getattr(self, flag), (bool, np.bool_)):
                raise self._fail(flag, getattr(self, flag), "True or False")
            object.__setattr__(self, flag, bool(getattr(self, flag)))
        for number in ("width", "negative_slope", "bn_eps", "bn_momentum"):
            value = getattr(self, number)
            if _is_real(value):  # NumPy scalars -> Python numbers, for JSON metadata
                object.__setattr__(self, number, int(value) if is_int(value) else float(value))
        self._require_int("depth", 1)
        if not _is_real(self.width) or self.width <= 0:
            raise self._fail("width", self.width, "a finite number > 0 (hidden size = int(out * width))")
        if self.hidden_dim < 1:
            raise self._fail(
                "width", self.width, f"large enough that int({self.out_dim} * width) >= 1"
            )
        intervals = self.residual_intervals
        if not isinstance(intervals, tuple) or not intervals or not all(
            is_int(n) and (n >= 1 or n == -1) for n in intervals
        ):
            raise self._fail(
                "residual_intervals", intervals, "an int or a non-empty list of ints, each >= 1 or -1 (= depth)"
            )
        if self.residual_mode not in RESIDUAL_MODES:
            raise self._fail("residual_mode", self.residual_mode, "'none' (identity skips) or 'learn' (projected skips)")
        if not _is_real(self.negative_slope):
            raise self._fail("negative_slope", self.negative_slope, "a finite number")
        if not _is_real(self.bn_eps) or self.bn_eps <= 0:
            raise self._fail("bn_eps", self.bn_eps, "a finite number > 0")
        if self.bn_momentum is not None and (not _is_real(self.bn_momentum) or not 0 <= self.bn_momentum <= 1):
            raise self._fail("bn_momentum", self.bn_momentum, "None or a number in [0, 1]")
        if self.residual and self.residual_mode == "none":
            dims = self.node_dims
            for source, destination in self.skips:
                if dims[source] != dims[destination]:
                    raise ConfigError(
                        f"{self.layer_type}: identity skip from node {source} ({dims[source]} features) to node "
                        f"{destination} ({dims[destination]} features) needs equal sizes; use "
                        "residual_mode='learn' for a projected skip, or equal in/out sizes with width=1 "
                        "(width may differ when the only interval is -1 = depth)"
                    )

    # ---- serialisation -------------------------------------------------------
    _WRITTEN_IF_SET: ClassVar[frozenset[str]] = frozenset({"replaced_bias"})
    """Fields added within a config version: written only when not at their default, so a config
    an older epcli could read is written byte for byte as that epcli wrote it (and it can read it)."""

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict of every field (tuples become lists), but see :attr:`_WRITTEN_IF_SET`."""
        return {
            f.name: _plain(value)
            for f in dataclasses.fields(self)
            if (value := getattr(self, f.name)) != f.default or f.name not in self._WRITTEN_IF_SET
        }

    @classmethod
    def from_dict(cls, data: Any) -> EPConfig:
        """Rebuild and validate a config; unknown or missing keys raise :class:`ConfigError`."""
        if not isinstance(data, dict):
            raise ConfigError(f"{cls.layer_type} config must be a JSON object, got {_describe(data)}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"{cls.layer_type} config has unknown keys {unknown}; expected keys among {sorted(names)}")
        required = sorted(
            f.name for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        )
        missing = [name for name in required if name not in data]
        if missing:
            raise ConfigError(f"{cls.layer_type} config is missing required keys {missing}")
        return cls(**data)


@dataclass(frozen=True, kw_only=True)
class EPLinearConfig(EPConfig):
    """Configuration of :class:`epcli.EPLinear`."""

    layer_type: ClassVar[str] = "EPLinear"
    _WRITTEN_IF_SET: ClassVar[frozenset[str]] = EPConfig._WRITTEN_IF_SET | {"weight_layout"}

    in_features: int
    out_features: int
    weight_layout: str = "out_in"
    """How the collapsed weight is stored: ``"out_in"`` as ``nn.Linear``, ``"in_out"`` as transformers' ``Conv1D``
    (GPT-2), so the collapse of a replaced ``Conv1D`` loads into its original class."""

    def __post_init__(self) -> None:
        self._require_int("in_features", 1)
        self._require_int("out_features", 1)
        if self.weight_layout not in WEIGHT_LAYOUTS:
            raise self._fail("weight_layout", self.weight_layout, "'out_in' (nn.Linear) or 'in_out' (transformers' Conv1D)")
        super().__post_init__()
        if self.weight_layout == "in_out" and not self.collapsed_bias:
            raise self._fail(
                "bias", self.bias, "True (or batch_norm=True) with weight_layout='in_out': a Conv1D always has a bias"
            )

    @property
    def in_dim(self) -> int:
        return self.in_features

    @property
    def out_dim(self) -> int:
        return self.out_features

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Per-sample ``(*, in_features) -> (*, out_features)``; :class:`ConfigError` when the last size differs."""
        if not input_shape or input_shape[-1] != self.in_features:
            raise ConfigError(f"expects (*, {self.in_features}) per sample, got {list(input_shape)}")
        return (*input_shape[:-1], self.out_features)


PerDim = int | tuple[int, ...]
"""A size per spatial dim: one int for all dims, or one int per dim."""


@dataclass(frozen=True, kw_only=True)
class EPConvConfig(EPConfig):
    """Configuration of the EP convolutions; one subclass per number of spatial dims, the fields are shared.

    ``depth == len(kernel_sizes)``. Each kernel size, ``padding``, ``stride`` and
    ``dilation`` is an int (every spatial dim) or one int per dim; it is stored as an
    int when equal in every dim, so a config written before per-dim sizes (and
    ``groups``, ``dilation``, ``padding_mode``, whose defaults keep the old meaning)
    reads back equal.
    """

    layer_type: ClassVar[str] = "EPConv"
    ndim: ClassVar[int] = 0
    _WRITTEN_IF_SET: ClassVar[frozenset[str]] = EPConfig._WRITTEN_IF_SET | {"dilation", "groups", "padding_mode"}

    in_channels: int
    out_channels: int
    kernel_sizes: tuple[PerDim, ...] = field(default=(3, 1))
    padding: PerDim = 0
    stride: PerDim = 1
    dilation: PerDim = 1
    groups: int = 1
    padding_mode: str = "zeros"

    def _per_dim(self, argument: str, value: Any, minimum: int) -> PerDim:
        """An int, or ``ndim`` ints (any sequence) -> int when all equal, else a tuple; :class:`ConfigError` otherwise."""
        if is_int(value) and value >= minimum:
            return int(value)
        if isinstance(value, (list, tuple)) and len(value) == self.ndim and all(
            is_int(v) and v >= minimum for v in value
        ):
            sizes = tuple(int(v) for v in value)
            return sizes[0] if len(set(sizes)) == 1 else sizes
        raise self._fail(argument, value, f"an int >= {minimum} or a list of {self.ndim} such ints (one per spatial dim)")

    def __post_init__(self) -> None:
        self._require_int("in_channels", 1)
        self._require_int("out_channels", 1)
        self._require_int("groups", 1)
        for argument, minimum in (("padding", 0), ("stride", 1), ("dilation", 1)):
            object.__setattr__(self, argument, self._per_dim(argument, getattr(self, argument), minimum))
        sizes = (self.kernel_sizes,) if is_int(self.kernel_sizes) else self.kernel_sizes
        if not isinstance(sizes, (list, tuple)) or not sizes:
            raise self._fail("kernel_sizes", sizes, "an int or a non-empty list, each entry an int >= 1 or one per dim")
        object.__setattr__(self, "kernel_sizes", tuple(self._per_dim("kernel_sizes", k, 1) for k in sizes))
        if self.padding_mode not in PADDING_MODES:
            raise self._fail("padding_mode", self.padding_mode, f"one of {', '.join(map(repr, PADDING_MODES))}")
        super().__post_init__()
        if len(self.kernel_sizes) != self.depth:
            raise self._fail(
                "depth", self.depth,
                f"len(kernel_sizes) = {len(self.kernel_sizes)} when kernel_sizes is a list (or leave depth unset)",
            )
        if any(channels % self.groups for channels in (self.in_channels, self.out_channels, self.hidden_dim)):
            raise ConfigError(
                f"{self.layer_type}: groups={self.groups} must divide in_channels ({self.in_channels}), "
                f"out_channels ({self.out_channels}) and the hidden channels int(out_channels * width) = "
                f"{self.hidden_dim} (every conv of the chain has the same groups); depthwise (groups == in == out) "
                "needs a whole-number width"
            )
        if self.residual and any(k % 2 == 0 for shape in self.kernel_shapes for k in shape):
            raise self._fail(
                "kernel_sizes", self.kernel_sizes,
                "odd in every dim when residual=True (a skip must be centred on an even kernel, which is ambiguous)",
            )

    @classmethod
    def from_arguments(cls, kernel_sizes: Any, depth: Any, **kwargs: Any) -> EPConvConfig:
        """Normalise the constructor's ``kernel_sizes`` / ``depth`` pair.

        A list sets the depth (a given depth must agree); an int k with depth d
        means ``[k] + [1] * (d - 1)``; depth defaults to 2, as in the original.
        """
        if is_int(kernel_sizes):
            if depth is None:
                depth = 2
            if is_int(depth) and depth >= 1:
                kernel_sizes = (kernel_sizes,) + (1,) * (depth - 1)
        elif isinstance(kernel_sizes, (list, tuple)) and depth is None:
            depth = len(kernel_sizes)
        return cls(kernel_sizes=kernel_sizes, depth=depth, **kwargs)

    @property
    def in_dim(self) -> int:
        return self.in_channels

    @property
    def out_dim(self) -> int:
        return self.out_channels

    # ---- per-dim views -------------------------------------------------------------
    def per_dim(self, value: PerDim) -> tuple[int, ...]:
        """``value`` (an int or a tuple, as stored) as one int per spatial dim."""
        return (value,) * self.ndim if isinstance(value, int) else value

    @property
    def kernel_shapes(self) -> tuple[tuple[int, ...], ...]:
        """Each layer's kernel, one size per spatial dim."""
        return tuple(self.per_dim(k) for k in self.kernel_sizes)

    @property
    def kernel_size(self) -> tuple[int, ...]:
        """Effective (collapsed, undilated) kernel per dim: ``sum(kernel_sizes) - depth + 1``."""
        return tuple(sum(sizes) - self.depth + 1 for sizes in zip(*self.kernel_shapes))

    @property
    def receptive_fields(self) -> tuple[tuple[int, ...], ...]:
        """Per node 0 .. depth, the extent per dim of the padded input it reads (dilation included)."""
        fields = [(1,) * self.ndim]
        for shape in self.kernel_shapes:
            fields.append(tuple(f + d * (k - 1) for f, d, k in zip(fields[-1], self.per_dim(self.dilation), shape)))
        return tuple(fields)

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Per-sample ``(C, *sizes) -> (C_out, *sizes')``, size' = (size + 2 padding - span) // stride + 1.

        ``span = dilation * (kernel - 1) + 1``. Arithmetic only (no tensors): :class:`ConfigError`
        when the channels differ, a padded map is smaller than the span, or the padding
        mode cannot pad that much (reflect: padding < size; circular: padding <= size).
        """
        if len(input_shape) != 1 + self.ndim or input_shape[0] != self.in_channels:
            dims = {1: "L", 2: "H, W", 3: "D, H, W"}[self.ndim]
            raise ConfigError(f"expects ({self.in_channels}, {dims}) per sample, got {list(input_shape)}")
        sizes = []
        for size, padding, stride, dilation, kernel in zip(
            input_shape[1:], self.per_dim(self.padding), self.per_dim(self.stride), self.per_dim(self.dilation),
            self.kernel_size,
        ):
            span = dilation * (kernel - 1) + 1
            if size + 2 * padding < span:
                dilated = f" dilated by {dilation} (span {span})" if dilation > 1 else ""
                raise ConfigError(
                    f"a side of {size} padded by {padding} is smaller than the "
                    f"{'x'.join(map(str, self.kernel_size))} effective kernel{dilated}"
                )
            if (self.padding_mode == "reflect" and padding >= size) or (self.padding_mode == "circular" and padding > size):
                limit = "less than" if self.padding_mode == "reflect" else "at most"
                raise ConfigError(f"padding_mode={self.padding_mode!r} needs padding {padding} {limit} the side {size}")
            sizes.append((size + 2 * padding - span) // stride + 1)
        return (self.out_channels, *sizes)


@dataclass(frozen=True, kw_only=True)
class EPConv1dConfig(EPConvConfig):
    """Configuration of :class:`epcli.EPConv1d`."""

    layer_type: ClassVar[str] = "EPConv1d"
    ndim: ClassVar[int] = 1


@dataclass(frozen=True, kw_only=True)
class EPConv2dConfig(EPConvConfig):
    """Configuration of :class:`epcli.EPConv2d`."""

    layer_type: ClassVar[str] = "EPConv2d"
    ndim: ClassVar[int] = 2


@dataclass(frozen=True, kw_only=True)
class EPConv3dConfig(EPConvConfig):
    """Configuration of :class:`epcli.EPConv3d`."""

    layer_type: ClassVar[str] = "EPConv3d"
    ndim: ClassVar[int] = 3

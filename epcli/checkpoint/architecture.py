"""Module tree <-> JSON spec, for the torch.nn modules a checkpoint can rebuild without user code.

A spec node is ``{"type": <name>, ...}``: ``"args"`` (constructor arguments) for
plain torch modules, ``"config"`` (the config dict) for EP layers, and
``"children": [{"name": ..., "module": <node>}, ...]`` for ``nn.Sequential``.
Types are matched exactly, so a subclass with its own ``forward`` is never
mistaken for the module it extends: such a model has no spec, and a factory
named by the user must build it. Building validates every argument and names
the node at fault.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from epcli.checkpoint.metadata import checked_config
from epcli.errors import CheckpointError, ConfigError, EpcliError
from epcli.layers.base import EPLayer
from epcli.layers.lowrank import LOW_RANK
from epcli.layers.registry import REGISTRY, class_name, collapsed_has_bias, plain_layer
from epcli.limits import (
    MAX_ARCHITECTURE_NODES,
    MAX_CONFIG_REAL,
    MAX_FEATURES,
    MAX_NAME_CHARS,
    MAX_NESTING,
    MAX_RANK,
    MAX_WINDOW,
    check_count,
    is_int,
)
from epcli.text import quote

__all__ = [
    "SUPPORTED_TYPES",
    "build_architecture",
    "node_name",
    "collapsed_architecture",
    "describe_architecture",
    "ep_nodes",
]

Spec = dict[str, Any]


class _Invalid(Exception):
    """An argument value fails its check; the message says what was required."""


# ---- argument checks: normalise to JSON values or raise _Invalid ----------------------
Check = Callable[[Any], Any]


def _int(minimum: int, maximum: int = MAX_FEATURES) -> Check:
    """An int in ``[minimum, maximum]``; the maximum comes from :mod:`epcli.limits`."""
    def check(value: Any) -> int:
        if not is_int(value) or not minimum <= value <= maximum:
            raise _Invalid(f"an int in [{minimum}, {maximum}]")
        return int(value)

    return check


_dim = _int(-MAX_RANK, MAX_RANK)
"""A tensor dimension argument (Softmax dim, Flatten start_dim ...)."""


def _real(minimum: float = -MAX_CONFIG_REAL, maximum: float = MAX_CONFIG_REAL, *, positive: bool = False) -> Check:
    def check(value: Any) -> float:
        number = float(value) if isinstance(value, numbers.Real) and not isinstance(value, bool) else math.nan
        if not math.isfinite(number) or number < minimum or number > maximum or (positive and number <= 0):
            bounds = f" in ({0}, {maximum}]" if positive else f" in [{minimum}, {maximum}]"
            raise _Invalid(f"a finite number{bounds}")
        return number

    return check


def _optional(inner: Check) -> Check:
    def check(value: Any) -> Any:
        return None if value is None else inner(value)

    return check


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Invalid("true or false")
    return value


def _choice(*options: Any) -> Check:
    def check(value: Any) -> Any:
        if not any(value == o and type(value) is type(o) for o in options):
            raise _Invalid(f"one of {list(options)}")
        return value

    return check


_COUNTS = {1: "one", 2: "two", 3: "three"}


def _per_dim(ndim: int, minimum: int) -> Check:
    """An int or ``ndim`` ints (one per spatial dim) -> a list of ``ndim`` ints, each at most :data:`MAX_WINDOW`."""
    def check(value: Any) -> list[int]:
        items = [value] * ndim if is_int(value) else value
        if (
            not isinstance(items, (list, tuple)) or len(items) != ndim
            or not all(is_int(v) and minimum <= v <= MAX_WINDOW for v in items)
        ):
            raise _Invalid(f"an int in [{minimum}, {MAX_WINDOW}] or a list of {_COUNTS[ndim]} such ints")
        return [int(v) for v in items]

    return check


def _int_list(minimum: int) -> Check:
    def check(value: Any) -> list[int]:
        if (
            not isinstance(value, (list, tuple)) or not value or len(value) > MAX_RANK
            or not all(is_int(v) and minimum <= v <= MAX_FEATURES for v in value)
        ):
            raise _Invalid(f"a list of 1 to {MAX_RANK} ints in [{minimum}, {MAX_FEATURES}]")
        return [int(v) for v in value]

    return check


def _either(*checks: Check) -> Check:
    def check(value: Any) -> Any:
        requirements = []
        for inner in checks:
            try:
                return inner(value)
            except _Invalid as e:
                requirements.append(str(e))
        raise _Invalid(" or ".join(requirements))

    return check


def _output_size(ndim: int) -> Check:
    """AdaptiveAvgPool1d/2d/3d: an int, or ``ndim`` entries each an int >= 1 or None (keep that size)."""
    def size(v: Any) -> bool:
        return is_int(v) and 1 <= v <= MAX_FEATURES

    def check(value: Any) -> Any:
        if size(value):
            return int(value)
        if isinstance(value, (list, tuple)) and len(value) == ndim and all(v is None or size(v) for v in value):
            return [None if v is None else int(v) for v in value]
        raise _Invalid(f"an int in [1, {MAX_FEATURES}] or a list of {_COUNTS[ndim]} entries, each such an int or null")

    return check


# ---- the module types ---------------------------------------------------------------------
@dataclass(frozen=True)
class _Arg:
    """One constructor argument: how to check it, and how to read it from a module (default: the attribute)."""

    name: str
    check: Check
    read: Callable[[nn.Module], Any] | None = None

    def value_of(self, module: nn.Module) -> Any:
        return self.read(module) if self.read is not None else getattr(module, self.name)


@dataclass(frozen=True)
class _ModuleType:
    """A plain torch module type with constructor arguments that fully describe it."""

    cls: type[nn.Module]
    args: tuple[_Arg, ...]

    def to_spec(self, module: nn.Module) -> Spec:
        """Raises _Invalid when the module uses a setting the spec cannot carry (e.g. ``return_indices``)."""
        return {"type": self.cls.__name__, "args": {a.name: a.check(a.value_of(module)) for a in self.args}}

    def from_spec(self, node: Mapping[str, Any], where: str) -> nn.Module:
        _require_keys(node, {"type", "args"}, where)
        args = node["args"]
        if not isinstance(args, dict):
            raise CheckpointError(f"{where}: 'args' must be an object, got {type(args).__name__}")
        names = [a.name for a in self.args]
        unknown, missing = sorted(set(args) - set(names)), [n for n in names if n not in args]
        if unknown or missing:
            raise CheckpointError(f"{where}: unknown args {quote(unknown)}, missing args {missing}; expected {names}")
        values = {}
        for arg in self.args:
            try:
                value = arg.check(args[arg.name])
            except _Invalid as e:
                raise CheckpointError(f"{where}: {arg.name} must be {e}, got {quote(args[arg.name])}") from None
            values[arg.name] = tuple(value) if isinstance(value, list) else value
        try:
            return self.cls(**values)
        except (ValueError, TypeError, RuntimeError) as e:
            raise CheckpointError(f"{where}: invalid arguments {quote(args)}: {quote(str(e))}") from e


def _has_bias(module: nn.Module) -> bool:
    return module.bias is not None


_INPLACE = _Arg("inplace", _bool)
_NORM_ARGS = (
    _Arg("num_features", _int(1)),
    _Arg("eps", _real(positive=True)),
    _Arg("momentum", _optional(_real(0.0, 1.0))),
    _Arg("affine", _bool),
    _Arg("track_running_stats", _bool),
)

def _window_args(ndim: int) -> tuple[_Arg, ...]:
    """A sliding window's size and step: convolutions and pools alike."""
    return (_Arg("kernel_size", _per_dim(ndim, 1)), _Arg("stride", _per_dim(ndim, 1)))


def _conv(cls: type[nn.Module], ndim: int) -> _ModuleType:
    return _ModuleType(
        cls,
        (
            _Arg("in_channels", _int(1)),
            _Arg("out_channels", _int(1)),
            *_window_args(ndim),
            _Arg("padding", _either(_per_dim(ndim, 0), _choice("same", "valid"))),
            _Arg("dilation", _per_dim(ndim, 1)),
            _Arg("groups", _int(1)),
            _Arg("bias", _bool, _has_bias),
            _Arg("padding_mode", _choice("zeros", "reflect", "replicate", "circular")),
        ),
    )


def _max_pool(cls: type[nn.Module], ndim: int) -> _ModuleType:
    return _ModuleType(
        cls,
        (
            *_window_args(ndim),
            _Arg("padding", _per_dim(ndim, 0)),
            _Arg("dilation", _per_dim(ndim, 1)),
            _Arg("ceil_mode", _bool),
            _Arg("return_indices", _choice(False)),  # indices would turn the output into a tuple
        ),
    )


def _avg_pool(cls: type[nn.Module], ndim: int) -> _ModuleType:
    divisor = (_Arg("divisor_override", _optional(_int(1))),) if ndim > 1 else ()  # AvgPool1d has none
    return _ModuleType(
        cls,
        (
            *_window_args(ndim),
            _Arg("padding", _per_dim(ndim, 0)),
            _Arg("ceil_mode", _bool),
            _Arg("count_include_pad", _bool),
            *divisor,
        ),
    )


_TYPES: tuple[_ModuleType, ...] = (
    _ModuleType(
        nn.Linear, (_Arg("in_features", _int(1)), _Arg("out_features", _int(1)), _Arg("bias", _bool, _has_bias))
    ),
    _conv(nn.Conv1d, 1),
    _conv(nn.Conv2d, 2),
    _conv(nn.Conv3d, 3),
    _ModuleType(nn.BatchNorm1d, _NORM_ARGS),
    _ModuleType(nn.LayerNorm, (_Arg("normalized_shape", _int_list(1)), _Arg("eps", _real(positive=True)),
                               _Arg("elementwise_affine", _bool), _Arg("bias", _bool, _has_bias))),
    _ModuleType(nn.BatchNorm2d, _NORM_ARGS),
    _ModuleType(nn.BatchNorm3d, _NORM_ARGS),
    _ModuleType(nn.ReLU, (_INPLACE,)),
    _ModuleType(nn.GELU, (_Arg("approximate", _choice("none", "tanh")),)),
    _ModuleType(nn.SiLU, (_INPLACE,)),
    _ModuleType(nn.Tanh, ()),
    _ModuleType(nn.Sigmoid, ()),
    _ModuleType(nn.LeakyReLU, (_Arg("negative_slope", _real()), _INPLACE)),
    _ModuleType(nn.ELU, (_Arg("alpha", _real()), _INPLACE)),
    _ModuleType(nn.Softmax, (_Arg("dim", _optional(_dim)),)),
    _ModuleType(nn.LogSoftmax, (_Arg("dim", _optional(_dim)),)),
    _ModuleType(nn.Flatten, (_Arg("start_dim", _dim), _Arg("end_dim", _dim))),
    _ModuleType(nn.Unflatten, (_Arg("dim", _dim), _Arg("unflattened_size", _int_list(1)))),
    _ModuleType(nn.Dropout, (_Arg("p", _real(0.0, 1.0)), _INPLACE)),
    _ModuleType(nn.Dropout2d, (_Arg("p", _real(0.0, 1.0)), _INPLACE)),
    _max_pool(nn.MaxPool1d, 1),
    _max_pool(nn.MaxPool2d, 2),
    _max_pool(nn.MaxPool3d, 3),
    _avg_pool(nn.AvgPool1d, 1),
    _avg_pool(nn.AvgPool2d, 2),
    _avg_pool(nn.AvgPool3d, 3),
    _ModuleType(nn.AdaptiveAvgPool1d, (_Arg("output_size", _output_size(1)),)),
    _ModuleType(nn.AdaptiveAvgPool2d, (_Arg("output_size", _output_size(2)),)),
    _ModuleType(nn.AdaptiveAvgPool3d, (_Arg("output_size", _output_size(3)),)),
    _ModuleType(nn.Identity, ()),
)
_TYPES += tuple(  # low-rank factored layers: the plain layer's arguments and the rank kept
    _ModuleType(LOW_RANK[t.cls], (*t.args, _Arg("rank", _int(1)))) for t in _TYPES if t.cls in LOW_RANK
)

_BY_NAME: Mapping[str, _ModuleType] = MappingProxyType({t.cls.__name__: t for t in _TYPES})
_BY_TYPE: Mapping[type[nn.Module], _ModuleType] = MappingProxyType({t.cls: t for t in _TYPES})

SUPPORTED_TYPES: tuple[str, ...] = ("Sequential", *REGISTRY, *_BY_NAME)
"""Every module type name a spec may contain."""


class _Unsupported(Exception):
    """The model contains a module (or a setting) the spec cannot describe."""


# ---- module tree -> spec --------------------------------------------------------------------
def describe_architecture(model: nn.Module) -> Spec | None:
    """The JSON spec of ``model``, or None when any part of it is unsupported (e.g. a custom ``forward``).

    As a self-check, the spec is rebuilt on the meta device and must store
    exactly the same keys and shapes as ``model`` (so e.g. an extra parameter
    registered on a Sequential makes the model unsupported, not silently lost).
    """
    try:
        spec = _describe(model, depth=0)
    except _Unsupported:
        return None
    try:
        rebuilt = build_architecture(spec, device="meta")
    except EpcliError:
        return None
    if _layout(rebuilt) != _layout(model):
        return None
    return spec


def _layout(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def _describe(module: nn.Module, depth: int) -> Spec:
    if depth > MAX_NESTING:
        raise _Unsupported
    if type(module) is nn.Sequential:
        return {
            "type": "Sequential",
            "children": [
                {"name": name, "module": _describe(child, depth + 1)} for name, child in module.named_children()
            ],
        }
    if isinstance(module, EPLayer):
        config = module.config
        # the collapsed file must rebuild too: a layer whose plain form the spec cannot describe (transformers'
        # Conv1D) makes the model unsupported
        _describe(plain_layer(config, bias=collapsed_has_bias(config), device="meta"), depth)
        try:
            return {"type": class_name(module), "config": config.to_dict()}
        except ConfigError:
            raise _Unsupported from None
    kind = _BY_TYPE.get(type(module))
    if kind is None:
        raise _Unsupported
    try:
        return kind.to_spec(module)
    except _Invalid:
        raise _Unsupported from None


# ---- spec -> module tree ----------------------------------------------------------------------
def build_architecture(spec: Any, *, device: torch.device | str | None = None) -> nn.Module:
    """Build (and validate) the module tree of ``spec``; ``device="meta"`` allocates no memory.

    Errors are :class:`CheckpointError` (or :class:`ConfigError` for an EP layer
    config) naming the node by its module path. At most
    :data:`~epcli.limits.MAX_ARCHITECTURE_NODES` nodes, nested at most
    :data:`~epcli.limits.MAX_NESTING` deep.
    """
    with torch.device(device) if device is not None else nullcontext():
        return _build(spec, "", 0, [0])


def node_name(path: str) -> str:
    return f"architecture node {quote(path or '<model>')}"


def _require_keys(node: Mapping[str, Any], keys: set[str], where: str) -> None:
    if set(node) != keys:
        raise CheckpointError(f"{where}: has keys {quote(sorted(node))}, expected exactly {sorted(keys)}")


def _build(node: Any, path: str, depth: int, count: list[int]) -> nn.Module:
    where = node_name(path)
    if depth > MAX_NESTING:
        raise CheckpointError(f"{where}: nested deeper than {MAX_NESTING} levels")
    count[0] += 1
    check_count(count[0], MAX_ARCHITECTURE_NODES, "the number of architecture nodes")
    if not isinstance(node, dict):
        raise CheckpointError(f"{where}: must be an object, got {type(node).__name__}")
    kind = node.get("type")
    if kind == "Sequential":
        return _build_sequential(node, path, depth, count)
    if isinstance(kind, str) and kind in REGISTRY:
        _require_keys(node, {"type", "config"}, where)
        return REGISTRY[kind].layer.from_config(checked_config(kind, node["config"], where))
    module_type = _BY_NAME.get(kind) if isinstance(kind, str) else None
    if module_type is None:
        raise CheckpointError(
            f"{where}: unknown module type {quote(kind)}; supported types: {', '.join(SUPPORTED_TYPES)}"
        )
    return module_type.from_spec(node, where)


_RESERVED = frozenset(dir(nn.Sequential())) | frozenset(vars(nn.Sequential()))
"""Attribute names of a Sequential (``training``, ``forward``, ``__class__`` ...): never a child's name."""


def _build_sequential(node: Mapping[str, Any], path: str, depth: int, count: list[int]) -> nn.Module:
    where = node_name(path)
    _require_keys(node, {"type", "children"}, where)
    children = node["children"]
    if not isinstance(children, list):
        raise CheckpointError(f"{where}: 'children' must be a list, got {type(children).__name__}")
    check_count(len(children), MAX_ARCHITECTURE_NODES, f"{where}: the number of children")
    sequential = nn.Sequential()
    for index, child in enumerate(children):
        if not isinstance(child, dict) or set(child) != {"name", "module"}:
            raise CheckpointError(f"{where}: child {index} must be an object with exactly 'name' and 'module'")
        name = child["name"]
        if (
            not isinstance(name, str) or not name or len(name) > MAX_NAME_CHARS or "." in name
            or not name.isprintable() or name in _RESERVED
        ):
            raise CheckpointError(
                f"{where}: child {index} has an invalid name {quote(name)}: a module name is a non-empty printable "
                "string without '.', and not an attribute of nn.Module such as 'training' or '__class__'"
            )
        if name in sequential._modules:
            raise CheckpointError(f"{where}: child {index} repeats the name {quote(name)}")
        sequential.add_module(name, _build(child["module"], f"{path}.{name}" if path else name, depth + 1, count))
    return sequential


def ep_nodes(spec: Any) -> dict[str, tuple[str, Any]]:
    """EP layer nodes of a spec not yet validated: path -> (class name, config dict).

    Cheap (no modules are built), so a file's claims can be compared before any
    work; malformed parts are skipped here and reported by :func:`build_architecture`.
    """
    found: dict[str, tuple[str, Any]] = {}

    visited = 0

    def visit(node: Any, path: str, depth: int) -> None:
        nonlocal visited
        visited += 1
        if depth > MAX_NESTING or not isinstance(node, dict) or visited > MAX_ARCHITECTURE_NODES:
            return
        kind = node.get("type")
        if kind == "Sequential" and isinstance(node.get("children"), list):
            for child in node["children"]:
                if isinstance(child, dict) and isinstance(child.get("name"), str):
                    visit(child.get("module"), f"{path}.{child['name']}" if path else child["name"], depth + 1)
        elif isinstance(kind, str) and kind in REGISTRY:
            found[path] = (kind, node.get("config"))

    visit(spec, "", 0)
    return found


# ---- expanded spec -> collapsed spec --------------------------------------------------------
def collapsed_architecture(spec: Spec) -> Spec:
    """The spec of the collapsed model: each EP layer node becomes its plain Linear / Conv1d/2d/3d node."""
    return _collapse_node(spec, "")


def _collapse_node(node: Spec, path: str) -> Spec:
    kind = node["type"]
    if kind == "Sequential":
        return {
            "type": "Sequential",
            "children": [
                {"name": c["name"], "module": _collapse_node(c["module"], f"{path}.{c['name']}" if path else c["name"])}
                for c in node["children"]
            ],
        }
    if kind in REGISTRY:
        config = checked_config(kind, node["config"], node_name(path))
        return _describe(plain_layer(config, bias=collapsed_has_bias(config), device="meta"), depth=0)
    return node

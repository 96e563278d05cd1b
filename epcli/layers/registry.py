"""The one registry of EP layer classes, keyed by class name.

Checkpoints name a layer class as a string and carry its config as a dict;
every place that turns that string (or a module) back into code goes through
here, so adding an EP layer type is one entry and nothing dispatches on
``hasattr``. The registry also knows what tensors a config implies, expanded
and collapsed, so files can be checked against their configs before any real
memory is allocated (shapes come from layers built on the ``meta`` device).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, nullcontext
from types import MappingProxyType
from typing import Any, NamedTuple, cast

import torch
from torch import Tensor, nn

from epcli.errors import CheckpointError, ConfigError, ShapeMismatchError
from epcli.layers.base import EPLayer
from epcli.layers.config import (
    EPConfig,
    EPConv1dConfig,
    EPConv2dConfig,
    EPConv3dConfig,
    EPConvConfig,
    EPLinearConfig,
)
from epcli.layers.conv import EPConv1d, EPConv2d, EPConv3d, conv_module
from epcli.layers.linear import EPLinear

__all__ = [
    "REGISTRY",
    "LayerEntry",
    "PlainLayer",
    "build_layer",
    "check_state",
    "class_name",
    "collapsed_has_bias",
    "config_class",
    "config_from_dict",
    "expected_state",
    "find_ep_layers",
    "is_transformers_conv1d",
    "layer_class",
    "lookup",
    "output_shape",
    "plain_layer",
    "registered_names",
    "walk_modules",
]


class LayerEntry(NamedTuple):
    """A registered EP layer: the module class and its config class."""

    layer: type[EPLayer]
    config: type[EPConfig]


REGISTRY: Mapping[str, LayerEntry] = MappingProxyType(
    {
        "EPLinear": LayerEntry(EPLinear, EPLinearConfig),
        "EPConv2d": LayerEntry(EPConv2d, EPConv2dConfig),
        "EPConv1d": LayerEntry(EPConv1d, EPConv1dConfig),
        "EPConv3d": LayerEntry(EPConv3d, EPConv3dConfig),
    }
)
"""Class name -> (layer class, config class)."""


PlainLayer = nn.Module
"""``nn.Linear``, ``nn.Conv1d/2d/3d``, or transformers' ``Conv1D`` (an ``EPLinear`` with ``weight_layout="in_out"``)."""


def _plain_linear(config: EPConfig, bias: bool) -> PlainLayer:
    c = cast(EPLinearConfig, config)  # the registry key guarantees the type
    if c.weight_layout == "in_out":
        return _transformers_conv1d(c)
    return nn.Linear(c.in_features, c.out_features, bias=bias)


def _transformers_conv1d(config: EPLinearConfig) -> PlainLayer:
    """transformers' ``Conv1D(nf=out, nx=in)``, imported only here: epcli does not depend on transformers."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError as e:
        raise ConfigError(
            "an EPLinear with weight_layout='in_out' collapses to transformers' Conv1D, and transformers is not "
            "installed: pip install transformers"
        ) from e
    module: PlainLayer = Conv1D(config.out_features, config.in_features)  # type: ignore[no-untyped-call]
    return module


def is_transformers_conv1d(cls: type) -> bool:
    """Whether ``cls`` is exactly transformers' ``Conv1D`` (GPT-2's linear layer), without importing transformers."""
    return cls.__name__ == "Conv1D" and cls.__module__ == "transformers.pytorch_utils"


def _plain_conv(config: EPConfig, bias: bool) -> PlainLayer:
    c = cast(EPConvConfig, config)  # the registry key guarantees the type
    return conv_module(c.ndim)(
        c.in_channels,
        c.out_channels,
        c.kernel_size,
        stride=c.stride,
        padding=c.padding,
        dilation=c.dilation,
        groups=c.groups,
        bias=bias,
        padding_mode=c.padding_mode,
    )


_PLAIN: Mapping[str, Callable[[EPConfig, bool], PlainLayer]] = MappingProxyType(
    {"EPLinear": _plain_linear, "EPConv2d": _plain_conv, "EPConv1d": _plain_conv, "EPConv3d": _plain_conv}
)
"""Class name -> the plain torch layer computing the same map once collapsed."""


def registered_names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def lookup(name: Any) -> LayerEntry:
    """The entry for a class name; unknown names raise :class:`ConfigError` listing the known ones."""
    entry = REGISTRY.get(name) if isinstance(name, str) else None
    if entry is None:
        raise ConfigError(f"unknown EP layer class {name!r}; known classes: {', '.join(REGISTRY)}")
    return entry


def layer_class(name: Any) -> type[EPLayer]:
    return lookup(name).layer


def config_class(name: Any) -> type[EPConfig]:
    return lookup(name).config


def class_name(obj: EPLayer | EPConfig) -> str:
    """Registry name of a layer or config; exact types only, so an unregistered subclass is refused."""
    for name, entry in REGISTRY.items():
        if type(obj) is entry.layer or type(obj) is entry.config:
            return name
    raise ConfigError(
        f"{type(obj).__name__} is not a registered EP layer or config class; known classes: {', '.join(REGISTRY)}"
    )


def config_from_dict(name: Any, data: Any) -> EPConfig:
    """Validate a class name and config dict (e.g. from a file) into a frozen config."""
    return lookup(name).config.from_dict(data)


def build_layer(config: EPConfig, *, device: torch.device | str | None = None) -> EPLayer:
    """A freshly initialised layer for ``config`` (on ``device``; ``"meta"`` allocates nothing)."""
    layer_cls = lookup(class_name(config)).layer
    with _on(device):
        return layer_cls.from_config(config)


def _on(device: torch.device | str | None) -> AbstractContextManager[Any]:
    """Make new tensors on ``device`` (no change when None)."""
    return torch.device(device) if device is not None else nullcontext()


def collapsed_has_bias(config: EPConfig) -> bool:
    """Whether the collapsed layer has a bias (see :attr:`EPConfig.collapsed_bias`)."""
    return config.collapsed_bias


def plain_layer(
    config: EPConfig,
    *,
    bias: bool,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> PlainLayer:
    """The ``nn.Linear`` / ``nn.Conv1d/2d/3d`` (or ``Conv1D``, see :class:`EPLinearConfig`) a user would write for
    the collapsed layer (fresh weights)."""
    make = _PLAIN[class_name(config)]
    with _on(device):
        module = make(config, bias)
    return module if dtype is None else module.to(dtype)


def expected_state(config: EPConfig, *, collapsed: bool = False) -> dict[str, Tensor]:
    """Meta tensors with the keys, shapes and dtypes a layer built from ``config`` stores.

    Keys are relative to the layer: ``layer_dict.0.0.weight`` ... when expanded,
    ``weight`` / ``bias`` when collapsed.
    """
    module: nn.Module
    if collapsed:
        module = plain_layer(config, bias=collapsed_has_bias(config), device="meta")
    else:
        module = build_layer(config, device="meta")
    return dict(module.state_dict())


def output_shape(config: EPConfig, input_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Per-sample output shape of the layer on per-sample ``input_shape``; :class:`ConfigError` when it does not fit.

    Pure arithmetic on the config: no layer is built and no tensor touched.
    """
    try:
        return config.output_shape(tuple(input_shape))
    except ConfigError as e:
        raise ConfigError(
            f"input_shape {list(input_shape)} does not fit {class_name(config)}({config.in_dim} -> {config.out_dim}): {e}"
        ) from e


def find_ep_layers(model: nn.Module) -> dict[str, EPLayer]:
    """Dotted path -> EP layer, in module order; an unregistered EP layer subclass raises :class:`ConfigError`."""
    found: dict[str, EPLayer] = {}
    for path, module in walk_modules(model):
        if isinstance(module, EPLayer):
            try:
                class_name(module)
            except ConfigError as e:
                raise ConfigError(f"module {path or '<model>'!r}: {e}") from e
            found[path] = module
    return found


def walk_modules(module: nn.Module, path: str = "") -> Iterator[tuple[str, nn.Module]]:
    """Every module with its dotted path, without descending into EP layers (their insides are theirs)."""
    yield path, module
    if isinstance(module, EPLayer):
        return
    for name, child in module.named_children():
        yield from walk_modules(child, f"{path}.{name}" if path else name)


def check_state(expected: Mapping[str, Tensor], state: Mapping[str, Tensor], *, prefix: str = "") -> None:
    """``state`` has exactly the keys of ``expected`` (both relative to ``prefix``), each with its shape.

    Missing or unexpected keys raise :class:`CheckpointError`; a wrong shape, or an
    integer tensor where a floating one belongs, raises :class:`ShapeMismatchError`;
    the message names the full key, what was expected and what was found.
    """
    missing = [prefix + key for key in expected if key not in state]
    unexpected = [prefix + key for key in state if key not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_listing(unexpected)}")
        raise CheckpointError("; ".join(parts))
    for key, reference in expected.items():
        actual = state[key]
        if not isinstance(actual, Tensor):
            raise CheckpointError(f"{prefix + key} is a {type(actual).__name__}, not a tensor")
        if tuple(actual.shape) != tuple(reference.shape):
            raise ShapeMismatchError(
                f"{prefix + key} has shape {list(actual.shape)}, expected {list(reference.shape)} from the config"
            )
        if reference.is_floating_point() and not actual.is_floating_point():
            raise ShapeMismatchError(f"{prefix + key} has dtype {actual.dtype}, expected a floating-point dtype")


def _listing(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit])
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"[{shown}{more}]"

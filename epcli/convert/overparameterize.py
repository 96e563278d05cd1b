"""``overparameterize``: plain ``nn.Linear`` / ``nn.ConvNd`` layers into EP layers, and the plan of what it replaces or keeps."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, cast

from torch import nn
from torch.nn.modules.conv import _ConvNd

from epcli.convert.model import replaced_copy
from epcli.convert.unwrap import unwrap_model
from epcli.errors import ConfigError
from epcli.layers.base import EPLayer
from epcli.layers.conv import EPConv, EPConv1d, EPConv2d, EPConv3d
from epcli.layers.linear import EPLinear
from epcli.layers.registry import (
    walk_modules,
)

__all__ = ["Conversion", "ConversionPlan", "overparameterize", "plan_overparameterize"]


_EP_KWARGS = frozenset(
    {"batch_norm", "residual", "residual_intervals", "residual_mode", "collapse_on_eval", "negative_slope", "bn_eps",
     "bn_momentum"}
)
"""EP options ``overparameterize`` passes through; sizes, stride, padding and bias come from the replaced module."""




@dataclass(frozen=True)
class Conversion:
    """One module ``overparameterize`` looked at: replaced (``params_after`` set) or kept (``reason`` set).

    Parameter counts are those that train: the plain module's, and the EP layer's
    expanded chain (after collapsing, the count is ``params_before`` again).
    """

    path: str
    kind: str
    params_before: int
    params_after: int | None = None
    reason: str | None = None

    @property
    def replaced(self) -> bool:
        return self.reason is None


@dataclass(frozen=True)
class ConversionPlan:
    """What :func:`overparameterize` does to a model with the same arguments, module by module, in module order."""

    conversions: tuple[Conversion, ...]

    @property
    def replaced(self) -> tuple[Conversion, ...]:
        return tuple(c for c in self.conversions if c.replaced)

    @property
    def kept(self) -> tuple[Conversion, ...]:
        """Convertible modules left plain, each with the reason (not selected, too small, tied weights)."""
        return tuple(c for c in self.conversions if not c.replaced)

    @property
    def params_before(self) -> int:
        """Trainable parameters of the replaced modules before."""
        return sum(c.params_before for c in self.replaced)

    @property
    def params_after(self) -> int:
        """Trainable parameters of their EP layers (the expanded chains)."""
        return sum(c.params_after or 0 for c in self.replaced)


def plan_overparameterize(
    model: nn.Module,
    depth: int = 2,
    width: float = 1,
    *,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
    types: Iterable[type[nn.Module]] | type[nn.Module] | None = None,
    min_params: int = 0,
    **ep_kwargs: Any,
) -> ConversionPlan:
    """What :func:`overparameterize` would replace, and what it would keep and why; the model is not changed.

    A dry run to read before converting: it runs the same selection and builds the
    same EP layers (to count their parameters and raise the same :class:`ConfigError`),
    then drops them. Arguments as for :func:`overparameterize`.

    Example::

        >>> plan = plan_overparameterize(model, depth=4, exclude=["fc"])
        >>> [(c.path, c.params_before, c.params_after) for c in plan.replaced]
    """
    return _plan(unwrap_model(model), depth, width, include, exclude, types, min_params, ep_kwargs)[0]


def overparameterize(
    model: nn.Module,
    depth: int = 2,
    width: float = 1,
    *,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
    types: Iterable[type[nn.Module]] | type[nn.Module] | None = None,
    min_params: int = 0,
    **ep_kwargs: Any,
) -> nn.Module:
    """A copy with the selected ``nn.Linear`` / ``nn.Conv1d/2d/3d`` modules replaced by fresh EP equivalents.

    Sizes, stride, padding (and mode), groups, dilation and bias come from the
    replaced module; ``depth``, ``width`` and ``ep_kwargs`` (batch_norm, residual,
    residual_intervals, residual_mode, collapse_on_eval, negative_slope, bn_eps,
    bn_momentum) apply to every EP layer. Convolutions become
    ``kernel_sizes = [k] + [1] * (depth - 1)``, so the collapsed kernel keeps size k.
    Existing EP layers are left as they are.

    What is converted: modules of ``types`` (default: every convertible type) whose
    path matches an ``include`` glob (default: all) and no ``exclude`` glob, with
    at least ``min_params`` parameters. A pattern matches a module's dotted path
    or any enclosing path, so ``"layer1"`` selects everything inside ``layer1`` and
    ``"*.downsample.*"`` every downsample branch. A module sharing a parameter with
    another module (tied embeddings: ``lm_head.weight is wte.weight``) is kept, so
    tying is never broken. :func:`plan_overparameterize` takes the same arguments
    and returns what was replaced and kept, with parameter counts.

    Wrapped models (DDP, ``torch.compile``, FSDP) are unwrapped first (:func:`unwrap_model`):
    the result is the converted plain model; wrap it again (a wrapper registers the
    parameters it wraps, and these are new ones). Better: convert before wrapping.

    Example::

        >>> ep = overparameterize(resnet, depth=4, exclude=["conv1", "fc"], types=[nn.Conv2d], min_params=1024)
    """
    model = unwrap_model(model)
    _, replacements = _plan(model, depth, width, include, exclude, types, min_params, ep_kwargs)
    return replaced_copy(model, replacements)


def _plan(
    model: nn.Module,
    depth: int,
    width: float,
    include: Iterable[str] | None,
    exclude: Iterable[str],
    types: Iterable[type[nn.Module]] | type[nn.Module] | None,
    min_params: int,
    ep_kwargs: Mapping[str, Any],
) -> tuple[ConversionPlan, dict[int, nn.Module]]:
    """The plan and the replacement of each converted module by ``id`` (built in the module's dtype and device)."""
    unknown = sorted(set(ep_kwargs) - _EP_KWARGS)
    if unknown:
        raise ConfigError(f"overparameterize: unknown options {unknown}; allowed: {sorted(_EP_KWARGS)}")
    selected = _selected_types(types)
    if not isinstance(min_params, int) or isinstance(min_params, bool) or min_params < 0:
        raise ConfigError(f"overparameterize: min_params must be an int >= 0, got {min_params!r}")
    included = None if include is None else _patterns("include", include)
    excluded = _patterns("exclude", exclude)
    owners = _parameter_owners(model)
    conversions: list[Conversion] = []
    replacements: dict[int, nn.Module] = {}
    for path, module in walk_modules(model):
        if id(module) in replacements or type(module) not in _CONVERTIBLE:
            continue
        count = sum(p.numel() for p in module.parameters())
        reason = _kept_because(path, module, count, selected, included, excluded, min_params, owners)
        if reason is not None:
            conversions.append(Conversion(path, type(module).__name__, count, reason=reason))
            continue
        if type(module) is nn.Linear:
            layer = _ep_linear(path, module, depth, width, ep_kwargs)
        else:
            layer = _ep_conv(path, cast(_ConvNd, module), depth, width, ep_kwargs)
        replacements[id(module)] = layer
        after = sum(p.numel() for p in layer.parameters())
        conversions.append(Conversion(path, type(module).__name__, count, params_after=after))
    return ConversionPlan(tuple(conversions)), replacements


def _selected_types(types: Iterable[type[nn.Module]] | type[nn.Module] | None) -> tuple[type[nn.Module], ...]:
    if types is None:
        return _CONVERTIBLE
    chosen = (types,) if isinstance(types, type) else tuple(types)
    wrong = [t for t in chosen if t not in _CONVERTIBLE]
    if wrong:
        names = [getattr(t, "__name__", repr(t)) for t in wrong]
        raise ConfigError(
            f"overparameterize: types {names} cannot be converted; choose from "
            f"{[t.__name__ for t in _CONVERTIBLE]}"
        )
    return chosen


def _patterns(name: str, patterns: Iterable[str]) -> tuple[str, ...]:
    if isinstance(patterns, str):
        patterns = (patterns,)
    chosen = tuple(patterns)
    if not all(isinstance(p, str) for p in chosen):
        raise ConfigError(f"overparameterize: {name} must be glob patterns (strings), got {chosen!r}")
    return chosen


def _matches(path: str, patterns: tuple[str, ...]) -> bool:
    """Whether a glob matches ``path`` or an enclosing path (``a.b.c`` is inside ``a.b`` and ``a``)."""
    parts = path.split(".")
    candidates = [".".join(parts[:end]) for end in range(1, len(parts) + 1)] if path else [""]
    return any(fnmatch.fnmatchcase(candidate, pattern) for candidate in candidates for pattern in patterns)


def _parameter_owners(model: nn.Module) -> dict[int, list[str]]:
    """Parameter ``id`` -> paths of the distinct modules holding it (a module reused in two places counts once)."""
    owners: dict[int, list[str]] = {}
    seen: set[tuple[int, int]] = set()
    for path, module in model.named_modules(remove_duplicate=False):
        for parameter in module.parameters(recurse=False):
            if (id(module), id(parameter)) not in seen:
                seen.add((id(module), id(parameter)))
                owners.setdefault(id(parameter), []).append(path)
    return owners


def _kept_because(
    path: str,
    module: nn.Module,
    count: int,
    selected: tuple[type[nn.Module], ...],
    included: tuple[str, ...] | None,
    excluded: tuple[str, ...],
    min_params: int,
    owners: Mapping[int, list[str]],
) -> str | None:
    """Why the module stays plain, or None when it is converted."""
    if type(module) not in selected:
        return f"type {type(module).__name__} not selected"
    if included is not None and not _matches(path, included):
        return "matches no include pattern"
    if _matches(path, excluded):
        return "matches an exclude pattern"
    if count < min_params:
        return f"{count} parameters < min_params={min_params}"
    for name, parameter in module.named_parameters(recurse=False):
        others = [other for other in owners.get(id(parameter), []) if other != path]
        if others:
            return f"{name} is shared with {others[0]!r} (tied); converting would untie it"
    return None


def _ep_linear(path: str, linear: nn.Linear, depth: int, width: float, ep_kwargs: Mapping[str, Any]) -> nn.Module:
    try:
        layer = EPLinear(
            linear.in_features, linear.out_features, width=width, depth=depth, bias=linear.bias is not None, **ep_kwargs
        )
    except ConfigError as e:
        raise ConfigError(f"cannot overparameterize Linear at {path or '<model>'!r}: {e}") from e
    return _like(layer, linear)


_EP_CONVS: Mapping[type[nn.Module], type[EPConv]] = {nn.Conv1d: EPConv1d, nn.Conv2d: EPConv2d, nn.Conv3d: EPConv3d}
"""Plain convolution type -> the EP convolution of the same family."""

_CONVERTIBLE: tuple[type[nn.Module], ...] = (nn.Linear, *_EP_CONVS)
"""Module types ``overparameterize`` can replace (exact types: a subclass may change the forward)."""


def _ep_conv(path: str, conv: _ConvNd, depth: int, width: float, ep_kwargs: Mapping[str, Any]) -> nn.Module:
    """The EP convolution of ``conv``'s family with its sizes, stride, padding (and mode), dilation, groups and bias.

    ``kernel_sizes = [k] + [1] * (depth - 1)`` (k per dim, rectangular as it is), so the collapsed kernel is k.
    """
    where = f"{type(conv).__name__} at {path or '<model>'!r}"
    padding = _symmetric_padding(conv)
    if padding is None:
        raise ConfigError(
            f"cannot overparameterize {where}: padding='same' with kernel_size {tuple(conv.kernel_size)} and dilation "
            f"{tuple(conv.dilation)} pads one side more than the other; EP convolutions pad symmetrically: use an odd "
            "kernel or an explicit int padding"
        )
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 1:
        raise ConfigError(f"cannot overparameterize {where}: depth must be an int >= 1, got {depth!r}")
    try:
        layer = _EP_CONVS[type(conv)](
            conv.in_channels,
            conv.out_channels,
            kernel_sizes=[tuple(conv.kernel_size)] + [1] * (depth - 1),
            padding=padding,
            stride=tuple(conv.stride),
            width=width,
            depth=depth,
            bias=conv.bias is not None,
            groups=conv.groups,
            dilation=tuple(conv.dilation),
            padding_mode=conv.padding_mode,
            **ep_kwargs,
        )
    except ConfigError as e:
        raise ConfigError(f"cannot overparameterize {where}: {e}") from e
    return _like(layer, conv)


def _symmetric_padding(conv: _ConvNd) -> tuple[int, ...] | None:
    """Padding per dim ('valid' is 0; 'same' is dilation * (k - 1) / 2), or None when 'same' would pad unevenly."""
    padding = conv.padding
    if padding == "valid":
        return (0,) * len(conv.kernel_size)
    if padding == "same":
        totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        return None if any(t % 2 for t in totals) else tuple(t // 2 for t in totals)
    return tuple(int(p) for p in padding)


def _like(layer: EPLayer, original: nn.Linear | _ConvNd) -> EPLayer:
    """Put the new layer on the replaced module's device and dtype, in its training mode."""
    reference = original.weight
    return layer.to(device=reference.device, dtype=reference.dtype).train(original.training)

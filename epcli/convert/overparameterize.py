"""``overparameterize``: plain ``nn.Linear`` / ``nn.ConvNd`` layers into EP layers, and the plan of what it replaces or keeps."""

from __future__ import annotations

import dataclasses
import fnmatch
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, cast

from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd
from torch.nn.utils import parametrize

from epcli.convert.model import replaced_copy
from epcli.convert.unwrap import unwrap_model
from epcli.errors import ConfigError
from epcli.layers.base import EPLayer
from epcli.layers.config import EPConfig, EPConv1dConfig, EPConv2dConfig, EPConv3dConfig, EPConvConfig, EPLinearConfig
from epcli.layers.registry import build_layer, is_transformers_conv1d, walk_modules

__all__ = ["Conversion", "ConversionPlan", "overparameterize", "plan_overparameterize"]


_EP_KWARGS = frozenset(
    {"batch_norm", "residual", "residual_intervals", "residual_mode", "collapse_on_eval", "negative_slope", "bn_eps",
     "bn_momentum"}
)
"""EP options ``overparameterize`` passes through; sizes, stride, padding and bias come from the replaced module."""




@dataclass(frozen=True)
class Conversion:
    """One module holding weights that ``overparameterize`` looked at: replaced (``params_after`` set) or kept
    (``reason`` set).

    Parameter counts are those that train: the module's own (a kept container's
    children are listed on their own), and the EP layer's expanded chain (after
    collapsing, the count is ``params_before`` again). ``changes`` lists how a
    replaced module's collapse differs from the module it replaced (see
    :attr:`EPConfig.deploy_changes`); empty when the original class loads it.
    """

    path: str
    kind: str
    params_before: int
    params_after: int | None = None
    reason: str | None = None
    changes: tuple[str, ...] = ()

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
    def changed(self) -> tuple[Conversion, ...]:
        """Replaced modules whose collapse has another architecture than the module replaced (``allow_new_bias``)."""
        return tuple(c for c in self.conversions if c.replaced and c.changes)

    @property
    def kept(self) -> tuple[Conversion, ...]:
        """Modules holding weights left as they are, each with the reason (not convertible, parametrized, not
        selected, too small, tied, or bias-free under batch_norm)."""
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
    allow_new_bias: bool = False,
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
    selection = _Selection.of(include, exclude, types, min_params, allow_new_bias)
    return _plan(unwrap_model(model), depth, width, selection, ep_kwargs)[0]


def overparameterize(
    model: nn.Module,
    depth: int = 2,
    width: float = 1,
    *,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
    types: Iterable[type[nn.Module]] | type[nn.Module] | None = None,
    min_params: int = 0,
    allow_new_bias: bool = False,
    **ep_kwargs: Any,
) -> nn.Module:
    """A copy with the selected ``nn.Linear`` / ``nn.Conv1d/2d/3d`` (and transformers ``Conv1D``) modules replaced
    by fresh EP equivalents.

    Sizes, stride, padding (and mode), groups, dilation and bias come from the
    replaced module; ``depth``, ``width`` and ``ep_kwargs`` (batch_norm, residual,
    residual_intervals, residual_mode, collapse_on_eval, negative_slope, bn_eps,
    bn_momentum) apply to every EP layer. Convolutions become
    ``kernel_sizes = [k] + [1] * (depth - 1)``, so the collapsed kernel keeps size k.
    A ``Conv1D`` (GPT-2) becomes an ``EPLinear`` whose collapse is stored in
    ``Conv1D``'s ``[in, out]`` layout. Existing EP layers are left as they are.

    What is converted: modules of ``types`` (default: every convertible type) whose
    path matches an ``include`` glob (default: all) and no ``exclude`` glob, with
    at least ``min_params`` parameters. A pattern matches a module's dotted path
    or any enclosing path, so ``"layer1"`` selects everything inside ``layer1`` and
    ``"*.downsample.*"`` every downsample branch. A module sharing a parameter with
    another module (tied embeddings: ``lm_head.weight is wte.weight``) is kept, so
    tying is never broken; so is a parametrized one (weight norm), whose state dict
    holds the parametrization's tensors, not a weight a collapse could fill.

    The collapse must load into the original class: a bias-free module under
    ``batch_norm=True`` would collapse with a new bias (batch-norm's shift), so it
    is kept unless ``allow_new_bias=True``; then it is converted and listed in
    ``plan.changed``. :func:`plan_overparameterize` takes the same arguments and
    returns every module holding weights, replaced or kept with the reason. When
    nothing is converted, a ``UserWarning`` says why.

    Wrapped models (DDP, ``torch.compile``, FSDP) are unwrapped first (:func:`unwrap_model`):
    the result is the converted plain model; wrap it again (a wrapper registers the
    parameters it wraps, and these are new ones). Better: convert before wrapping.

    Example::

        >>> ep = overparameterize(resnet, depth=4, exclude=["conv1", "fc"], types=[nn.Conv2d], min_params=1024)
    """
    model = unwrap_model(model)
    selection = _Selection.of(include, exclude, types, min_params, allow_new_bias)
    plan, replacements = _plan(model, depth, width, selection, ep_kwargs)
    if not replacements:
        warnings.warn(_nothing_converted(plan), UserWarning, stacklevel=2)
    return replaced_copy(model, replacements)


def _nothing_converted(plan: ConversionPlan) -> str:
    """Why a model came out of ``overparameterize`` without an EP layer, naming the first modules kept."""
    if not plan.kept:
        return "overparameterize converted nothing: the model holds no weights"
    shown = "; ".join(f"{c.path or '<model>'!r} ({c.kind}): {c.reason}" for c in plan.kept[:4])
    more = f"; and {len(plan.kept) - 4} more" if len(plan.kept) > 4 else ""
    return (
        f"overparameterize converted nothing: every module holding weights was kept: {shown}{more} "
        "(plan_overparameterize with the same arguments lists them all)"
    )


@dataclass(frozen=True)
class _Selection:
    """The validated choice of what to convert: types, include/exclude globs, a size floor, the new-bias opt-in."""

    types: tuple[type[nn.Module], ...] | None
    included: tuple[str, ...] | None
    excluded: tuple[str, ...]
    min_params: int
    allow_new_bias: bool

    @classmethod
    def of(
        cls,
        include: Iterable[str] | None,
        exclude: Iterable[str],
        types: Iterable[type[nn.Module]] | type[nn.Module] | None,
        min_params: int,
        allow_new_bias: bool,
    ) -> _Selection:
        if not isinstance(min_params, int) or isinstance(min_params, bool) or min_params < 0:
            raise ConfigError(f"overparameterize: min_params must be an int >= 0, got {min_params!r}")
        if not isinstance(allow_new_bias, bool):
            raise ConfigError(f"overparameterize: allow_new_bias must be True or False, got {allow_new_bias!r}")
        return cls(
            _selected_types(types),
            None if include is None else _patterns("include", include),
            _patterns("exclude", exclude),
            min_params,
            allow_new_bias,
        )


def _plan(
    model: nn.Module, depth: int, width: float, selection: _Selection, ep_kwargs: Mapping[str, Any]
) -> tuple[ConversionPlan, dict[int, nn.Module]]:
    """The plan and the replacement of each converted module by ``id`` (built in the module's dtype and device)."""
    unknown = sorted(set(ep_kwargs) - _EP_KWARGS)
    if unknown:
        raise ConfigError(f"overparameterize: unknown options {unknown}; allowed: {sorted(_EP_KWARGS)}")
    owners = _parameter_owners(model)
    conversions: list[Conversion] = []
    replacements: dict[int, nn.Module] = {}
    seen: set[int] = set()
    for path, module in walk_modules(model):
        if id(module) in seen:  # reused in two places: listed (and replaced) once
            continue
        seen.add(id(module))
        kind = type(module).__name__
        if parametrize.is_parametrized(module):
            seen.update(id(m) for m in _parametrizations(module).modules())  # its tensors are listed with it
        reason = _not_convertible(module)
        if reason is not None:
            if reason:  # "" for a module holding no weights of its own
                conversions.append(Conversion(path, kind, _own_params(module), reason=reason))
            continue
        count = _own_params(module)
        reason = _kept_because(path, module, count, selection, owners)
        config = None if reason is not None else _ep_config(path, module, depth, width, ep_kwargs)
        if config is not None and config.deploy_changes and not selection.allow_new_bias:
            reason = (
                f"converting it changes the deployed architecture: the collapse {'; '.join(config.deploy_changes)}, "
                "so the original class cannot load it; pass allow_new_bias=True to convert it anyway"
            )
        if reason is not None or config is None:
            conversions.append(Conversion(path, kind, count, reason=reason))
            continue
        layer = _like(build_layer(config), module)
        replacements[id(module)] = layer
        after = sum(p.numel() for p in layer.parameters())
        conversions.append(Conversion(path, kind, count, params_after=after, changes=config.deploy_changes))
    return ConversionPlan(tuple(conversions)), replacements


def _not_convertible(module: nn.Module) -> str | None:
    """Why a module cannot be converted ("" when it holds no weights of its own), or None when it can."""
    kind = type(module).__name__
    if isinstance(module, EPLayer):
        return "already an EP layer"
    if parametrize.is_parametrized(module):
        names = ", ".join(
            f"{name} ({', '.join(type(p).__name__ for p in chain.children())})"
            for name, chain in _parametrizations(module).items()
        )
        return (
            f"parametrized {names}: its state dict holds the parametrization's tensors, which a collapsed weight "
            "cannot be written back into; torch.nn.utils.parametrize.remove_parametrizations(module, name) first "
            "makes it a plain layer"
        )
    if _convertible(type(module)):
        return None
    if next(module.parameters(recurse=False), None) is None:
        return ""
    if isinstance(module, (nn.Linear, _ConvNd)):
        transposed = isinstance(module, _ConvNd) and module.transposed
        return (
            "a transposed convolution has no EP form" if transposed
            else f"a subclass of {_base_name(module)} whose forward may differ from it; only the exact class is converted"
        )
    return f"{kind} is not a linear or convolution layer"


def _parametrizations(module: nn.Module) -> nn.ModuleDict:
    """Parametrized tensor name -> its parametrization list (``torch.nn.utils.parametrize``)."""
    return cast(nn.ModuleDict, module.parametrizations)


def _base_name(module: nn.Module) -> str:
    return next(cls.__name__ for cls in type(module).__mro__[1:] if cls in _CONVERTIBLE or cls is _ConvNd)


def _own_params(module: nn.Module) -> int:
    """Parameters the module holds itself: all of a layer's (EP layers and parametrizations included), none of a
    container's children (they are listed on their own)."""
    whole = isinstance(module, EPLayer) or parametrize.is_parametrized(module) or _convertible(type(module))
    return sum(p.numel() for p in module.parameters(recurse=whole))


def _convertible(cls: type[nn.Module]) -> bool:
    """Exact types only: a subclass may change the forward."""
    return cls in _CONVERTIBLE or is_transformers_conv1d(cls)


def _selected_types(types: Iterable[type[nn.Module]] | type[nn.Module] | None) -> tuple[type[nn.Module], ...] | None:
    """The chosen types (None: every convertible type); a type that cannot be converted raises :class:`ConfigError`."""
    if types is None:
        return None
    chosen = (types,) if isinstance(types, type) else tuple(types)
    wrong = [t for t in chosen if not (isinstance(t, type) and _convertible(t))]
    if wrong:
        names = [getattr(t, "__name__", repr(t)) for t in wrong]
        raise ConfigError(
            f"overparameterize: types {names} cannot be converted; choose from "
            f"{[t.__name__ for t in _CONVERTIBLE]} or transformers.pytorch_utils.Conv1D"
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
    path: str, module: nn.Module, count: int, selection: _Selection, owners: Mapping[int, list[str]]
) -> str | None:
    """Why a convertible module stays plain by the user's selection or a tie, or None when it is converted."""
    if selection.types is not None and type(module) not in selection.types:
        return f"type {type(module).__name__} not selected"
    if selection.included is not None and not _matches(path, selection.included):
        return "matches no include pattern"
    if _matches(path, selection.excluded):
        return "matches an exclude pattern"
    if count < selection.min_params:
        return f"{count} parameters < min_params={selection.min_params}"
    for name, parameter in module.named_parameters(recurse=False):
        others = [other for other in owners.get(id(parameter), []) if other != path]
        if others:
            return f"{name} is shared with {others[0]!r} (tied); converting would untie it"
    return None


_EP_CONVS: Mapping[type[nn.Module], type[EPConvConfig]] = {
    nn.Conv1d: EPConv1dConfig, nn.Conv2d: EPConv2dConfig, nn.Conv3d: EPConv3dConfig
}
"""Plain convolution type -> the config of the EP convolution of the same family."""

_CONVERTIBLE: tuple[type[nn.Module], ...] = (nn.Linear, *_EP_CONVS)
"""torch module types ``overparameterize`` can replace (exact types: a subclass may change the forward); transformers'
``Conv1D`` too, recognised by name so that transformers is not imported."""


def _ep_config(path: str, module: nn.Module, depth: int, width: float, ep_kwargs: Mapping[str, Any]) -> EPConfig:
    """The EP config replacing ``module``, recording the module's bias where the collapse would differ from it."""
    where = f"{type(module).__name__} at {path or '<model>'!r}"
    had_bias = getattr(module, "bias", None) is not None
    config: EPConfig
    try:
        if isinstance(module, _ConvNd):
            config = _conv_config(module, depth, width, had_bias, ep_kwargs)
        elif isinstance(module, nn.Linear):
            config = EPLinearConfig(
                in_features=module.in_features, out_features=module.out_features, width=width, depth=depth,
                bias=had_bias, replaced_bias=had_bias, **ep_kwargs,
            )
        else:  # transformers' Conv1D: a linear layer storing its weight as [in, out], always with a bias
            in_features, out_features = cast(Tensor, module.weight).shape
            config = EPLinearConfig(
                in_features=in_features, out_features=out_features, width=width, depth=depth,
                bias=True, replaced_bias=True, weight_layout="in_out", **ep_kwargs,
            )
    except ConfigError as e:
        raise ConfigError(f"cannot overparameterize {where}: {e}") from e
    # recorded only where it matters, so every other config is written as it always was
    return config if config.deploy_changes else dataclasses.replace(config, replaced_bias=None)


def _conv_config(conv: _ConvNd, depth: int, width: float, had_bias: bool, ep_kwargs: Mapping[str, Any]) -> EPConvConfig:
    """The EP convolution's config with ``conv``'s sizes, stride, padding (and mode), dilation, groups and bias.

    ``kernel_sizes = [k] + [1] * (depth - 1)`` (k per dim, rectangular as it is), so the collapsed kernel is k.
    """
    padding = _symmetric_padding(conv)
    if padding is None:
        raise ConfigError(
            f"padding='same' with kernel_size {tuple(conv.kernel_size)} and dilation {tuple(conv.dilation)} pads one "
            "side more than the other; EP convolutions pad symmetrically: use an odd kernel or an explicit int padding"
        )
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 1:
        raise ConfigError(f"depth must be an int >= 1, got {depth!r}")
    return _EP_CONVS[type(conv)].from_arguments(
        [tuple(conv.kernel_size)] + [1] * (depth - 1),
        depth,
        in_channels=conv.in_channels,
        out_channels=conv.out_channels,
        padding=padding,
        stride=tuple(conv.stride),
        width=width,
        bias=had_bias,
        replaced_bias=had_bias,
        groups=conv.groups,
        dilation=tuple(conv.dilation),
        padding_mode=conv.padding_mode,
        **ep_kwargs,
    )


def _symmetric_padding(conv: _ConvNd) -> tuple[int, ...] | None:
    """Padding per dim ('valid' is 0; 'same' is dilation * (k - 1) / 2), or None when 'same' would pad unevenly."""
    padding = conv.padding
    if padding == "valid":
        return (0,) * len(conv.kernel_size)
    if padding == "same":
        totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        return None if any(t % 2 for t in totals) else tuple(t // 2 for t in totals)
    return tuple(int(p) for p in padding)


def _like(layer: EPLayer, original: nn.Module) -> EPLayer:
    """Put the new layer on the replaced module's device and dtype, in its training mode."""
    reference = next(original.parameters())
    return layer.to(device=reference.device, dtype=reference.dtype).train(original.training)

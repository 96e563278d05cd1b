"""Model transforms between the expanded (EP) and the plain form.

``collapse_model`` turns every EP layer into the ``nn.Linear`` / ``nn.Conv2d``
it computes in eval mode; ``overparameterize`` goes the other way for users who
start from a plain architecture. Both return new modules and leave their input
alone. ``collapse_state_dict`` / ``collapse_layer`` do the same on bare tensors
(one layer at a time), so checkpoints can be collapsed without user code.
"""

from __future__ import annotations

import copy
import fnmatch
import sys
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from epcli.core.affine import Affine
from epcli.core.finite import all_finite
from epcli.errors import CheckpointError, ConfigError
from epcli.layers.base import EPLayer
from epcli.layers.config import EPConfig
from epcli.layers.conv import EPConv, EPConv1d, EPConv2d, EPConv3d
from epcli.layers.linear import EPLinear
from epcli.layers.registry import (
    build_layer,
    check_state,
    collapsed_has_bias,
    expected_state,
    find_ep_layers,
    plain_layer,
    walk_modules,
)

__all__ = [
    "CollapseStep",
    "Conversion",
    "ConversionPlan",
    "collapse_layer",
    "collapse_model",
    "collapse_state_dict",
    "collapse_steps",
    "collapsed_dtype",
    "collapsed_keys",
    "collapsed_tensors",
    "expanded_eval",
    "expanded_layer",
    "layer_prefix",
    "layer_states",
    "overparameterize",
    "plain_model",
    "plan_overparameterize",
    "unwrap_model",
]

_FIRST_WEIGHT = "layer_dict.0.0.weight"
_STALE_KEYS = ("weight", "bias")
"""Collapsed buffers the original implementation persisted; derived, so ignored (as ``EPLayer`` does)."""

_EP_KWARGS = frozenset(
    {"batch_norm", "residual", "residual_intervals", "residual_mode", "collapse_on_eval", "negative_slope", "bn_eps",
     "bn_momentum"}
)
"""EP options ``overparameterize`` passes through; sizes, stride, padding and bias come from the replaced module."""


# ---- one layer, from tensors ---------------------------------------------------------
def expanded_layer(
    config: EPConfig,
    layer_state: Mapping[str, Tensor],
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    prefix: str = "",
) -> EPLayer:
    """The EP layer (eval mode) holding ``layer_state`` (keys relative to the layer), cast to ``dtype`` / ``device``.

    Built on the meta device and given the tensors as they are (no initialisation,
    no copy unless a cast needs one). The tensors are checked against the config
    first; errors name keys as ``prefix + key``. Collapsed buffers the original
    implementation persisted (``weight`` / ``bias``) are ignored.
    """
    state = {key: value for key, value in layer_state.items() if key not in _STALE_KEYS}
    check_state(expected_state(config), state, prefix=prefix)
    layer = build_layer(config, device="meta")
    layer.load_state_dict(state, strict=True, assign=True)
    return layer.to(device=device, dtype=dtype).eval()


def collapse_layer(
    config: EPConfig, layer_state: Mapping[str, Tensor], *, device: torch.device | str | None = None
) -> tuple[Tensor, Tensor | None]:
    """Collapse one EP layer given its config and its own state (keys relative to the layer).

    The collapse runs in float64 (on ``device`` when given, e.g. CUDA) and the
    result is cast to the dtype of the stored weights, on the CPU.
    Raises :class:`CheckpointError` / :class:`ShapeMismatchError` when the
    tensors do not fit the config.
    """
    return _collapse(config, layer_state, prefix="", device=device)


def _collapse(
    config: EPConfig, layer_state: Mapping[str, Tensor], prefix: str, device: torch.device | str | None
) -> tuple[Tensor, Tensor | None]:
    """:func:`collapse_layer`, with errors naming keys by their full path ``prefix + key``."""
    layer = expanded_layer(config, layer_state, device=device, prefix=prefix)
    where = f"layer {prefix.removesuffix('.') or '<model>'!r}"
    return collapsed_tensors(layer.collapse(), collapsed_dtype("", layer_state), where=where)


def collapsed_dtype(path: str, state: Mapping[str, Any]) -> torch.dtype:
    """The dtype the EP layer at ``path`` is stored in once collapsed: that of its first weight.

    ``state`` maps full keys to anything with a ``dtype`` (tensors, meta tensors, file listings).
    """
    key = layer_prefix(path) + _FIRST_WEIGHT
    if key not in state:
        raise CheckpointError(f"missing keys [{key!r}]")
    dtype: torch.dtype = state[key].dtype
    return dtype


def collapsed_tensors(affine: Affine, dtype: torch.dtype, *, where: str = "") -> tuple[Tensor, Tensor | None]:
    """Weight and bias of a collapse (float64 but for analysis) as fresh contiguous CPU tensors in ``dtype``.

    Always copies: the collapse may hand back an input tensor as is (a lone float64 bias).
    A value that does not fit ``dtype`` raises :class:`CheckpointError` starting with ``where``
    (e.g. ``"<file>: layer 'fc'"``): the stored parameters are finite, but their product is not.
    """
    weight = _fresh(affine.weight, dtype)
    bias = None if affine.bias is None else _fresh(affine.bias, dtype)
    for name, tensor, exact in (("weight", weight, affine.weight), ("bias", bias, affine.bias)):
        if tensor is not None and exact is not None and not all_finite(tensor):
            largest = float(exact.abs().max())
            raise CheckpointError(
                f"{where + ': ' if where else ''}the collapsed {name} overflows {dtype} (largest |value| {largest:.3g} in "
                f"{str(exact.dtype).removeprefix('torch.')}); a batch-norm whose running_var + eps is near 0 scales "
                "by 1/sqrt(var + eps): fix those statistics (or bn_eps), or keep the model in float64"
            )
    return weight, bias


def _fresh(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    """A contiguous CPU copy in ``dtype`` that shares no storage with anything."""
    out = torch.empty(tensor.shape, dtype=dtype, device="cpu")  # contiguous
    return out.copy_(tensor)


@dataclass(frozen=True)
class CollapseStep:
    """One step of collapsing a state dict: an EP layer (``layer`` is its path) or a key passed through."""

    layer: str | None
    keys: tuple[str, ...]


def collapse_steps(keys: Iterable[str], ep_layers: Mapping[str, EPConfig]) -> list[CollapseStep]:
    """The steps in output order: each EP layer where its first key stands, every other key as it comes.

    An EP layer with no keys at all raises :class:`CheckpointError` naming every missing tensor.
    """
    keys = list(keys)
    owned: dict[str, list[str]] = {path: [] for path in ep_layers}
    steps: list[CollapseStep] = []
    for key in keys:
        path = _owner(key, owned)
        if path is None:
            steps.append(CollapseStep(None, (key,)))
        else:
            if not owned[path]:
                steps.append(CollapseStep(path, ()))
            owned[path].append(key)
    for path, config in ep_layers.items():
        if not owned[path]:
            check_state(expected_state(config), {}, prefix=layer_prefix(path))
    return [step if step.layer is None else CollapseStep(step.layer, tuple(owned[step.layer])) for step in steps]


def collapse_state_dict(
    state_dict: Mapping[str, Tensor], ep_layers: Mapping[str, EPConfig], *, device: torch.device | str | None = None
) -> dict[str, Tensor]:
    """Expanded state dict -> collapsed: ``<path>.weight`` / ``<path>.bias`` per EP layer, the rest passed through.

    Collapsed keys take the place of the layer's first key, so the order follows
    the module order. Every output tensor is a contiguous CPU copy that shares no
    storage with the input or with another output; ``device`` is where the
    collapse math runs.
    """
    out: dict[str, Tensor] = {}
    for step in collapse_steps(state_dict, ep_layers):
        if step.layer is None:
            key = step.keys[0]
            out[key] = _fresh(state_dict[key].detach(), state_dict[key].dtype)
            continue
        prefix = layer_prefix(step.layer)
        layer_state = {key[len(prefix):]: state_dict[key] for key in step.keys}
        weight, bias = _collapse(ep_layers[step.layer], layer_state, prefix, device)
        weight_key, bias_key = collapsed_keys(step.layer)
        out[weight_key] = weight
        if bias is not None:
            out[bias_key] = bias
    return out


def layer_states(state_dict: Mapping[str, Tensor], paths: Iterable[str]) -> dict[str, dict[str, Tensor]]:
    """Each EP layer's own tensors, keys relative to the layer (``layer_dict.0.0.weight``, or ``weight``)."""
    owned: dict[str, dict[str, Tensor]] = {path: {} for path in paths}
    for key, value in state_dict.items():
        path = _owner(key, owned)
        if path is not None:
            owned[path][key[len(layer_prefix(path)):]] = value
    return owned


def layer_prefix(path: str) -> str:
    """The prefix of an EP layer's keys in a state dict: ``<path>.`` (a root layer: none)."""
    return f"{path}." if path else ""


def collapsed_keys(path: str) -> tuple[str, str]:
    """The keys of an EP layer's collapsed weight and bias: ``<path>.weight`` / ``<path>.bias`` (a root layer: no prefix)."""
    return layer_prefix(path) + "weight", layer_prefix(path) + "bias"


def _owner(key: str, paths: Mapping[str, Any]) -> str | None:
    """The EP layer path whose prefix ``key`` starts with, if any (``""`` is the model itself)."""
    if "" in paths:
        return ""
    parts = key.split(".")
    for end in range(1, len(parts)):
        candidate = ".".join(parts[:end])
        if candidate in paths:
            return candidate
    return None


# ---- whole models ------------------------------------------------------------------------
def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside ``DistributedDataParallel`` / ``DataParallel`` / ``torch.compile`` / FSDP wrappers.

    Their state dicts prefix every key (``module.``, ``_orig_mod.``) or hold shards;
    the plain model is what checkpoints and transforms should see. DDP and compile
    wrappers give the inner model itself. A sharded model (FSDP2 ``fully_shard``:
    DTensor parameters, classes ``FSDP<Name>``; FSDP1 ``FullyShardedDataParallel``:
    flattened parameters) gives a full, unsharded CPU copy in the original classes,
    without FSDP's hooks; gathering it is a collective, so call this (and
    everything that calls it) on every rank.
    """
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif _is_instance(model, "torch._dynamo.eval_frame", "OptimizedModule"):
            model = model._orig_mod  # type: ignore[assignment]
        else:
            break
    if any(_is_sharded(module) for module in model.modules()):
        return _gathered(model)
    return model


def _is_instance(obj: object, module: str, name: str) -> bool:
    """``isinstance`` against a torch class only if its module is already imported (importing dynamo costs ~1 s)."""
    loaded = sys.modules.get(module)
    cls = getattr(loaded, name, None) if loaded is not None else None
    return isinstance(cls, type) and isinstance(obj, cls)


def _is_fsdp1(module: nn.Module) -> bool:
    return _is_instance(module, "torch.distributed.fsdp", "FullyShardedDataParallel")


def _is_sharded(module: nn.Module) -> bool:
    return _is_fsdp1(module) or _is_instance(module, "torch.distributed.fsdp", "FSDPModule")


_FORWARD_HOOKS = (
    "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
)


def _gathered(model: nn.Module) -> nn.Module:
    """A full, unsharded CPU copy of an FSDP1/FSDP2 model, in the original module classes and without FSDP.

    The tensors come from ``get_model_state_dict(full_state_dict=True)`` (FSDP's own
    gather, keys as in the unwrapped model); the module tree is copied without its
    tensors, FSDP1 wrappers replaced by the module they wrap, FSDP2 classes by the
    class they extend, and each gathered tensor registered where its key says.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import FSDPModule

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}

    def skeleton(module: nn.Module) -> nn.Module:
        while _is_fsdp1(module):
            module = module.module  # type: ignore[assignment]  # the wrapped module
        cls: type[nn.Module] = type(module)
        sharded = isinstance(module, FSDPModule)
        if sharded:  # fully_shard swaps the class for FSDP<Name>(FSDPModule, Name)
            cls = next(b for b in cls.__bases__ if issubclass(b, nn.Module) and not issubclass(b, FSDPModule))
        copy_ = cls.__new__(cls)
        copy_.__dict__.update(module.__dict__)
        copy_._modules = {name: None if child is None else skeleton(child) for name, child in module._modules.items()}
        copy_._parameters = {}
        copy_._buffers = {  # non-persistent buffers are not in the state dict, and never sharded
            name: b.detach().cpu().clone() if b is not None and name in module._non_persistent_buffers_set else None
            for name, b in module._buffers.items()
        }
        for name in list(copy_.__dict__):  # FSDP's state lives in the module's dict
            if name.startswith(("__composable_api_state_key", "_fsdp", "_is_fsdp")):
                del copy_.__dict__[name]
        if sharded:
            for name in _FORWARD_HOOKS:
                setattr(copy_, name, type(getattr(module, name))())
        if isinstance(copy_, EPLayer):
            copy_._cache = None
        return copy_

    plain = skeleton(model)
    for key, value in state.items():
        if not isinstance(value, Tensor):  # a full, CPU-offloaded state dict holds plain tensors only
            raise ConfigError(f"gathering the sharded model gave a {type(value).__name__} for {key!r}, not a tensor")
        path, _, name = key.rpartition(".")
        owner = plain.get_submodule(path)
        owner.__dict__.pop(name, None)  # FSDP1 leaves views of its flat parameter as plain attributes
        if name in owner._buffers:
            owner._buffers[name] = value
        else:
            owner._parameters[name] = nn.Parameter(value, requires_grad=requires_grad.get(key, True))
    return plain


def _replaced(model: nn.Module, replacements: Mapping[int, nn.Module]) -> nn.Module:
    """A deep copy of ``model`` in which each module whose ``id`` is a key becomes its replacement.

    ``deepcopy`` consults its memo first, so seeding it with the replacements swaps
    those modules (wherever, and however often, they occur) without copying them.
    """
    memo: dict[int, Any] = dict(replacements)
    return copy.deepcopy(model, memo)


def collapse_model(model: nn.Module) -> nn.Module:
    """A new plain model: each EP layer replaced by ``nn.Linear`` / ``nn.Conv2d`` with its collapsed weights.

    The input model is left untouched; dtype and device of each layer are kept;
    the result is in eval mode. A wrapped model (DDP, ``torch.compile``, FSDP)
    gives the collapsed plain model (see :func:`unwrap_model`).

    Example::

        >>> plain = collapse_model(ep_model.eval())  # EPLinear -> nn.Linear, EPConv2d -> nn.Conv2d
    """
    model = unwrap_model(model)
    replacements: dict[int, nn.Module] = {}
    for layer in find_ep_layers(model).values():
        if id(layer) not in replacements:
            replacements[id(layer)] = _plain_from(layer)
    return _replaced(model, replacements).eval()


def plain_model(model: nn.Module, collapsed_state: Mapping[str, Tensor]) -> nn.Module:
    """A new plain model holding ``collapsed_state`` (e.g. a collapsed file's tensors); nothing is collapsed.

    Each EP layer becomes the ``nn.Linear`` / ``nn.Conv2d`` :func:`collapse_model` would make,
    and the state is loaded strictly (a mismatch raises ``RuntimeError`` naming the keys).
    """
    replacements: dict[int, nn.Module] = {}
    for layer in find_ep_layers(model).values():
        replacements.setdefault(id(layer), plain_layer(layer.config, bias=collapsed_has_bias(layer.config), device="meta"))
    plain = _replaced(model, replacements)
    plain.load_state_dict(collapsed_state, strict=True, assign=True)
    return plain.eval()


def _plain_from(layer: EPLayer) -> nn.Module:
    reference = next(layer.parameters())  # layer_dict.0.0.weight: the layer's dtype and device
    affine = layer.collapse()  # float64, pure: does not touch the layer
    plain = plain_layer(layer.config, bias=affine.bias is not None, device=reference.device, dtype=reference.dtype)
    with torch.no_grad():
        plain.weight.copy_(affine.weight)
        if affine.bias is not None and plain.bias is not None:
            plain.bias.copy_(affine.bias)
    return plain


@contextmanager
def expanded_eval(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, ``model`` is in eval mode with every EP layer running its expanded chain.

    The reference a collapse is judged against: same batch-norm statistics as the
    collapse, but the layer-by-layer arithmetic. Training mode and each layer's
    ``collapse_on_eval`` are restored on exit.
    """
    layers = list(find_ep_layers(model).values())
    flags = [layer.collapse_on_eval for layer in layers]
    modes = [(module, module.training) for module in model.modules()]
    try:
        for layer in layers:
            layer.collapse_on_eval = False
        yield model.eval()
    finally:
        for layer, flag in zip(layers, flags, strict=True):
            layer.collapse_on_eval = flag
        for module, training in modes:
            module.training = training


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
    return _replaced(model, replacements)


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

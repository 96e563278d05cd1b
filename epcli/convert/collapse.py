"""Collapse on bare tensors, one EP layer at a time: what checkpoints are collapsed with, no user code needed.

``collapse_state_dict`` / ``collapse_layer`` run the math in float64 and cast to the stored dtype;
``collapse_steps`` orders a state dict's keys into layers so a file can be collapsed as it streams.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from epcli.core.affine import Affine
from epcli.core.finite import all_finite
from epcli.errors import CheckpointError
from epcli.layers.base import EPLayer
from epcli.layers.config import EPConfig
from epcli.layers.registry import (
    build_layer,
    check_state,
    expected_state,
)

__all__ = [
    "CollapseStep",
    "collapse_layer",
    "collapse_state_dict",
    "collapse_steps",
    "collapsed_dtype",
    "collapsed_keys",
    "collapsed_tensors",
    "expanded_layer",
    "layer_prefix",
    "layer_states",
    "streamed_collapse",
]


_FIRST_WEIGHT = "layer_dict.0.0.weight"
_STALE_KEYS = ("weight", "bias")
"""Collapsed buffers the original implementation persisted; derived, so ignored (as ``EPLayer`` does)."""

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


def streamed_collapse(
    config: EPConfig,
    listing: Mapping[str, Tensor],
    read: Callable[[list[str]], Mapping[str, Tensor]],
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    prefix: str = "",
) -> Affine:
    """The float64 collapse of the EP layer whose tensors ``read(keys)`` returns (keys relative to the layer),
    cast to ``dtype`` / ``device`` as :func:`expanded_layer` casts them, read one chain layer at a time and given
    back once composed (:meth:`EPLayer.streamed_collapse`): for a layer too large to hold beside its collapse.

    ``listing`` maps the layer's keys to tensors of the stored shapes and dtypes (meta ones do, so nothing need be
    read); it is checked against the config first, errors naming keys as ``prefix + key``.
    """
    check_state(expected_state(config), {k: v for k, v in listing.items() if k not in _STALE_KEYS}, prefix=prefix)
    return build_layer(config, device="meta").streamed_collapse(read, dtype=dtype, device=device)


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
    dtype = collapsed_dtype("", layer_state)
    affine = expanded_layer(config, layer_state, device=device, prefix=prefix).release_collapse()
    return collapsed_tensors(affine, dtype, where=f"layer {prefix.removesuffix('.') or '<model>'!r}")


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

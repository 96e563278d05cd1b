"""Layers whose weight waits on disk and is read only while the layer runs.

``compress`` runs the whole collapsed model many times (a reference pass, a whitening pass per layer, a
measurement per candidate) but between those runs needs one layer's weight at a time (for its decomposition):
with the weights parked in a :class:`~epcli.storage.scratch.ScratchTensors`, the model is held a layer at a time. Only
for models epcli built from an embedded architecture: user code may read a layer's weight outside its
forward, where it would find the placeholder.

The placeholder keeps the weight's ``Parameter`` (so ties and identities hold), shape, dtype and device, but
holds a single NaN seen through stride-0 views: reading it by mistake gives NaN outputs, which never pass a
check, not a silently wrong model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from epcli.storage.scratch import ScratchTensors

__all__ = ["is_offloaded", "offload", "offloaded_weight", "restore"]

_STATE = "_epcli_offloaded"
"""The attribute of an offloaded module: (store, key). Nothing else is kept, so a deep copy of the module (which
shares the store) reads the same weight into its own parameter."""


def offload(layer: nn.Module, store: ScratchTensors) -> None:
    """Park ``layer.weight`` in ``store`` and read it back around each of the layer's forwards."""
    if is_offloaded(layer):
        return
    weight = _weight(layer)
    key = store.put(weight.data)
    weight.data = _placeholder(weight.data)
    layer.register_forward_pre_hook(_load)
    layer.register_forward_hook(_unload, always_call=True)  # a forward that raises frees the weight too
    setattr(layer, _STATE, (store, key))


def is_offloaded(layer: nn.Module) -> bool:
    return _STATE in vars(layer)


def offloaded_weight(layer: nn.Module) -> Tensor:
    """The layer's weight: read from the store when offloaded (a new tensor), else the layer's own."""
    if not is_offloaded(layer):
        return _weight(layer).detach()
    store, key = getattr(layer, _STATE)
    read: Tensor = store.get(key)
    return read.to(_weight(layer).dtype)


def restore(layer: nn.Module) -> None:
    """Read the weight back for good and remove the hooks."""
    if not is_offloaded(layer):
        return
    weight = offloaded_weight(layer)
    del vars(layer)[_STATE]
    for hooks, hook in ((layer._forward_pre_hooks, _load), (layer._forward_hooks, _unload)):
        for handle_id in [i for i, f in hooks.items() if f is hook]:
            del hooks[handle_id]
            layer._forward_hooks_always_called.pop(handle_id, None)
    _weight(layer).data = weight


def _load(layer: nn.Module, args: Any) -> None:
    _weight(layer).data = offloaded_weight(layer)


def _unload(layer: nn.Module, args: Any, output: Any) -> None:
    weight = _weight(layer)
    weight.data = _placeholder(weight.data)


def _weight(layer: nn.Module) -> nn.Parameter:
    weight = layer.weight
    assert isinstance(weight, nn.Parameter), f"{type(layer).__name__}.weight is not a parameter"
    return weight


def _placeholder(like: Tensor) -> Tensor:
    return torch.full((), torch.nan, dtype=like.dtype, device=like.device).expand(like.shape)

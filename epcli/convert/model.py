"""Whole-model transforms to the plain form: ``collapse_model`` (new module, input untouched), ``plain_model``
(a collapsed state loaded into the plain skeleton) and ``expanded_eval`` (the reference a collapse is judged against).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn

from epcli.convert.unwrap import unwrap_model
from epcli.layers.base import EPLayer
from epcli.layers.registry import (
    collapsed_has_bias,
    find_ep_layers,
    plain_layer,
)

__all__ = ["collapse_model", "expanded_eval", "plain_model", "replaced_copy"]


def replaced_copy(model: nn.Module, replacements: Mapping[int, nn.Module]) -> nn.Module:
    """A deep copy of ``model`` in which each module whose ``id`` is a key becomes its replacement.

    ``deepcopy`` consults its memo first, so seeding it with the replacements swaps
    those modules (wherever, and however often, they occur) without copying them.
    """
    memo: dict[int, Any] = dict(replacements)
    return copy.deepcopy(model, memo)


def collapse_model(model: nn.Module) -> nn.Module:
    """A new plain model: each EP layer replaced by ``nn.Linear`` / ``nn.ConvNd`` (or the transformers ``Conv1D`` it
    replaced) with its collapsed weights.

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
    return replaced_copy(model, replacements).eval()


def plain_model(model: nn.Module, collapsed_state: Mapping[str, Tensor]) -> nn.Module:
    """A new plain model holding ``collapsed_state`` (e.g. a collapsed file's tensors); nothing is collapsed.

    Each EP layer becomes the ``nn.Linear`` / ``nn.Conv2d`` :func:`collapse_model` would make,
    and the state is loaded strictly (a mismatch raises ``RuntimeError`` naming the keys).
    """
    replacements: dict[int, nn.Module] = {}
    for layer in find_ep_layers(model).values():
        replacements.setdefault(id(layer), plain_layer(layer.config, bias=collapsed_has_bias(layer.config), device="meta"))
    plain = replaced_copy(model, replacements)
    plain.load_state_dict(collapsed_state, strict=True, assign=True)
    return plain.eval()


def _plain_from(layer: EPLayer) -> nn.Module:
    reference = next(layer.parameters())  # layer_dict.0.0.weight: the layer's dtype and device
    affine = layer.collapse()  # float64, pure: does not touch the layer
    plain = plain_layer(layer.config, bias=affine.bias is not None, device=reference.device, dtype=reference.dtype)
    state = {"weight": affine.weight} if affine.bias is None else {"weight": affine.weight, "bias": affine.bias}
    plain.load_state_dict(state, strict=True)  # copies, cast to the plain layer's dtype
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

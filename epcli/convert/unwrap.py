"""The plain model inside DDP / DataParallel / ``torch.compile`` / FSDP wrappers (FSDP gathered into a full copy)."""

from __future__ import annotations

import sys

from torch import Tensor, nn

from epcli.errors import ConfigError
from epcli.layers.base import EPLayer

__all__ = ["unwrap_model"]


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

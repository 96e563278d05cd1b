"""Running the model's own forward on example inputs: the one place epcli calls a model it did not build.

:func:`check_forward` checks every shape on an empty batch; :func:`layer_input_shapes` records each EP
layer's per-sample input shape from one small batch; both run it through
:func:`~epcli.checkpoint.user_code.user_code`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from epcli.checkpoint.architecture import node_name
from epcli.checkpoint.inputs import InputSpec, describe_inputs
from epcli.checkpoint.user_code import MODEL_FORWARD, user_code
from epcli.convert import expanded_eval
from epcli.errors import CheckpointError, ConfigError, ModelInputError
from epcli.layers.registry import find_ep_layers
from epcli.limits import check_sample_shape
from epcli.text import quote

__all__ = ["check_forward", "layer_input_shapes"]


def check_forward(model: nn.Module, inputs: Sequence[InputSpec], source: str) -> None:
    """Run ``model`` on a batch of zero samples of its ``inputs``: every shape is checked, nothing is computed.

    Refuses a model whose forward fails on its own input shape, and any module whose
    output has more than :data:`~epcli.limits.MAX_SAMPLE_ELEMENTS` elements per
    sample (an ``AdaptiveAvgPool2d(10**6)``), naming the module. An empty batch
    allocates no activations on any device, and (unlike the meta device, whose first
    use imports seconds of torch) runs the ordinary kernels. EP layers run their
    expanded chains, so no collapse is computed.
    """
    def bound(path: str) -> Callable[[nn.Module, Any, Any], None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if isinstance(output, Tensor):
                check_sample_shape(output.shape[1:], f"the output of {node_name(path)} ({type(module).__name__})")

        return hook

    floats = [t for t in itertools.chain(model.parameters(), model.buffers()) if t.is_floating_point()]
    if any(t.dtype.itemsize == 1 for t in floats):
        return  # float8: torch has no CPU kernels to run it with; the file is read, not run
    reference = floats[0] if floats else None
    batch = [
        spec.example(
            0,
            dtype=reference.dtype if reference is not None else torch.get_default_dtype(),
            device=reference.device if reference is not None else None,
        )
        for spec in inputs
    ]
    handles = [module.register_forward_hook(bound(path)) for path, module in model.named_modules()]
    try:
        with user_code(MODEL_FORWARD, f"checking {source} on an empty batch"):
            try:
                with torch.no_grad(), expanded_eval(model):  # the chains, not a collapse: an empty batch costs nothing
                    model(*batch)
            except ConfigError as e:
                raise CheckpointError(f"{source}: {e}") from None
            except Exception as e:  # torch raises many types for a shape that does not fit
                raise CheckpointError(
                    f"{source} fails on its own {describe_inputs(inputs, ' ')}: "
                    f"{quote(f'{type(e).__name__}: {e}', 300)}"
                ) from None
    finally:
        for handle in handles:
            handle.remove()


def layer_input_shapes(model: nn.Module, specs: Sequence[InputSpec]) -> dict[str, tuple[int, ...]]:
    """Per-sample input shape of each EP layer, from one forward pass of ``model`` itself on constant inputs.

    No copy of the model: it runs in eval mode with its EP layers' expanded chains (no collapse is
    computed or cached) under ``no_grad``, so no parameter, buffer or batch-norm statistic changes;
    training flags and ``collapse_on_eval`` are restored afterwards (:func:`expanded_eval`).
    """
    layers = find_ep_layers(model)
    seen: dict[str, tuple[int, ...]] = {}

    def recorder(path: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def record(module: nn.Module, args: tuple[Any, ...]) -> None:
            if path not in seen and args and isinstance(args[0], Tensor):
                seen[path] = tuple(args[0].shape[1:])  # [batch, *sample] -> sample

        return record

    handles = [layer.register_forward_pre_hook(recorder(path)) for path, layer in layers.items()]
    reference = next((t for t in itertools.chain(model.parameters(), model.buffers()) if t.is_floating_point()), None)
    batch = [
        spec.example(
            2,
            dtype=reference.dtype if reference is not None else torch.get_default_dtype(),
            device=reference.device if reference is not None else None,
        )
        for spec in specs
    ]
    given = describe_inputs(specs)
    try:
        with user_code(MODEL_FORWARD, f"recording its EP layers' input shapes on {given}"):
            try:
                with expanded_eval(model), torch.no_grad():
                    model(*batch)
            except Exception as e:  # the user's forward may fail in any way on a wrong shape
                shapes = ", ".join(f"{list(t.shape)} {str(t.dtype).removeprefix('torch.')}" for t in batch)
                raise ModelInputError(
                    f"the model's forward fails on a batch of shape {shapes} ({given}): "
                    f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}; pass the shape "
                    "of one sample without the batch dimension (token ids and other non-float inputs: --input "
                    "'int64[16]:0:50257' on the command line, inputs=[InputSpec(...)] in Python)"
                ) from e
    finally:
        for handle in handles:
            handle.remove()
    unused = [path for path in layers if path not in seen]
    if unused:
        raise ConfigError(
            f"EP layers {unused} were not called by the forward pass on {given}; "
            "epcli needs every EP layer's input shape"
        )
    return seen

"""ONNX graphs of plain module trees, written node by node instead of traced.

A collapsed epcli model is usually a tree of ``nn.Sequential`` and plain torch
layers (the same types an embedded architecture may hold). For such a tree the
ONNX graph is known module by module, so it is emitted directly with
``onnx.helper``: milliseconds instead of the seconds torch's exporter spends
importing dynamo, tracing and decomposing, and no dependence on torch's
deprecated TorchScript exporter. Anything else (a custom ``forward``, a module
or setting without an emitter here, an opset below 13) returns ``None`` and the
caller traces the model with ``torch.onnx.export`` instead. Either way the
result is checked in onnxruntime against torch before it is written, and the
per-sample input shape is fixed, so each emitter only has to be right for the
shapes it sees.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from epcli.layers.lowrank import LOW_RANK

if TYPE_CHECKING:
    import onnx

__all__ = ["INPUT_NAME", "MIN_OPSET", "OUTPUT_NAME", "emit_onnx"]

INPUT_NAME = "input"
OUTPUT_NAME = "output"

MIN_OPSET = 13
"""Softmax takes one axis (not a 2-D coercion) from opset 13 on; below it the traced exporter is used."""


class _NoEmitter(Exception):
    """This module (or one of its settings) has no direct ONNX form here: trace the model instead."""


@dataclass
class _Graph:
    """Nodes and initialisers being built, with fresh value names.

    Initialisers stay numpy views of the module's tensors until the model is made,
    then become tensors one at a time, so the weights are copied into the model
    once (``helper.make_graph``/``make_model`` would copy a list of them twice more).
    """

    opset: int
    nodes: list[Any] = field(default_factory=list)
    initializers: list[tuple[str, Any]] = field(default_factory=list)  # (name, numpy array)
    _count: int = 0

    def name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def constant(self, hint: str, value: Tensor | Sequence[int] | float) -> str:
        if isinstance(value, Tensor):
            array = value.detach().to(torch.float32).cpu().numpy()
        elif isinstance(value, float):
            array = torch.tensor(value, dtype=torch.float32).numpy()
        else:
            array = torch.tensor(list(value), dtype=torch.int64).numpy()
        name = self.name(hint)
        self.initializers.append((name, array))
        return name

    def node(self, op: str, inputs: Sequence[str], hint: str, **attributes: Any) -> str:
        from onnx import helper

        output = self.name(hint)
        self.nodes.append(helper.make_node(op, list(inputs), [output], name=output, **attributes))
        return output


@dataclass(frozen=True)
class _Site:
    """Where a module sits in the graph: its dotted path and the shapes (batch first) it saw in the probe."""

    path: str
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]


Emitter = Callable[[_Graph, Any, str, _Site], str]


# ---- emitters, one per module family -------------------------------------------------------
def _spatial(values: Any, dims: int) -> list[int]:
    return [int(v) for v in values] if isinstance(values, (tuple, list)) else [int(values)] * dims


def _linear(graph: _Graph, module: nn.Linear, x: str, site: _Site) -> str:
    weight = graph.constant(f"{site.path}.weight", module.weight)
    if len(site.input_shape) == 2:
        inputs = [x, weight] if module.bias is None else [x, weight, graph.constant(f"{site.path}.bias", module.bias)]
        return graph.node("Gemm", inputs, site.path, transB=1)
    # (N, *, in) @ W^T: MatMul broadcasts over the leading dims
    transposed = graph.constant(f"{site.path}.weight_t", module.weight.t())
    out = graph.node("MatMul", [x, transposed], site.path)
    if module.bias is None:
        return out
    return graph.node("Add", [out, graph.constant(f"{site.path}.bias", module.bias)], site.path)


def _conv(graph: _Graph, module: nn.modules.conv._ConvNd, x: str, site: _Site) -> str:
    dims = len(site.input_shape) - 2
    if module.padding_mode != "zeros" or module.transposed:
        raise _NoEmitter
    kernel, dilation = _spatial(module.kernel_size, dims), _spatial(module.dilation, dims)
    if module.padding == "valid":
        begin = end = [0] * dims
    elif module.padding == "same":  # torch puts the odd pixel of a 'same' padding at the end
        total = [d * (k - 1) for d, k in zip(dilation, kernel)]
        begin, end = [t // 2 for t in total], [t - t // 2 for t in total]
    else:
        begin = end = _spatial(module.padding, dims)
    inputs = [x, graph.constant(f"{site.path}.weight", module.weight)]
    if module.bias is not None:
        inputs.append(graph.constant(f"{site.path}.bias", module.bias))
    return graph.node(
        "Conv", inputs, site.path, kernel_shape=kernel, strides=_spatial(module.stride, dims),
        pads=[*begin, *end], dilations=dilation, group=int(module.groups),
    )


def _batch_norm(graph: _Graph, module: nn.modules.batchnorm._BatchNorm, x: str, site: _Site) -> str:
    if module.running_mean is None or module.running_var is None:  # normalises by batch statistics in eval too
        raise _NoEmitter
    channels = module.num_features
    scale = module.weight if module.weight is not None else torch.ones(channels)
    shift = module.bias if module.bias is not None else torch.zeros(channels)
    inputs = [x, *(graph.constant(f"{site.path}.{n}", t) for n, t in
                   (("weight", scale), ("bias", shift), ("running_mean", module.running_mean),
                    ("running_var", module.running_var)))]
    return graph.node("BatchNormalization", inputs, site.path, epsilon=float(module.eps))


def _unary(op: str, **attributes: Callable[[Any], Any]) -> Emitter:
    def emit(graph: _Graph, module: Any, x: str, site: _Site) -> str:
        return graph.node(op, [x], site.path, **{k: read(module) for k, read in attributes.items()})

    return emit


def _silu(graph: _Graph, module: nn.SiLU, x: str, site: _Site) -> str:
    return graph.node("Mul", [x, graph.node("Sigmoid", [x], site.path)], site.path)


def _gelu(graph: _Graph, module: nn.GELU, x: str, site: _Site) -> str:
    if graph.opset >= 20:
        return graph.node("Gelu", [x], site.path, approximate=module.approximate)
    half_x = graph.node("Mul", [x, graph.constant("half", 0.5)], site.path)
    if module.approximate == "tanh":  # 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))
        cube = graph.node("Pow", [x, graph.constant("three", 3.0)], site.path)
        inner = graph.node("Add", [x, graph.node("Mul", [cube, graph.constant("c", 0.044715)], site.path)], site.path)
        scaled = graph.node("Mul", [inner, graph.constant("sqrt_2_over_pi", math.sqrt(2 / math.pi))], site.path)
        core = graph.node("Tanh", [scaled], site.path)
    else:  # 0.5 x (1 + erf(x / sqrt(2)))
        core = graph.node("Erf", [graph.node("Div", [x, graph.constant("sqrt_2", math.sqrt(2))], site.path)], site.path)
    return graph.node("Mul", [half_x, graph.node("Add", [core, graph.constant("one", 1.0)], site.path)], site.path)


def _softmax(op: str) -> Emitter:
    def emit(graph: _Graph, module: nn.Softmax | nn.LogSoftmax, x: str, site: _Site) -> str:
        rank = len(site.input_shape)
        # dim=None is torch's legacy implicit choice: 0 for ranks 0, 1 and 3, else 1
        axis = module.dim if module.dim is not None else (0 if rank in (0, 1, 3) else 1)
        return graph.node(op, [x], site.path, axis=int(axis) % rank)

    return emit


def _reshape(graph: _Graph, module: Any, x: str, site: _Site, first_kept: bool) -> str:
    """Reshape to the probed output shape; the batch axis is copied (0) when the module keeps it, else inferred (-1)."""
    target = [0 if first_kept else -1, *site.output_shape[1:]]
    return graph.node("Reshape", [x, graph.constant(f"{site.path}.shape", target)], site.path)


def _flatten(graph: _Graph, module: nn.Flatten, x: str, site: _Site) -> str:
    return _reshape(graph, module, x, site, first_kept=module.start_dim % len(site.input_shape) != 0)


def _unflatten(graph: _Graph, module: nn.Unflatten, x: str, site: _Site) -> str:
    if module.dim % len(site.input_shape) == 0:  # splitting the batch axis has no meaning for a dynamic batch
        raise _NoEmitter
    return _reshape(graph, module, x, site, first_kept=True)


def _passthrough(graph: _Graph, module: Any, x: str, site: _Site) -> str:
    return x  # dropout in eval mode, identity


def _window(module: Any, site: _Site) -> dict[str, Any]:
    dims = len(site.input_shape) - 2
    kernel = _spatial(module.kernel_size, dims)
    stride = _spatial(module.stride if module.stride is not None else module.kernel_size, dims)
    padding = _spatial(module.padding, dims)
    return {"kernel_shape": kernel, "strides": stride, "pads": padding * 2, "ceil_mode": int(module.ceil_mode)}


def _max_pool(graph: _Graph, module: Any, x: str, site: _Site) -> str:
    if module.return_indices:
        raise _NoEmitter
    dilation = _spatial(module.dilation, len(site.input_shape) - 2)
    return graph.node("MaxPool", [x], site.path, dilations=dilation, **_window(module, site))


def _avg_pool(graph: _Graph, module: Any, x: str, site: _Site) -> str:
    if getattr(module, "divisor_override", None) is not None:
        raise _NoEmitter
    return graph.node(
        "AveragePool", [x], site.path, count_include_pad=int(module.count_include_pad), **_window(module, site)
    )


def _adaptive_avg_pool(graph: _Graph, module: Any, x: str, site: _Site) -> str:
    sizes, outputs = site.input_shape[2:], site.output_shape[2:]
    if all(o == 1 for o in outputs):
        return graph.node("GlobalAveragePool", [x], site.path)
    if any(s % o for s, o in zip(sizes, outputs)):  # uneven bins are not one fixed window
        raise _NoEmitter
    kernel = [s // o for s, o in zip(sizes, outputs)]
    return graph.node("AveragePool", [x], site.path, kernel_shape=kernel, strides=kernel)


_EMITTERS: dict[type[nn.Module], Emitter] = {
    nn.Linear: _linear,
    **{conv: _conv for conv in (nn.Conv1d, nn.Conv2d, nn.Conv3d)},
    **{norm: _batch_norm for norm in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)},
    nn.ReLU: _unary("Relu"),
    nn.Tanh: _unary("Tanh"),
    nn.Sigmoid: _unary("Sigmoid"),
    nn.LeakyReLU: _unary("LeakyRelu", alpha=lambda m: float(m.negative_slope)),
    nn.ELU: _unary("Elu", alpha=lambda m: float(m.alpha)),
    nn.SiLU: _silu,
    nn.GELU: _gelu,
    nn.Softmax: _softmax("Softmax"),
    nn.LogSoftmax: _softmax("LogSoftmax"),
    nn.Flatten: _flatten,
    nn.Unflatten: _unflatten,
    **{drop: _passthrough for drop in (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)},
    **{pool: _max_pool for pool in (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)},
    **{pool: _avg_pool for pool in (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)},
    **{pool: _adaptive_avg_pool for pool in (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)},
}
"""Exact module type -> emitter; a subclass (which may override ``forward``) is traced instead."""


# ---- the tree ------------------------------------------------------------------------------------
def _leaves(module: nn.Module, path: str = "") -> Iterator[tuple[str, nn.Module]]:
    """The modules a tree of ``nn.Sequential`` runs, in order; anything else that has children is not a tree here."""
    if type(module) is nn.Sequential:
        for name, child in module._modules.items():  # every entry: named_children() hides a module used twice
            yield from _leaves(child, f"{path}.{name}" if path else name)
    elif type(module) in _EMITTERS:
        yield path or "model", module
    elif type(module) in LOW_RANK.values():  # a factored layer is its two plain layers in a row
        for name in ("down", "up"):
            yield from _leaves(getattr(module, name), f"{path}.{name}" if path else name)
    else:
        raise _NoEmitter


def _probe(model: nn.Module, leaves: Sequence[tuple[str, nn.Module]], example: Tensor) -> list[_Site]:
    """Each leaf's input and output shape on ``example``, in call order (one eval forward, no gradients)."""
    sites: list[_Site] = []
    paths = {id(module): path for path, module in leaves}

    def record(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        sites.append(_Site(paths[id(module)], tuple(args[0].shape), tuple(output.shape)))

    handles = [module.register_forward_hook(record) for _, module in leaves]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    return sites


def emit_onnx(
    model: nn.Module, input_shape: Sequence[int], *, opset: int, dynamic_batch: bool, consume: bool = False
) -> onnx.ModelProto | None:
    """The ONNX model of a plain ``nn.Sequential`` tree (float32, eval mode), or None when it has no direct form.

    Input :data:`INPUT_NAME` is ``[batch, *input_shape]`` (``batch`` symbolic with ``dynamic_batch``, else 1),
    output :data:`OUTPUT_NAME`. None means: trace it with ``torch.onnx.export`` instead. With ``consume``, an
    emitted model's parameters and buffers are taken out of ``model`` (left empty) and each is freed once its copy
    is in the ONNX model, so the weights are never held twice.
    """
    from onnx import TensorProto, helper, numpy_helper

    if opset < MIN_OPSET:
        return None
    try:
        leaves = list(_leaves(model))
    except _NoEmitter:
        return None
    if len({id(module) for _, module in leaves}) != len(leaves):  # a module reused in the tree: trace instead
        return None
    example = torch.zeros((2 if dynamic_batch else 1, *input_shape), dtype=torch.float32)
    sites = _probe(model.eval(), leaves, example)
    if len(sites) != len(leaves):  # a leaf not called exactly once: the tree is not what runs
        return None
    graph = _Graph(opset)
    value = INPUT_NAME
    try:
        for (_, module), site in zip(leaves, sites):
            value = _EMITTERS[type(module)](graph, module, value, site)
    except _NoEmitter:
        return None
    if not graph.nodes or graph.nodes[-1].output[0] != value:  # e.g. only identities: the output needs a node
        value = graph.node("Identity", [value], "identity")
    graph.nodes[-1].output[0] = OUTPUT_NAME  # the last node's value feeds nothing else
    batch: str | int = "batch" if dynamic_batch else 1
    output_shape = sites[-1].output_shape if sites else example.shape
    proto = helper.make_model(
        helper.make_graph(
            graph.nodes,
            "epcli",
            [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, [batch, *input_shape])],
            [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, [batch, *output_shape[1:]])],
        ),
        opset_imports=[helper.make_opsetid("", opset)],
        producer_name="epcli",
    )
    proto.ir_version = helper.find_min_ir_version_for(proto.opset_import)
    if consume:  # the arrays (views of the tensors) are then the tensors' last references
        for module in model.modules():
            for name in [*module._parameters, *module._buffers]:
                delattr(module, name)
    initializers, graph.initializers = deque(graph.initializers), []
    while initializers:
        name, array = initializers.popleft()
        proto.graph.initializer.append(numpy_helper.from_array(array, name))
        del array
    return proto

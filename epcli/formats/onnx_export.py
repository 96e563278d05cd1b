"""ONNX export of (collapsed) models and onnxruntime sessions to check them.

A plain ``nn.Sequential`` tree (what an embedded architecture rebuilds) is
written node by node (``onnx_graph``); anything else goes through
``torch.onnx.export`` (the torch.export-based exporter). The result is
serialised deterministically, so the same model gives the same bytes. Bytes stay in memory until they are checked and validated, so a
caller can refuse to write a file that does not pass.
"""

from __future__ import annotations

import contextlib
import io
import logging
import threading
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from epcli.errors import CheckpointError, ExportError
from epcli.formats.onnx_graph import INPUT_NAME, OUTPUT_NAME, emit_onnx
from epcli.inputs import InputSpec, describe_inputs

if TYPE_CHECKING:
    import onnx

__all__ = ["DEFAULT_OPSET", "INPUT_NAME", "OUTPUT_NAME", "OnnxSession", "export_onnx_bytes", "onnx_op_types"]

DEFAULT_OPSET = 18


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter logs and warns freely; library code must not print, so keep it quiet."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def export_onnx_bytes(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = True,
    inputs: Sequence[InputSpec] | None = None,
) -> bytes:
    """Serialised, checker-clean ONNX of ``model`` (float32, eval mode) for inputs ``[batch, *input_shape]``.

    With ``dynamic_batch`` the batch axis is symbolic ("batch"); otherwise it is fixed at 1.
    ``inputs`` (one spec per model input; its first shape is ``input_shape``) gives one ONNX
    input per spec, named ``input`` or ``input_0``, ``input_1``, ...; integer inputs keep their dtype.
    """
    import onnx

    model = model.eval()
    specs = tuple(inputs) if inputs is not None else (InputSpec(tuple(input_shape)),)
    one_float = len(specs) == 1 and specs[0].is_float
    proto = emit_onnx(model, input_shape, opset=opset, dynamic_batch=dynamic_batch) if one_float else None
    if proto is None:
        proto = _traced(model, specs, opset=opset, dynamic_batch=dynamic_batch)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as e:
        raise ExportError(f"the exported ONNX model does not pass onnx.checker: {e}") from e
    return proto.SerializeToString(deterministic=True)


def _traced(model: nn.Module, specs: Sequence[InputSpec], *, opset: int, dynamic_batch: bool) -> onnx.ModelProto:
    """``torch.onnx.export`` (torch.export-based) of any model it can trace; seconds, mostly its own imports."""
    # an example batch of 2 keeps torch.export from specialising a dynamic batch to 1
    examples = tuple(spec.example(2 if dynamic_batch else 1, dtype=torch.float32) for spec in specs)
    batch = torch.export.Dim("batch")
    dynamic_shapes = tuple({0: batch} for _ in specs) if dynamic_batch else None
    names = [INPUT_NAME] if len(specs) == 1 else [f"{INPUT_NAME}_{index}" for index in range(len(specs))]
    try:
        with _quiet_exporter():
            program = torch.onnx.export(
                model,
                examples,
                dynamo=True,
                input_names=names,
                output_names=[OUTPUT_NAME],
                dynamic_shapes=dynamic_shapes,
                opset_version=opset,
                verbose=False,
            )
    except Exception as e:  # the exporter raises many unrelated types
        raise ExportError(f"torch.onnx.export failed for {describe_inputs(specs)}: {e}") from e
    if program is None:
        raise ExportError("torch.onnx.export returned no program")
    return program.model_proto


def onnx_op_types(model: bytes | Path) -> list[str]:
    """Operator types of the main graph, in order (what deployment actually runs)."""
    import onnx

    proto = onnx.load_from_string(model) if isinstance(model, bytes) else onnx.load(str(model))
    return [node.op_type for node in proto.graph.node]


_NUMPY_TYPES = {
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(bool)": "bool",
}
"""ONNX input types a session feeds, as numpy dtypes."""


class OnnxSession:
    """An onnxruntime CPU session (all graph optimisations on) used as ``(*inputs) -> Tensor`` (its first output).

    An ONNX file is untrusted input: every run is bounded by ``timeout`` seconds
    (onnxruntime's terminate flag, which loops and subgraphs honour too), and every
    failure is a :class:`CheckpointError` naming the file.
    """

    def __init__(self, model: bytes | Path, *, timeout: float | None = None, expected_inputs: int = 1) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 4  # library code never prints: failures are raised, not logged
        source = model if isinstance(model, bytes) else str(model)
        self.where = where = "the exported ONNX model" if isinstance(model, bytes) else str(model)
        self.timeout = timeout
        try:
            self._session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise CheckpointError(f"{where}: onnxruntime cannot load it as an ONNX model: {e}") from e
        inputs, outputs = self._session.get_inputs(), self._session.get_outputs()
        if not inputs or len(inputs) > expected_inputs:
            raise CheckpointError(f"{where}: expected a model with {expected_inputs} input(s), found {len(inputs)}")
        if not outputs:
            raise CheckpointError(f"{where}: the model has no outputs")
        self.input_names = [item.name for item in inputs]
        self.numpy_dtypes = [_NUMPY_TYPES.get(item.type) for item in inputs]
        unsupported = [item.type for item, dtype in zip(inputs, self.numpy_dtypes, strict=True) if dtype is None]
        if unsupported:
            raise CheckpointError(
                f"{where}: unsupported input type {unsupported[0]}; expected {', '.join(sorted(_NUMPY_TYPES))}"
            )
        self.input_shapes: list[list[int | str | None]] = [list(item.shape) for item in inputs]
        self.input_name = inputs[0].name
        self.input_shape = self.input_shapes[0]
        self.output_shape: list[int | str | None] | None = None if outputs[0].shape is None else list(outputs[0].shape)
        self.numpy_dtype = self.numpy_dtypes[0]
        if outputs[0].type not in ("tensor(float)", "tensor(double)"):
            raise CheckpointError(f"{where}: unsupported output type {outputs[0].type}; expected float or double")

    def __call__(self, *batches: Tensor) -> Tensor:
        import onnxruntime as ort

        arrays = {
            name: batch.detach().cpu().numpy().astype(dtype)
            for name, batch, dtype in zip(self.input_names, batches, self.numpy_dtypes, strict=True)
        }
        array = arrays[self.input_name]
        options = ort.RunOptions()
        options.log_severity_level = 4
        timer = None
        if self.timeout is not None:
            timer = threading.Timer(self.timeout, setattr, (options, "terminate", True))
            timer.daemon = True
            timer.start()
        try:
            result = self._session.run(None, arrays, options)[0]
        except Exception as e:
            if options.terminate:
                raise CheckpointError(
                    f"{self.where}: one onnxruntime run (a batch of {array.shape[0]}) took longer than "
                    f"{self.timeout:g} s "
                    "and was stopped; raise --timeout if the model is meant to be that slow"
                ) from None
            raise CheckpointError(
                f"{self.where}: onnxruntime failed on an input of shape {list(array.shape)}: {str(e)[:300]}"
            ) from e
        finally:
            if timer is not None:
                timer.cancel()
        return torch.from_numpy(result)

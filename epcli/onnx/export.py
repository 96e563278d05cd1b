"""ONNX export of (collapsed) models and onnxruntime sessions to check them.

A plain ``nn.Sequential`` tree (what an embedded architecture rebuilds) is
written node by node (``onnx_graph``); anything else goes through
``torch.onnx.export`` (the torch.export-based exporter). The result is
serialised deterministically, so the same model gives the same bytes. Bytes
stay in memory until they are checked and validated, so a caller can refuse to
write a file that does not pass.

A model whose weights exceed protobuf's 2 GiB limit cannot be one serialised
message: :func:`save_external` writes it the ONNX way, as ``NAME.onnx`` plus
``NAME.onnx.data`` beside it holding every tensor of at least
:data:`EXTERNAL_TENSOR_MIN_BYTES` (the model names the file by its relative
location, so the pair must stay together), and checks it on the path.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import re
import threading
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from epcli.checkpoint.inputs import InputSpec, describe_inputs
from epcli.errors import CheckpointError, ExportError
from epcli.onnx.graph import INPUT_NAME, OUTPUT_NAME, emit_onnx

if TYPE_CHECKING:
    import onnx

__all__ = [
    "DEFAULT_OPSET",
    "EXTERNAL_DATA_THRESHOLD",
    "EXTERNAL_TENSOR_MIN_BYTES",
    "INPUT_NAME",
    "OUTPUT_NAME",
    "OnnxSession",
    "build_onnx",
    "check_onnx",
    "export_onnx_bytes",
    "external_data_path",
    "initializer_nbytes",
    "onnx_op_types",
    "parse_onnx",
    "save_external",
    "serialize_onnx",
    "set_onnx_metadata",
    "write_onnx",
]

DEFAULT_OPSET = 18
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26
"""Initializer bytes above which a model is written with external data: protobuf refuses messages over 2 GiB,
and 64 MiB are left for the graph, the small tensors kept inline and the metadata."""
EXTERNAL_TENSOR_MIN_BYTES = 1024
"""Tensors of at least this many bytes go to the external data file (onnx's own default); smaller ones stay inline."""


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
    data = serialize_onnx(build_onnx(model, input_shape, opset=opset, dynamic_batch=dynamic_batch, inputs=inputs))
    check_onnx(data)
    return data


def build_onnx(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = True,
    inputs: Sequence[InputSpec] | None = None,
) -> onnx.ModelProto:
    """The ONNX model of ``model`` (emitted node by node when it takes one float input, else traced), not yet
    checked (:func:`check_onnx`); ``inputs`` as for :func:`export_onnx_bytes`."""
    model = model.eval()
    specs = tuple(inputs) if inputs is not None else (InputSpec(tuple(input_shape)),)
    one_float = len(specs) == 1 and specs[0].is_float
    proto = emit_onnx(model, input_shape, opset=opset, dynamic_batch=dynamic_batch) if one_float else None
    if proto is None:
        proto = _traced(model, specs, opset=opset, dynamic_batch=dynamic_batch)
    return proto


def check_onnx(proto: onnx.ModelProto | bytes | Path) -> None:
    """``onnx.checker`` (full check), in memory or, for a model with external data, on its path. Given the
    serialised bytes, the checker does not serialise the model again (a copy of every weight)."""
    import onnx

    try:
        onnx.checker.check_model(proto if not isinstance(proto, Path) else str(proto), full_check=True)
    except Exception as e:
        where = f"{proto}: " if isinstance(proto, Path) else ""
        raise ExportError(f"{where}the exported ONNX model does not pass onnx.checker: {e}") from e


def serialize_onnx(proto: onnx.ModelProto) -> bytes:
    """Deterministic bytes: the same model gives the same file."""
    data: bytes = proto.SerializeToString(deterministic=True)
    return data


def parse_onnx(data: bytes) -> onnx.ModelProto:
    """The model :func:`serialize_onnx` gave ``data`` for (serialising it again gives the same bytes)."""
    import onnx

    proto: onnx.ModelProto = onnx.ModelProto.FromString(data)
    return proto


def initializer_nbytes(proto: onnx.ModelProto) -> int:
    """Bytes of the main graph's initializers, from their types and shapes: the size decision needs no serialising."""
    from onnx import helper

    total = 0
    for tensor in proto.graph.initializer:
        itemsize = helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        total += itemsize * math.prod(tensor.dims)
    return total


def external_data_path(path: Path) -> Path:
    """``NAME.onnx.data`` beside ``NAME.onnx``: where :func:`save_external` puts the tensors."""
    return path.with_name(f"{path.name}.data")


def save_external(proto: onnx.ModelProto, path: Path, *, min_tensor_bytes: int = EXTERNAL_TENSOR_MIN_BYTES) -> Path:
    """Write ``proto`` as ``path`` plus its external data file (returned), fsync both, check them on the path.

    Tensors of at least ``min_tensor_bytes`` move to the data file one at a time,
    each leaving the model as it is written, so the weights are not held twice.
    ``proto`` is changed in place (its big tensors then point into the file), so
    writing it again with :func:`write_onnx` keeps the same data file.
    """
    from onnx import external_data_helper

    data = external_data_path(path)
    external_data_helper.convert_model_to_external_data(
        proto, all_tensors_to_one_file=True, location=data.name, size_threshold=min_tensor_bytes
    )
    try:
        data.write_bytes(b"")  # onnx appends: start empty (and a model with no big tensor still gets its pair)
        external_data_helper.write_external_data_tensors(proto, str(path.parent))
        _fsync(data)
    except OSError as e:
        raise ExportError(f"cannot write {data}: {e.strerror or e}") from e
    write_onnx(proto, path)
    return data


def write_onnx(proto: onnx.ModelProto, path: Path) -> None:
    """Serialise ``proto`` to ``path``, fsync it, and check it there (the path form also checks external data)."""
    try:
        path.write_bytes(serialize_onnx(proto))
        _fsync(path)
    except OSError as e:
        raise ExportError(f"cannot write {path}: {e.strerror or e}") from e
    check_onnx(path)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def set_onnx_metadata(proto: onnx.ModelProto, values: Mapping[str, str]) -> None:
    """Set ``metadata_props`` (string to string, in key order so the bytes are deterministic)."""
    kept = [entry for entry in proto.metadata_props if entry.key not in values]
    del proto.metadata_props[:]
    for entry in kept:
        proto.metadata_props.add(key=entry.key, value=entry.value)
    for key in sorted(values):
        proto.metadata_props.add(key=key, value=values[key])


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
        raise ExportError(
            f"torch.onnx.export cannot trace the model for {describe_inputs(specs)}: {_exporter_cause(e)}; "
            "a custom forward must be traceable by torch.export (e.g. no Python branch on tensor values), "
            "or ship the collapsed weights with --safetensors"
        ) from e
    if program is None:
        raise ExportError("torch.onnx.export returned no program")
    return program.model_proto


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_USER_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<function>\S+)\n\s*(?P<code>.+)')


def _exporter_cause(error: BaseException) -> str:
    """The one line of torch's multi-paragraph export error that says what failed, and where in the user's code.

    Torch prints advice, links and colour codes around it; a CLI error stays one line.
    """
    text = _ANSI.sub("", str(error))
    summary = text.split("## Exception summary", 1)[-1]
    lines = [line.strip() for line in summary.splitlines() if line.strip()]
    cause = re.sub(r"^<class '[^']+'>: ", "", lines[0]) if lines else type(error).__name__
    frame = _USER_FRAME.search(text)
    where = f" (at {frame['file']}:{frame['line']} in {frame['function']}: {frame['code'].strip()[:120]})" if frame else ""
    return cause[:300] + where


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
        if isinstance(model, Path) and not model.is_file():  # onnxruntime's own text would be "NO_SUCHFILE ..."
            what = "is a directory, not an ONNX file" if model.is_dir() else "no such file; check the path"
            raise CheckpointError(f"{where}: {what}", file=model)
        try:
            self._session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise CheckpointError(f"{where}: onnxruntime cannot load it as an ONNX model: {e}") from e
        inputs, outputs = self._session.get_inputs(), self._session.get_outputs()
        if not inputs or len(inputs) > expected_inputs:
            raise CheckpointError(f"{where}: expected a model with {expected_inputs} input(s), found {len(inputs)}")
        if not outputs:
            raise CheckpointError(f"{where}: the model has no outputs")
        self.metadata: dict[str, str] = dict(self._session.get_modelmeta().custom_metadata_map)
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
        self.output_shapes: list[list[int | str | None] | None] = [
            None if item.shape is None else list(item.shape) for item in outputs
        ]
        for item in outputs:
            if item.type not in ("tensor(float)", "tensor(double)"):
                raise CheckpointError(
                    f"{where}: output {item.name!r} has unsupported type {item.type}; expected float or double"
                )

    def __call__(self, *batches: Tensor) -> Tensor | tuple[Tensor, ...]:
        """The model's output: one tensor, or a tuple of them in the order of the graph's outputs (which is
        how the exporter flattened a tuple / dict output: :func:`epcli.checkpoint.inputs.tensor_leaves` order)."""
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
            results = self._session.run(None, arrays, options)
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
        tensors = tuple(torch.from_numpy(result) for result in results)
        return tensors[0] if len(tensors) == 1 else tensors

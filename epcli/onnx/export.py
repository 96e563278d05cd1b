"""ONNX export of (collapsed) models and onnxruntime sessions to check them.

A plain ``nn.Sequential`` tree (what an embedded architecture rebuilds) is
written node by node (``onnx_graph``); anything else goes through
``torch.onnx.export`` (the torch.export-based exporter). The result is
serialised deterministically, so the same model gives the same bytes. Each ONNX
output is named by its tensor's path in the model's output (:func:`output_name`:
``output``, ``output.logits``, ``output[0]``), and :class:`OnnxSession` gives them back
under those paths, whatever their count. Files are written by :mod:`epcli.onnx.files`.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import re
import select
import signal
import subprocess
import sys
import warnings
import weakref
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from epcli.checkpoint.inputs import InputSpec, Leaves, describe_inputs, tensor_leaves
from epcli.checkpoint.user_code import MODEL_FORWARD, run_forward, user_code
from epcli.errors import CheckpointError, ExportError, UsageError
from epcli.limits import MAX_METADATA_CHARS, MAX_ONNX_RUN_BYTES, MAX_TIMEOUT, MIN_OPSET, is_int
from epcli.onnx import runner
from epcli.onnx.graph import INPUT_NAME, OUTPUT_NAME, emit_onnx
from epcli.text import clip, plural, quote

if TYPE_CHECKING:
    import onnx

__all__ = [
    "DEFAULT_OPSET",
    "EXPORTED",
    "EXTERNAL_DATA_THRESHOLD",
    "INPUT_NAME",
    "OUTPUT_NAME",
    "OnnxSession",
    "build_onnx",
    "check_onnx",
    "export_onnx_bytes",
    "external_data_path",
    "initializer_nbytes",
    "onnx_op_types",
    "output_name",
    "output_path",
    "serialize_onnx",
    "set_onnx_metadata",
]

DEFAULT_OPSET = 18
EXPORTED = "the exported ONNX model"
"""What messages call a model epcli exported and has not written yet."""
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26
"""Initializer bytes above which a model is written with external data: protobuf refuses messages over 2 GiB,
and 64 MiB are left for the graph, the small tensors kept inline and the metadata."""


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
    consume: bool = False,
) -> onnx.ModelProto:
    """The ONNX model of ``model`` (emitted node by node when it takes one float input, else traced), not yet
    checked (:func:`check_onnx`); ``inputs`` as for :func:`export_onnx_bytes`. With ``consume``, a model emitted
    node by node is left without its tensors, each freed as it is copied (:func:`~epcli.onnx.graph.emit_onnx`)."""
    newest = _newest_opset()
    if not is_int(opset) or not MIN_OPSET <= opset <= newest:
        raise UsageError(
            f"opset must be a whole number from {MIN_OPSET} to {newest} (the newest the installed onnx knows), "
            f"got {quote(opset)}"
        )
    model = model.eval()
    specs = tuple(inputs) if inputs is not None else (InputSpec(tuple(input_shape)),)
    one_float = len(specs) == 1 and specs[0].is_float
    proto = emit_onnx(model, input_shape, opset=opset, dynamic_batch=dynamic_batch, consume=consume) if one_float else None
    if proto is None:
        proto = _traced(model, specs, opset=opset, dynamic_batch=dynamic_batch)
    return proto


def _newest_opset() -> int:
    import onnx

    return int(onnx.defs.onnx_opset_version())


def check_onnx(proto: onnx.ModelProto | bytes | Path, *, name: Path | None = None) -> None:
    """``onnx.checker`` (full check), in memory or on a path (external data is resolved beside it, not read). Given
    the serialised bytes, the checker does not serialise the model again (a copy of every weight). Errors name
    ``name``, else the path."""
    import onnx

    try:
        onnx.checker.check_model(proto if not isinstance(proto, Path) else str(proto), full_check=True)
    except Exception as e:
        shown = name if name is not None else proto if isinstance(proto, Path) else None
        where = f"{shown}: " if shown is not None else ""
        raise ExportError(f"{where}{EXPORTED} does not pass onnx.checker: {e}") from e


def serialize_onnx(proto: onnx.ModelProto) -> bytes:
    """Deterministic bytes: the same model gives the same file."""
    data: bytes = proto.SerializeToString(deterministic=True)
    return data


def initializer_nbytes(proto: onnx.ModelProto) -> int:
    """Bytes of the main graph's initializers, from their types and shapes: the size decision needs no serialising."""
    from onnx import helper

    total = 0
    for tensor in proto.graph.initializer:
        itemsize = helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        total += itemsize * math.prod(tensor.dims)
    return total


def external_data_path(path: Path) -> Path:
    """``NAME.onnx.data`` beside ``NAME.onnx``: where :func:`~epcli.onnx.files.save_external` puts the tensors."""
    return path.with_name(f"{path.name}.data")


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
    # one entry for the wrapper's *inputs, holding one per input
    dynamic_shapes = (tuple({0: batch} for _ in specs),) if dynamic_batch else None
    names = [INPUT_NAME] if len(specs) == 1 else [f"{INPUT_NAME}_{index}" for index in range(len(specs))]
    with torch.no_grad():  # the exporter flattens the output as tensor_leaves does: tensors in order, None left out
        paths = [path for path, _ in tensor_leaves(run_forward(model, *examples, doing="naming its outputs"))]
    try:
        with user_code(MODEL_FORWARD, "being traced for ONNX"), _quiet_exporter():
            program = torch.onnx.export(
                _TensorLeaves(model),
                examples,
                dynamo=True,
                input_names=names,
                output_names=[output_name(path) for path in paths],
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


class _TensorLeaves(nn.Module):
    """The model with its output flattened to :func:`tensor_leaves`' tensors, so what the exporter traces is what
    epcli compares: a Hugging Face cache (``DynamicCache``) or other non-tensor value in the output, which
    torch.export cannot flatten, is left out as ``None`` is. The model is the wrapper's only child, ``model``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        return tuple(tensor for _, tensor in tensor_leaves(self.model(*inputs)))


def output_name(path: str) -> str:
    """The ONNX name of the output tensor at ``path`` in the model's output: ``output``, ``output.logits``."""
    return OUTPUT_NAME + path


def output_path(name: str) -> str | None:
    """The path :func:`output_name` made ``name`` from; None for a name it did not make (another exporter's)."""
    path = name.removeprefix(OUTPUT_NAME)
    return path if name.startswith(OUTPUT_NAME) and (not path or path[0] in ".[") else None


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
    """An onnxruntime CPU session (all graph optimisations on) used as ``(*inputs) -> Leaves`` (its outputs, by path).

    An ONNX file is untrusted input: the session runs in a child process
    (:mod:`epcli.onnx.runner`) whose address space is bounded by
    :data:`~epcli.limits.MAX_ONNX_RUN_BYTES` plus twice the model's bytes, and loading it
    and every run are bounded by ``timeout`` seconds (the child is killed). Every failure,
    the bound hit included, is a :class:`CheckpointError` naming the file; what the file
    says comes back cut short (metadata keys by :func:`~epcli.text.clip` and values to
    :data:`~epcli.limits.MAX_METADATA_CHARS`, which a message echoing one must quote; names in
    onnxruntime's errors by :func:`~epcli.text.quote`). Messages call the model ``name``, by default its path
    (``the exported ONNX model`` for bytes).
    """

    def __init__(
        self, model: bytes | Path, *, timeout: float | None = None, expected_inputs: int = 1, name: str | None = None
    ) -> None:
        if timeout is not None and not (isinstance(timeout, (int, float)) and 0 < timeout <= MAX_TIMEOUT):
            raise UsageError(
                f"timeout must be a number of seconds > 0 and <= {MAX_TIMEOUT:g} (epcli's limit), got {quote(timeout)}"
            )
        self.where = where = name or (EXPORTED if isinstance(model, bytes) else str(model))
        self.timeout = timeout
        if isinstance(model, Path) and not model.is_file():  # onnxruntime's own text would be "NO_SUCHFILE ..."
            what = "is a directory, not an ONNX file" if model.is_dir() else "no such file; check the path"
            raise CheckpointError(f"{where}: {what}", file=model)
        size = len(model) if isinstance(model, bytes) else _model_bytes(model)
        self.address_space = MAX_ONNX_RUN_BYTES + 2 * size
        self._child = subprocess.Popen(
            [sys.executable, "-m", "epcli.onnx.runner", str(self.address_space), str(_MAX_FRAME)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )
        self._finalizer = weakref.finalize(self, _stop, self._child)
        self._receive("starting", _START_SECONDS)
        request = {"path": str(model)} if isinstance(model, Path) else {"inline": True}
        self._send(runner.JSON, json.dumps(request).encode())
        if isinstance(model, bytes):
            self._send(runner.MODEL, model)
        description = json.loads(self._receive("loading it"))
        inputs, outputs = description["inputs"], description["outputs"]
        if not inputs or len(inputs) > expected_inputs:
            raise CheckpointError(f"{where}: expected a model with {plural(expected_inputs, 'input')}, found {len(inputs)}")
        if not outputs:
            raise CheckpointError(f"{where}: the model has no outputs")
        self.metadata: dict[str, str] = {  # whole values: a compression record is read from them
            clip(key): clip(value, MAX_METADATA_CHARS) for key, value in description["metadata"].items()
        }
        self.input_names = [clip(name) for name, _, _ in inputs]  # for messages: the child feeds its own
        self.numpy_dtypes = [_NUMPY_TYPES.get(kind) for _, kind, _ in inputs]
        unsupported = [kind for (_, kind, _), dtype in zip(inputs, self.numpy_dtypes, strict=True) if dtype is None]
        if unsupported:
            raise CheckpointError(
                f"{where}: unsupported input type {quote(unsupported[0])}; expected {', '.join(sorted(_NUMPY_TYPES))}"
            )
        self.input_shapes: list[list[int | str | None]] = [_clipped(shape) for _, _, shape in inputs]
        self.input_name = self.input_names[0]
        self.input_shape = self.input_shapes[0]
        paths = [path for path in (output_path(name) for name, _, _ in outputs) if path is not None]
        self.output_paths = paths if len(set(paths)) == len(outputs) else None
        self.output_shapes: list[list[int | str | None] | None] = [
            None if shape is None else _clipped(shape) for _, _, shape in outputs
        ]
        for name, kind, _ in outputs:
            if kind not in ("tensor(float)", "tensor(double)"):
                raise CheckpointError(
                    f"{where}: output {quote(name)} has unsupported type {quote(kind)}; expected float or double"
                )

    def __call__(self, *batches: Tensor) -> Leaves | tuple[Tensor, ...]:
        """The outputs under the paths their names give (:func:`output_path`); from a file whose names are not
        paths (another exporter's), a tuple in the order of the graph's outputs."""
        arrays = [
            batch.detach().cpu().numpy().astype(dtype)
            for batch, dtype in zip(batches, self.numpy_dtypes, strict=True)
        ]
        self._send(runner.ARRAYS, runner.encode_arrays(arrays))
        results = runner.read_arrays(self._receive(f"a run on an input of shape {list(arrays[0].shape)}"))
        tensors = tuple(torch.from_numpy(result) for result in results)
        if self.output_paths is None:
            return tensors
        return Leaves(zip(self.output_paths, tensors, strict=True))

    def close(self) -> None:
        """End the child process (also done when the session is garbage-collected)."""
        self._finalizer()

    def _send(self, kind: bytes, payload: bytes) -> None:
        assert self._child.stdin is not None
        try:
            runner.write_frame(self._child.stdin, kind, payload)  # type: ignore[arg-type]
        except OSError:
            self._receive("sending it the input")  # the child is gone: say why
            raise

    def _receive(self, doing: str, timeout: float | None = None) -> bytes:
        """The child's next reply (within ``timeout``, else the session's); a timeout, a failure or the child's
        death as a CheckpointError."""
        assert self._child.stdout is not None
        stdout = self._child.stdout
        seconds = self.timeout if timeout is None else timeout
        ready, _, _ = select.select([stdout], [], [], seconds)
        if not ready:
            self.close()
            raise CheckpointError(
                f"{self.where}: onnxruntime took longer than {seconds:g} s {doing} and was stopped; raise "
                "--timeout if the model is meant to be that slow"
            )
        try:
            kind, payload = runner.read_frame(stdout, _MAX_FRAME)  # type: ignore[arg-type]
        except EOFError:
            code = self._child.wait()
            raise CheckpointError(
                f"{self.where}: onnxruntime ended ({_ending(code)}) {doing}, most likely at epcli's bound of "
                f"{self.address_space / 2**30:.1f} GiB of address space for an ONNX run (MAX_ONNX_RUN_BYTES plus "
                "twice the model's size): the model allocates more than that"
            ) from None
        if kind == runner.ERROR:
            text = payload.decode(errors="replace")
            bound = (
                f"; the run is bounded to {self.address_space / 2**30:.1f} GiB of address space (epcli's limit, "
                "MAX_ONNX_RUN_BYTES plus twice the model's size), which the model exceeded"
                if any(word in text.lower() for word in ("alloc", "memory"))
                else ""
            )
            action = "cannot load it as an ONNX model" if text.startswith("load:") else f"failed on {doing}"
            raise CheckpointError(f"{self.where}: onnxruntime {action}: {quote(text.partition(': ')[2], 300)}{bound}")
        return payload


_START_SECONDS = 120.0
"""How long the onnxruntime process may take to start (a Python interpreter importing onnxruntime), apart from
the timeout of loading the model and of each run."""
_MAX_FRAME = 2**40
"""Frames between epcli and its onnxruntime process: bounded by what each side allocates anyway."""


def _clipped(shape: list[int | str | None]) -> list[int | str | None]:
    """A shape as the file gives it, symbolic sizes (strings of any length) cut short for messages."""
    return [clip(size) if isinstance(size, str) else size for size in shape]


def _model_bytes(path: Path) -> int:
    """The model file's size and its external data file's (when there is one beside it)."""
    try:
        data = external_data_path(path)
        return path.stat().st_size + (data.stat().st_size if data.is_file() else 0)
    except OSError:
        return 0  # a file that vanished meanwhile: onnxruntime then says what is wrong with the path


def _ending(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _stop(child: subprocess.Popen[bytes]) -> None:
    if child.poll() is None:
        child.kill()
    child.wait()
    for pipe in (child.stdin, child.stdout):
        if pipe is not None:
            pipe.close()

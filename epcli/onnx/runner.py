"""The process that runs an ONNX model for :class:`~epcli.onnx.export.OnnxSession`, under an address-space bound.

An ONNX file is untrusted input, and onnxruntime bounds neither what a graph allocates
(a 508-byte ``ConstantOfShape`` asks for 2.3 GB, a small ``Loop`` for more) nor, once a
kernel runs, how long it takes. So the session lives in a child process (``python -m
epcli.onnx.runner``, which imports only numpy and onnxruntime) whose ``RLIMIT_AS`` is set
before the model is loaded: an allocation beyond it fails in the child, never in epcli's
process, and a run past its time is ended by killing the child.

The two talk over the child's stdin and stdout in frames: a 1-byte kind, an 8-byte length,
then the payload (JSON text, or arrays as ``.npy`` bytes read back without pickle).
"""

from __future__ import annotations

import io
import json
import os
import struct
import sys
from typing import Any, BinaryIO

__all__ = ["ARRAYS", "ERROR", "JSON", "MODEL", "encode_arrays", "read_arrays", "read_frame", "write_frame"]

JSON, ARRAYS, MODEL, ERROR = b"J", b"A", b"M", b"E"
_HEAD = struct.Struct("<cQ")


def write_frame(f: BinaryIO, kind: bytes, payload: bytes) -> None:
    f.write(_HEAD.pack(kind, len(payload)) + payload)
    f.flush()


def read_frame(f: BinaryIO, limit: int) -> tuple[bytes, bytes]:
    """One frame of at most ``limit`` payload bytes; EOFError when the other side is gone."""
    head = f.read(_HEAD.size)
    if len(head) != _HEAD.size:
        raise EOFError("the other process closed its pipe")
    kind, size = _HEAD.unpack(head)
    if size > limit:
        raise EOFError(f"a frame of {size} bytes, over {limit}")
    payload = f.read(size)
    if len(payload) != size:
        raise EOFError("the other process closed its pipe")
    return kind, payload


def encode_arrays(arrays: list[Any]) -> bytes:
    """A frame's payload of arrays: their count, then each as its size and ``.npy`` bytes."""
    import numpy as np

    buffer = io.BytesIO()
    buffer.write(struct.pack("<I", len(arrays)))
    for array in arrays:
        one = io.BytesIO()
        np.save(one, np.ascontiguousarray(array), allow_pickle=False)
        buffer.write(struct.pack("<Q", one.tell()) + one.getvalue())
    return buffer.getvalue()


def read_arrays(payload: bytes) -> list[Any]:
    import numpy as np

    view = memoryview(payload)
    (count,) = struct.unpack_from("<I", view)
    position, arrays = 4, []
    for _ in range(count):
        (size,) = struct.unpack_from("<Q", view, position)
        arrays.append(np.load(io.BytesIO(view[position + 8 : position + 8 + size]), allow_pickle=False))
        position += 8 + size
    return arrays


def _serve(address_space: int, max_frame: int) -> None:
    """Load the model (a path in the first frame, or the bytes of the next), describe it, then answer each frame of
    inputs with outputs."""
    import resource

    import onnxruntime as ort

    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing but frames on the pipe
    resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))
    write_frame(stdout, JSON, b"{}")  # started: the time a run may take counts from here
    _, request = read_frame(stdin, max_frame)
    source = json.loads(request)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 4
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    # initializers in buffers of their own size, not in chunks of the arena, which can overshoot: the same kernels,
    # prepacking and optimisations on the same values (256 MiB of weights: +410 MiB, not +506; 1 GiB: +2 GiB either)
    options.add_session_config_entry("session.use_device_allocator_for_initializers", "1")
    try:
        model = source["path"] if "path" in source else read_frame(stdin, max_frame)[1]
        session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        description = {
            "inputs": [[item.name, item.type, item.shape] for item in session.get_inputs()],
            "outputs": [[item.name, item.type, item.shape] for item in session.get_outputs()],
            "metadata": dict(session.get_modelmeta().custom_metadata_map),
        }
    except Exception as e:  # onnxruntime raises its own types (and MemoryError)
        write_frame(stdout, ERROR, f"load: {type(e).__name__}: {e}".encode(errors="replace"))
        return
    write_frame(stdout, JSON, json.dumps(description).encode())
    names = [name for name, _, _ in description["inputs"]]
    while True:
        try:
            _, payload = read_frame(stdin, max_frame)
        except EOFError:
            return
        try:
            results = session.run(None, dict(zip(names, read_arrays(payload), strict=True)))
        except Exception as e:
            write_frame(stdout, ERROR, f"run: {type(e).__name__}: {e}".encode(errors="replace"))
            continue
        write_frame(stdout, ARRAYS, encode_arrays(results))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _serve(int(sys.argv[1]), int(sys.argv[2]))

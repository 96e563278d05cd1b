"""ONNX files written a tensor at a time (:mod:`epcli.onnx.files`): the bytes serialising the model whole gives,
before and after the metadata is rewritten in place; the checker's view of them without their weights, and what
checks the weights instead (the writer their sizes, onnxruntime running the real file their values)."""

from __future__ import annotations

import copy
import weakref
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper
from torch import nn

from epcli.errors import CheckpointError, ExportError
from epcli.onnx.export import OnnxSession, build_onnx, serialize_onnx, set_onnx_metadata
from epcli.onnx.files import check_written, write_metadata, write_onnx


def _emitted() -> onnx.ModelProto:
    torch.manual_seed(0)
    return build_onnx(nn.Sequential(nn.Linear(40, 300), nn.ReLU(), nn.Linear(300, 3)), (40,))


def _every_field() -> onnx.ModelProto:
    """The emitted model with a field set before and after each place the writer splits the model and its graph."""
    proto = _emitted()
    proto.doc_string = "before the graph"
    proto.metadata_props.add(key="theirs", value="kept")
    proto.functions.add(name="f", domain="d")
    proto.training_info.add()
    graph = proto.graph
    graph.doc_string = "after the initializers"
    graph.value_info.append(helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2]))
    graph.sparse_initializer.append(
        helper.make_sparse_tensor(numpy_helper.from_array(np.ones(1, np.float32), "s"),
                                  numpy_helper.from_array(np.zeros(1, np.int64), "i"), [3])
    )
    graph.metadata_props.add(key="graph", value="its own")
    return proto


@pytest.mark.parametrize("make", [_emitted, _every_field])
def test_the_file_is_the_serialised_model_before_and_after_its_metadata(make, tmp_path):
    proto = make()
    path = tmp_path / "m.onnx"

    written = write_onnx(proto, path)

    assert path.read_bytes() == serialize_onnx(proto)
    values = {"b": "2", "a": "1"}
    write_metadata(written, values)
    set_onnx_metadata(proto, values)
    assert path.read_bytes() == serialize_onnx(proto)
    write_metadata(written, {"a": "one"})  # again: the tail is replaced, not appended to
    set_onnx_metadata(proto, {"a": "one"})
    assert path.read_bytes() == serialize_onnx(proto)


def test_consume_frees_each_tensor_of_an_emitted_model():
    """The weights are never held twice: the model's tensors die as the ONNX model takes its copies."""
    model = nn.Sequential(nn.Linear(40, 30), nn.BatchNorm1d(30), nn.Linear(30, 3)).eval()
    expected = serialize_onnx(build_onnx(copy.deepcopy(model), (40,)))
    tensors = [weakref.ref(tensor) for tensor in [*model.parameters(), *model.buffers()]]

    proto = build_onnx(model, (40,), consume=True)

    assert all(ref() is None for ref in tensors)
    assert not list(model.parameters()) and not list(model.buffers())
    assert serialize_onnx(proto) == expected


def test_the_checker_is_shown_the_file_with_its_weights_left_out(tmp_path):
    """Each tensor of 1 KiB or more points at its bytes in the written file: read with that external data, the
    weightless model is the file."""
    proto = _emitted()
    path = tmp_path / "m.onnx"

    written = write_onnx(proto, path)

    assert written.weightless is not None
    left_out = {t.name for t in written.weightless.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    assert left_out == {t.name for t in proto.graph.initializer if len(t.raw_data) >= 1024} == {
        "0.weight_1", "0.bias_2", "2.weight_5"
    }
    assert written.weightless.ByteSize() < 2048 < path.stat().st_size
    copy_path = tmp_path / "weightless.onnx"
    copy_path.write_bytes(serialize_onnx(written.weightless))
    loaded = onnx.load(str(copy_path))  # each left-out tensor read from m.onnx at its offset
    for tensor in loaded.graph.initializer:
        tensor.ClearField("data_location")
    assert serialize_onnx(loaded) == path.read_bytes()
    check_written(written)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "weightless.onnx"]  # the check's copy is gone


def test_a_file_named_with_two_dots_is_checked_too(tmp_path):
    """onnx refuses an external data location holding "..", so the weightless model cannot name such a file."""
    path = tmp_path / "model..v2.onnx"
    written = write_onnx(_emitted(), path)

    check_written(written)

    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    broken = _emitted()
    _unknown_op(broken)
    with pytest.raises(ExportError, match="Relu2"):
        check_written(write_onnx(broken, path))


def _undefined_input(proto: onnx.ModelProto) -> None:
    proto.graph.node[1].input[0] = "nowhere"


def _unknown_op(proto: onnx.ModelProto) -> None:
    proto.graph.node[1].op_type = "Relu2"


def _weight_of_the_wrong_shape(proto: onnx.ModelProto) -> None:
    """A left-out tensor's shape still reaches shape inference (full check): 41 columns for 40 inputs."""
    proto.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.zeros((300, 41), np.float32), "0.weight_1"))


@pytest.mark.parametrize(
    ("corrupt", "match"),
    [(_undefined_input, "nowhere"), (_unknown_op, "Relu2"), (_weight_of_the_wrong_shape, "between 41 and 40")],
)
def test_the_weightless_check_rejects_a_broken_graph(corrupt, match, tmp_path):
    proto = _emitted()
    corrupt(proto)
    with pytest.raises((onnx.checker.ValidationError, onnx.shape_inference.InferenceError), match=match):  # as before
        onnx.checker.check_model(proto, full_check=True)
    path = tmp_path / "m.onnx"
    written = write_onnx(proto, path)
    del proto

    with pytest.raises(ExportError, match=match) as caught:
        check_written(written)

    assert str(caught.value).startswith(f"{path}: the exported ONNX model does not pass onnx.checker")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


@pytest.mark.parametrize("change", [-4, 4])
def test_raw_data_not_the_size_of_its_shape_is_refused_as_it_is_written(change, tmp_path):
    """The checker's size check on a tensor it is no longer shown, made by the writer (exactly, as onnxruntime
    does; the checker refused only short data)."""
    proto = _emitted()
    weight = proto.graph.initializer[0]
    weight.raw_data = weight.raw_data[:change] if change < 0 else weight.raw_data + bytes(change)

    with pytest.raises(ExportError, match=r"'0\.weight_1' does not hold the 48000 bytes of raw data its shape \[300, 40\]"):
        write_onnx(proto, tmp_path / "m.onnx")


def _rewritten_weight(path: Path, written, values: np.ndarray) -> None:
    """Overwrite the first weight's bytes in the file, where the weightless model says they are."""
    reference = written.weightless.graph.initializer[0]
    offset = int({entry.key: entry.value for entry in reference.external_data}["offset"])
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(values.tobytes())


def test_weights_the_checker_no_longer_reads_are_checked_by_running_the_file(tmp_path):
    """Wrong values pass the weightless check (as they passed the whole checker) and show in onnxruntime's outputs;
    a tensor cut short in the file stops onnxruntime from loading it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 300), nn.ReLU(), nn.Linear(300, 3)).eval()
    x = torch.randn(4, 40)
    with torch.no_grad():
        expected = model(x)
    path = tmp_path / "m.onnx"
    written = write_onnx(build_onnx(model, (40,)), path)
    _rewritten_weight(path, written, np.full(8, 1e3, np.float32))

    check_written(written)
    session = OnnxSession(path)
    got = session(x)[""]
    session.close()

    assert (got - expected).abs().max() > 1.0
    short = build_onnx(model, (40,))
    weight = short.graph.initializer[0]
    weight.raw_data = weight.raw_data[:-4]
    path.write_bytes(serialize_onnx(short))
    with pytest.raises(CheckpointError, match="cannot load it as an ONNX model.*0.weight_1"):
        OnnxSession(path)

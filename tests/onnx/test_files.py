"""ONNX files written a tensor at a time (:mod:`epcli.onnx.files`): the bytes serialising the model whole gives,
before and after the metadata is rewritten in place."""

from __future__ import annotations

import copy
import weakref

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper
from torch import nn

from epcli.onnx.export import build_onnx, serialize_onnx, set_onnx_metadata
from epcli.onnx.files import write_metadata, write_onnx


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

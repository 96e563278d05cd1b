"""The ONNX writing helpers behind ``export --onnx``: size estimate, external data, metadata.

References are independent of the helpers: tensor bytes from numpy, outputs from torch.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from epcli.onnx.export import build_onnx, initializer_nbytes, set_onnx_metadata
from epcli.onnx.files import save_external


@pytest.fixture
def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(40, 30), nn.ReLU(), nn.Linear(30, 3)).eval()


def test_initializer_bytes_are_counted_without_serialising(model):
    proto = build_onnx(model, (40,))

    expected = sum(numpy_helper.to_array(t).nbytes for t in proto.graph.initializer)
    assert initializer_nbytes(proto) == expected == 4 * sum(p.numel() for p in model.parameters())


def test_save_external_moves_big_tensors_to_the_data_file_and_runs(model, tmp_path):
    proto = build_onnx(model, (40,))
    path = tmp_path / "m.onnx"

    save_external(proto, path, min_tensor_bytes=1024)

    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    loaded = onnx.load(str(path), load_external_data=False)
    external = {t.name for t in loaded.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    big = {t.name for t in build_onnx(model, (40,)).graph.initializer if numpy_helper.to_array(t).nbytes >= 1024}
    assert external == big and len(big) == 1  # only the 40x30 weight (4800 bytes); 360 and 12 stay inline
    x = np.random.default_rng(0).standard_normal((4, 40)).astype(np.float32)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, model(torch.from_numpy(x)).numpy(), atol=1e-5, rtol=1e-5)


def test_metadata_replaces_its_keys_and_keeps_the_others(model):
    proto = build_onnx(model, (40,))
    proto.metadata_props.add(key="theirs", value="kept")

    set_onnx_metadata(proto, {"b": "2", "a": "1"})
    set_onnx_metadata(proto, {"a": "one"})

    assert [(p.key, p.value) for p in proto.metadata_props] == [("theirs", "kept"), ("b", "2"), ("a", "one")]

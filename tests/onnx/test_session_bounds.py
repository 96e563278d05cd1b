"""ONNX files given to ``verify`` run in a child process bounded in address space and time: a few hundred bytes
that allocate gigabytes are stopped at the bound, which the message names with the file; what the file says
comes back cut short. Numeric options have documented bounds, refused by the library as UsageError
(exit 2); an artifact over its bounds is an unusable input (exit 3)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import epcli
from epcli import EPLinear
from epcli.checkpoint.inputs import tensor_leaves
from epcli.errors import CheckpointError, UsageError
from epcli.limits import MAX_METADATA_CHARS, MAX_SAMPLES, MAX_TIMEOUT
from epcli.onnx.export import OnnxSession, build_onnx
from epcli.verification.compare import VerifySettings


def _save(path: Path, nodes: list, initializers: list = (), props: dict[str, str] | None = None, domain: str = ""):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.zeros((6, 4), np.float32), "W")
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 6])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 4])], initializer=[weight, *initializers],
    )
    opsets = [helper.make_opsetid("", 18)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    if props:
        helper.set_model_props(model, props)
    onnx.save(model, str(path))
    return path


def _summed_into_output(big: str) -> list:
    from onnx import helper

    return [
        helper.make_node("ReduceSum", [big], ["s"], keepdims=0),
        helper.make_node("MatMul", ["input", "W"], ["m"]),
        helper.make_node("Add", ["m", "s"], ["output"]),
    ]


def _constant_of_shape(path: Path) -> Path:
    """A few hundred bytes that ask for 2.4 GB: ConstantOfShape([6e8]) of float32."""
    from onnx import TensorProto, helper, numpy_helper

    shape = numpy_helper.from_array(np.array([600_000_000], np.int64), "shape")
    value = helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["big"], value=value), *_summed_into_output("big")]
    return _save(path, nodes, [shape])


def _doubling_loop(path: Path) -> Path:
    """A Loop that concatenates its state with itself 40 times: 2**40 copies of the input."""
    from onnx import TensorProto, helper, numpy_helper

    body = helper.make_graph(
        [helper.make_node("Concat", ["x", "x"], ["x_out"], axis=0), helper.make_node("Identity", ["c"], ["c_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("c", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("c_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x_out", TensorProto.FLOAT, None)],
    )
    trips = numpy_helper.from_array(np.array(40, np.int64), "trips")
    condition = numpy_helper.from_array(np.array(True), "cond")
    nodes = [helper.make_node("Loop", ["trips", "cond", "input"], ["grown"], body=body), *_summed_into_output("grown")]
    return _save(path, nodes, [trips, condition])


@pytest.mark.parametrize("make", [_constant_of_shape, _doubling_loop], ids=["ConstantOfShape", "Loop"])
def test_a_model_that_allocates_gigabytes_is_stopped_at_the_address_space_bound(tmp_path: Path, make):
    path = make(tmp_path / "model.onnx")
    assert path.stat().st_size < 1000
    session = OnnxSession(path, timeout=60)
    with pytest.raises(CheckpointError, match=rf"{path}: onnxruntime .*bounded to 1.3 GiB of address space"):
        session(torch.zeros(2, 6))
    session.close()


def test_a_normal_model_runs_and_answers_again(tmp_path: Path):
    from onnx import helper

    session = OnnxSession(_save(tmp_path / "m.onnx", [helper.make_node("MatMul", ["input", "W"], ["output"])]))
    for batch in (1, 3):
        (path, out), = tensor_leaves(session(torch.ones(batch, 6)))  # the graph's one output, named "output"
        assert path == "" and out.shape == (batch, 4) and not out.any()
    session.close()


def test_a_megabyte_custom_op_name_comes_back_cut_short(tmp_path: Path):
    from onnx import helper

    path = _save(tmp_path / "custom.onnx", [helper.make_node("X" * 2**20, ["input"], ["output"], domain="evil")],
                 domain="evil")
    with pytest.raises(CheckpointError, match=r"cannot load it as an ONNX model") as caught:
        OnnxSession(path)
    assert len(str(caught.value)) < 1000


def test_metadata_values_are_cut_short(tmp_path: Path):
    from onnx import helper

    """Values are kept whole up to MAX_METADATA_CHARS (a compression record is read from them), keys are clipped;
    messages that echo a value quote it."""
    name = "\x1b]0;owned\x07" + "n" * (MAX_METADATA_CHARS + 10)
    path = _save(tmp_path / "stale.onnx", [helper.make_node("MatMul", ["input", "W"], ["output"])],
                 props={"source_sha256": "0" * 64, "source_name": name, "k" * 500: "v"})
    session = OnnxSession(path)
    assert session.metadata["source_sha256"] == "0" * 64
    assert session.metadata["source_name"] == name[:MAX_METADATA_CHARS] + "..."
    assert max(len(key) for key in session.metadata) <= 123
    session.close()


@pytest.mark.parametrize("timeout", [0, -1, 1e20, MAX_TIMEOUT * 2, math.nan, math.inf])
def test_timeouts_outside_their_bounds_are_refused(tmp_path: Path, timeout: float):
    with pytest.raises(UsageError, match=r"timeout must be a number of seconds > 0 and <= 86400"):
        OnnxSession(tmp_path / "never-read.onnx", timeout=timeout)


@pytest.mark.parametrize("samples", [0, MAX_SAMPLES + 1, 10**9, 2**64])
def test_sample_counts_outside_their_bounds_are_refused(samples: int):
    with pytest.raises(UsageError, match=rf"samples must be a whole number from 1 to {MAX_SAMPLES}"):
        VerifySettings(samples=samples)
    with pytest.raises(UsageError, match=rf"batch_size must be a whole number from 1 to {MAX_SAMPLES}"):
        VerifySettings(batch_size=samples)


@pytest.mark.parametrize("opset", [6, 10**9, 2**64])
def test_opsets_outside_their_bounds_are_refused(opset: int):
    with pytest.raises(UsageError, match=r"opset must be a whole number from 7 to \d+"):
        build_onnx(nn.Sequential(nn.Linear(6, 4)), [6], opset=opset)


@pytest.mark.slow
def test_bounds_reach_the_command_line_as_input_and_usage_errors(tmp_path: Path, run_bounded):
    torch.manual_seed(0)
    checkpoint = epcli.save_checkpoint(nn.Sequential(EPLinear(6, 4, depth=2)), tmp_path / "small.pt", input_shape=[6])
    bomb = _constant_of_shape(tmp_path / "bomb.onnx")
    runs = {
        "bomb": run_bounded("verify", checkpoint, bomb, "--samples", "4"),
        "timeout": run_bounded("verify", checkpoint, bomb, "--timeout", "1e20"),
        "samples": run_bounded("verify", checkpoint, "--samples", str(10**9)),
        "opset": run_bounded("export", checkpoint, "--onnx", tmp_path / "out.onnx", "--opset", str(10**9)),
    }
    for name, run in runs.items():
        expected = 3 if name == "bomb" else 2  # the artifact is an input that cannot be used; the rest are options
        assert run.returncode == expected and "Traceback" not in run.stderr and "unexpected" not in run.stderr, (name, run)
        assert run.max_rss < 1.5 * 2**30, (name, run.max_rss)
    assert str(bomb) in runs["bomb"].message and "bounded to 1.3 GiB" in runs["bomb"].message
    assert "timeout must be" in runs["timeout"].message and "samples must be" in runs["samples"].message
    assert "opset must be" in runs["opset"].message and not (tmp_path / "out.onnx").exists()

"""``epcli export CKPT --onnx OUT.onnx [--opset N] [--static-batch]`` / ``--safetensors OUT``."""

from __future__ import annotations

import json
import os
import weakref

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

import epcli

ONNX_TOLERANCE = {"atol": 1e-4, "rtol": 1e-4}  # float32: collapsed torch model vs onnxruntime


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _batch_dim(path):
    dim = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[0]
    return dim.dim_param, dim.dim_value


# ---- the installed console script ------------------------------------------------------------
def test_subprocess_export_onnx(samples, run_epcli, json_doc, golden, schema_of):
    output = samples.dir / "mlp.onnx"

    run = run_epcli("export", samples.mlp, "--onnx", output, "--json")

    assert run.returncode == 0, run.describe()
    assert "Traceback" not in run.stderr and "\x1b" not in run.stderr
    document = json_doc(run.stdout)
    expected = {k: v for k, v in golden("export_keys.json").items() if not k.startswith("$.safetensors")}
    expected["$"] = [k for k in expected["$"] if k != "safetensors"]
    assert schema_of(document) == expected
    assert document["schema_version"] == 1 and document["command"] == "export"
    assert document["onnx"]["written"] is True and document["onnx"]["passed"] is True
    assert document["onnx"]["dynamic_batch"] is True and document["onnx"]["opset"] == 18
    onnx.checker.check_model(onnx.load(str(output)), full_check=True)
    assert document["onnx"]["op_types"] == [n.op_type for n in onnx.load(str(output)).graph.node]
    assert sorted(p.name for p in samples.dir.iterdir()) == sorted(
        ["digits_mlp.pt", "digits_cnn.safetensors", "mlp.onnx"]
    )


# ---- the ONNX file ---------------------------------------------------------------------------
@pytest.mark.parametrize("stem", ["digits_mlp", "digits_cnn"])
def test_onnx_passes_the_checker_and_has_one_op_per_layer(stem, artifacts, golden, module_counts):
    model = onnx.load(str(artifacts.onnx[stem]))
    onnx.checker.check_model(model, full_check=True)
    ops = [node.op_type for node in model.graph.node]

    assert ops == golden(f"onnx_ops_{stem}.json")
    counts = module_counts(epcli.load_checkpoint(artifacts.sources[stem]))
    assert sum(op in ("Gemm", "MatMul") for op in ops) == counts["ep_linear"] + counts["linear"]
    assert ops.count("Conv") == counts["ep_conv"] + counts["conv"]
    assert {"Add", "BatchNormalization", "Mul"}.isdisjoint(ops), (
        "an EP layer's chain, skips or norms leaked into the graph"
    )


@pytest.mark.parametrize("stem", ["digits_mlp", "digits_cnn"])
def test_batch_axis_is_dynamic_by_default(stem, artifacts):
    param, value = _batch_dim(artifacts.onnx[stem])
    checkpoint = epcli.load_checkpoint(artifacts.sources[stem])

    assert param != "" and value == 0, "the batch axis should be symbolic"
    dims = onnx.load(str(artifacts.onnx[stem])).graph.input[0].type.tensor_type.shape.dim[1:]
    assert [d.dim_value for d in dims] == list(checkpoint.input_shape)


def test_static_batch_fixes_the_batch_axis_at_1(artifacts):
    assert _batch_dim(artifacts.onnx_static) == ("", 1)
    session = _session(artifacts.onnx_static)
    x = np.random.default_rng(0).standard_normal((1, 1, 8, 8)).astype(np.float32)
    expected = epcli.collapse_model(epcli.load_checkpoint(artifacts.sources["digits_cnn"]).model)(torch.from_numpy(x))
    np.testing.assert_allclose(
        session.run(None, {session.get_inputs()[0].name: x})[0], expected.detach().numpy(), **ONNX_TOLERANCE
    )


@pytest.mark.parametrize("batch", [1, 3, 7])
@pytest.mark.parametrize("stem", ["digits_mlp", "digits_cnn"])
def test_onnx_runs_in_onnxruntime_at_other_batch_sizes(stem, batch, artifacts):
    """The export traced a batch of 2; the file must serve any batch size, matching the collapsed torch model."""
    checkpoint = epcli.load_checkpoint(artifacts.sources[stem])
    collapsed = epcli.collapse_model(checkpoint.model).eval()
    session = _session(artifacts.onnx[stem])
    x = np.random.default_rng(batch).standard_normal((batch, *checkpoint.input_shape)).astype(np.float32)

    (got,) = session.run(None, {session.get_inputs()[0].name: x})

    with torch.no_grad():
        expected = collapsed(torch.from_numpy(x)).numpy()
    assert got.shape == expected.shape == (batch, 10)
    np.testing.assert_allclose(got, expected, **ONNX_TOLERANCE)


def test_export_json_reports_the_validation(artifacts, json_doc, golden, schema_of):
    document = json_doc(artifacts.export_runs["digits_mlp"].stdout)

    assert schema_of(document) == golden("export_keys.json")
    onnx_part = document["onnx"]
    assert onnx_part["output"] == str(artifacts.onnx["digits_mlp"])
    assert onnx_part["passed"] is True and onnx_part["written"] is True
    assert onnx_part["op_types"] == golden("onnx_ops_digits_mlp.json")
    model = [c for c in onnx_part["comparisons"] if c["scope"] == "model"]
    assert len(model) == 1 and "onnx" in model[0]["candidate"].lower(), "the whole model is checked in onnxruntime"
    assert onnx_part["dtype"] == "float32"


# ---- determinism -----------------------------------------------------------------------------
def test_export_twice_gives_identical_bytes(artifacts, samples, invoke):
    again = samples.dir / "again.onnx"

    run = invoke("export", samples.mlp, "--onnx", again)

    assert run.returncode == 0, run.describe()
    assert again.read_bytes() == artifacts.onnx["digits_mlp"].read_bytes()


# ---- --safetensors ---------------------------------------------------------------------------
def test_export_safetensors_is_the_collapsed_checkpoint(artifacts, sha256):
    exported = epcli.load_checkpoint(artifacts.export_safetensors)

    assert exported.kind == "collapsed"
    assert exported.metadata["provenance"]["source_sha256"] == sha256(artifacts.sources["digits_mlp"])
    # the same content as `epcli collapse` writes
    assert artifacts.export_safetensors.read_bytes() == artifacts.collapsed["digits_mlp"].read_bytes()


def test_export_safetensors_only(samples, invoke, json_doc):
    output = samples.dir / "cnn.safetensors.out.safetensors"

    run = invoke("export", samples.cnn, "--safetensors", output, "--json")

    assert run.returncode == 0, run.describe()
    document = json_doc(run.stdout)
    assert "onnx" not in document and document["safetensors"]["output"] == str(output)
    assert epcli.load_checkpoint(output).kind == "collapsed"


# ---- failures --------------------------------------------------------------------------------
def test_nothing_to_export_is_a_usage_error(samples, invoke):
    run = invoke("export", samples.mlp)

    assert run.returncode == 2, run.describe()
    assert "--onnx" in run.stderr and run.stdout == ""
    assert sorted(p.name for p in samples.dir.iterdir()) == ["digits_cnn.safetensors", "digits_mlp.pt"]


def test_failed_validation_exits_1_and_writes_nothing(samples, invoke, json_doc):
    output = samples.dir / "strict.onnx"

    run = invoke("export", samples.mlp, "--onnx", output, "--atol", "0", "--rtol", "0", "--json")

    assert run.returncode == 1, run.describe()
    document = json_doc(run.stdout)
    assert document["onnx"]["written"] is False and document["onnx"]["passed"] is False
    assert not output.exists()
    assert sorted(p.name for p in samples.dir.iterdir()) == ["digits_cnn.safetensors", "digits_mlp.pt"], (
        "no temp file left"
    )


def test_existing_onnx_is_refused_without_force(samples, invoke, flat):
    output = samples.dir / "mlp.onnx"
    output.write_bytes(b"not yours")
    os.utime(output, ns=(10**18, 10**18))

    run = invoke("export", samples.mlp, "--onnx", output)

    assert run.returncode == 4, run.describe()
    assert str(output) in flat(run.stderr) and "--force" in run.stderr
    assert output.read_bytes() == b"not yours" and output.stat().st_mtime_ns == 10**18

    forced = invoke("export", samples.mlp, "--onnx", output, "--force")

    assert forced.returncode == 0, forced.describe()
    assert "wrote" in forced.stdout and forced.stderr == "", "without --json the report goes to stdout"
    onnx.checker.check_model(onnx.load(str(output)))


def test_existing_safetensors_is_refused_without_force(samples, invoke):
    output = samples.dir / "out.safetensors"
    output.write_bytes(b"not yours")

    run = invoke("export", samples.mlp, "--safetensors", output)

    assert run.returncode == 4, run.describe()
    assert output.read_bytes() == b"not yours"


@pytest.mark.parametrize("option, name", [("--onnx", "model.txt"), ("--safetensors", "model.npz")])
def test_wrong_output_suffix_is_a_usage_error(samples, invoke, flat, option, name):
    output = samples.dir / name

    run = invoke("export", samples.mlp, option, output)

    assert run.returncode == 2, run.describe()
    assert str(output) in flat(run.stderr)
    assert not output.exists()


def test_custom_model_needs_a_factory_to_export(custom_model, invoke, flat, json_doc):
    output = custom_model.dir / "custom.onnx"

    refused = invoke("export", custom_model.path, "--onnx", output)

    assert refused.returncode == 2, refused.describe()
    assert str(custom_model.path) in flat(refused.stderr) and "--model" in refused.stderr
    assert not output.exists()

    run = invoke("export", custom_model.path, "--onnx", output, "--model", custom_model.factory, "--json")

    assert run.returncode == 0, run.describe()
    ops = json_doc(run.stdout)["onnx"]["op_types"]
    assert sum(op in ("Gemm", "MatMul") for op in ops) == 2  # the collapsed EP layer and the head
    onnx.checker.check_model(onnx.load(str(output)), full_check=True)


@pytest.mark.parametrize("failure", [KeyboardInterrupt, RuntimeError])
def test_a_failure_while_writing_safetensors_leaves_no_onnx_either(samples, tmp_path, monkeypatch, failure):
    """Both outputs or neither: the validated ONNX is staged until the collapsed safetensors is written."""
    import epcli.jobs.export as export_job
    from epcli.verification.compare import VerifySettings

    def broken(*args, **kwargs):
        raise failure("stopped while writing the safetensors output")

    monkeypatch.setattr(export_job, "write_collapsed", broken)
    out = tmp_path / "out"
    onnx_path, safetensors_path = out / "m.onnx", out / "m.safetensors"
    with pytest.raises(failure):
        export_job.export_file(samples.mlp, onnx_path=onnx_path, safetensors_path=safetensors_path,
                               settings=VerifySettings())
    assert sorted(p.name for p in out.iterdir()) == []


def test_the_torch_weights_are_freed_before_onnxruntime_loads(samples, tmp_path, monkeypatch):
    """Peak memory: the collapsed model's tensors die as the ONNX model takes its copies, and onnxruntime reads the
    written file, so epcli holds no copy of the weights while it runs."""
    import epcli.jobs.export as export_job
    from epcli.verification.compare import VerifySettings

    tensors: list[weakref.ref[torch.Tensor]] = []
    alive: list[int] = []
    build, session = export_job.build_onnx, export_job.OnnxSession

    def recording_build(model, *args, **kwargs):
        tensors.extend(weakref.ref(tensor) for tensor in [*model.parameters(), *model.buffers()])
        proto = build(model, *args, **kwargs)
        alive.append(sum(ref() is not None for ref in tensors))  # the caller still holds the model
        return proto

    def counting_session(model, *args, **kwargs):
        alive.append(sum(ref() is not None for ref in tensors))
        assert isinstance(model, os.PathLike), "onnxruntime reads the file, not bytes held by epcli"
        return session(model, *args, **kwargs)

    monkeypatch.setattr(export_job, "build_onnx", recording_build)
    monkeypatch.setattr(export_job, "OnnxSession", counting_session)
    result = export_job.export_file(samples.mlp, onnx_path=tmp_path / "m.onnx", safetensors_path=None,
                                    settings=VerifySettings())

    assert result.passed and tensors and alive == [0, 0]


def test_onnx_of_a_bfloat16_checkpoint_holds_its_layers_as_collapse_stores_them(tmp_path):
    """The checks run in float32, but the exported weights are those of the model collapsed in its own dtype
    (rounded to bfloat16 once, then float32), as ``epcli collapse`` writes them; not the float32 collapse."""
    from torch import nn

    from epcli.convert import collapse_model
    from epcli.jobs.export import export_file
    from epcli.verification.compare import VerifySettings

    torch.manual_seed(0)
    model = nn.Sequential(epcli.EPLinear(8, 6, depth=3), nn.ReLU(), nn.Linear(6, 2)).to(torch.bfloat16).eval()
    source = epcli.save_checkpoint(model, tmp_path / "m.safetensors", input_shape=(8,))

    result = export_file(source, onnx_path=tmp_path / "m.onnx", safetensors_path=None, settings=VerifySettings())

    assert result.passed
    (exported,) = [
        numpy_helper.to_array(i) for i in onnx.load(str(tmp_path / "m.onnx")).graph.initializer if tuple(i.dims) == (6, 8)
    ]
    stored = epcli.load_checkpoint(source).model
    assert np.array_equal(exported, collapse_model(stored)[0].weight.detach().float().numpy())
    assert not np.array_equal(exported, collapse_model(stored.float())[0].weight.detach().numpy())


def test_a_collapsed_file_exports_to_onnx_compared_with_itself(artifacts, tmp_path, invoke):
    """A file that is already collapsed exports too: the report says it compared the collapsed model (there is no
    expanded one), the ONNX file computes what the collapsed torch model does, and it verifies against the expanded
    checkpoint the collapsed file was made from (not stale: its metadata names that origin)."""
    import torch

    collapsed = artifacts.collapsed["digits_mlp"]
    out = tmp_path / "from_collapsed.onnx"
    run = invoke("export", collapsed, "--onnx", out)
    assert run.returncode == 0, run.describe()
    assert f"Export {collapsed.name}: collapsed vs {out} in onnxruntime" in run.stdout + run.stderr
    model = epcli.load_checkpoint(collapsed).model
    x = torch.randn(5, 64)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x).numpy(), rtol=1e-5, atol=1e-5)
    # the ONNX stands for the expanded checkpoint the collapsed file was made from
    verify = invoke("verify", artifacts.sources["digits_mlp"], out, "--json")
    assert verify.returncode == 0, verify.describe()
    assert json.loads(verify.stdout)["artifact_stale"] is False
    metadata = {p.key: p.value for p in onnx.load(str(out), load_external_data=False).metadata_props}
    assert json.loads(metadata["exported_from"])["name"] == collapsed.name
    assert metadata["source_name"] == artifacts.sources["digits_mlp"].name

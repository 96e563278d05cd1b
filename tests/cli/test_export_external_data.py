"""``epcli export --onnx`` of models over protobuf's 2 GiB limit, and the provenance an ONNX file carries.

A real > 2 GiB model takes a minute and gigabytes (benchmarks/large_onnx_export.py measures
one); here the hidden ``--external-data-threshold`` lowers the switch so the sample MLP
(about 19 KB of weights) is written the same way: ``NAME.onnx`` plus ``NAME.onnx.data``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import epcli

SAMPLES = Path(__file__).resolve().parents[2] / "sample_checkpoints"
ONNX_TOLERANCE = {"atol": 1e-4, "rtol": 1e-4}  # float32: collapsed torch model vs onnxruntime
LOW = ["--external-data-threshold", "1000"]  # the sample MLP's weights are ~19 KB: over it


def _names(directory):
    return sorted(os.listdir(directory))


def _props(path):
    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


@pytest.fixture(scope="module")
def pair(tmp_path_factory, invoke, json_doc):
    """The sample MLP exported with a lowered threshold (in-process), and its --json document."""
    directory = tmp_path_factory.mktemp("external")
    samples = SimpleNamespace(dir=directory, mlp=directory / "digits_mlp.pt")
    shutil.copyfile(SAMPLES / "digits_mlp.pt", samples.mlp)
    output = samples.dir / "out" / "mlp.onnx"
    run = invoke("export", samples.mlp, "--onnx", output, *LOW, "--json")
    assert run.returncode == 0, run.describe()
    return samples, output, json_doc(run.stdout), run


def test_a_lowered_threshold_writes_the_model_and_its_data_file(pair):
    samples, output, document, run = pair
    data = output.with_name("mlp.onnx.data")

    assert document["onnx"]["external_data"] is True and document["onnx"]["written"] is True
    assert document["onnx"]["files"] == [str(output), str(data)]
    assert str(data) in run.stderr.replace("\n", ""), "the human report names the data file too"
    assert _names(output.parent) == ["mlp.onnx", "mlp.onnx.data"], "no temp file or scratch directory left"
    proto = onnx.load(str(output), load_external_data=False)
    external = [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    weights = epcli.collapse_model(epcli.load_checkpoint(samples.mlp).model).state_dict()
    big = [v for k, v in weights.items() if v.numel() * 4 >= 1024]
    assert len(external) == len(big) >= 2 and not any(t.HasField("raw_data") for t in external)
    assert {dict((e.key, e.value) for e in t.external_data)["location"] for t in external} == {"mlp.onnx.data"}
    assert data.stat().st_size >= sum(v.numel() * 4 for v in big)
    assert output.stat().st_size < 4096, "the weights are not inline"
    onnx.checker.check_model(str(output), full_check=True)


def test_the_pair_runs_in_onnxruntime_and_matches_torch(pair):
    samples, output, _, _ = pair
    model = epcli.collapse_model(epcli.load_checkpoint(samples.mlp).model).eval()
    x = np.random.default_rng(3).standard_normal((5, *epcli.load_checkpoint(samples.mlp).input_shape))
    x = x.astype(np.float32)

    got = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]

    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, expected, **ONNX_TOLERANCE)


def test_verify_accepts_the_pair_and_reads_its_provenance(pair, invoke, json_doc):
    samples, output, _, _ = pair

    run = invoke("verify", samples.mlp, output, "--json")

    assert run.returncode == 0, run.describe()
    document = json_doc(run.stdout)
    assert document["passed"] is True and document["artifact_stale"] is False


def test_the_onnx_records_its_source_and_the_errors_measured(pair, sha256):
    samples, output, document, _ = pair
    props = _props(output)

    assert props["source_name"] == "digits_mlp.pt"
    assert props["source_sha256"] == sha256(samples.mlp)  # hashlib in the test, not epcli's
    assert props["collapsed_by"] == f"epcli {epcli.__version__}"
    reported = {c["name"]: c["max_abs_error"] for c in document["onnx"]["comparisons"]}
    layers = json.loads(props["layer_max_abs_error"])
    assert layers == {name: error for name, error in reported.items() if name != "<model>"} and layers
    assert json.loads(props["model_max_abs_error"]) == reported["<model>"]
    validation = json.loads(props["validation"])
    assert validation["passed"] is True and validation["candidate"] == "onnxruntime"
    assert validation["atol"] == document["onnx"]["atol"]
    assert json.loads(props["error_check"]) == {"dtype": "float32", "samples": 64, "seed": 0}


def test_an_inline_onnx_records_its_source_too(artifacts, sha256):
    props = _props(artifacts.onnx["digits_cnn"])

    assert props["source_sha256"] == sha256(artifacts.sources["digits_cnn"])
    assert json.loads(props["validation"])["passed"] is True


def test_the_same_model_gives_identical_files(pair, invoke):
    samples, output, _, _ = pair
    again = samples.dir / "again" / "mlp.onnx"  # the same name: the model names its data file

    run = invoke("export", samples.mlp, "--onnx", again, *LOW)

    assert run.returncode == 0, run.describe()
    assert again.read_bytes() == output.read_bytes()
    assert again.with_name("mlp.onnx.data").read_bytes() == output.with_name("mlp.onnx.data").read_bytes()


def test_external_data_flag_without_threshold(samples, invoke, json_doc):
    output = samples.dir / "flag.onnx"

    run = invoke("export", samples.cnn, "--onnx", output, "--external-data", "--json")

    assert run.returncode == 0, run.describe()
    assert json_doc(run.stdout)["onnx"]["files"] == [str(output), str(output) + ".data"]
    onnx.checker.check_model(str(output), full_check=True)


def test_verify_names_an_onnx_made_from_another_checkpoint(pair, tmp_path, invoke, json_doc):
    samples, output, _, _ = pair
    checkpoint = epcli.load_checkpoint(samples.mlp)
    with torch.no_grad():
        next(checkpoint.model.parameters()).mul_(1 + 1e-7)  # retrained, a little
    other = tmp_path / "retrained.safetensors"
    epcli.save_checkpoint(checkpoint.model, other, input_shape=checkpoint.input_shape)

    run = invoke("verify", other, output, "--json")

    document = json_doc(run.stdout)
    assert document["artifact_stale"] is True, run.describe()
    assert any("stale" in note and "digits_mlp.pt" in note for note in document["notes"])


def test_failed_validation_leaves_neither_file(samples, invoke, json_doc):
    output = samples.dir / "strict.onnx"

    run = invoke("export", samples.mlp, "--onnx", output, *LOW, "--atol", "0", "--rtol", "0", "--json")

    assert run.returncode == 1, run.describe()
    assert json_doc(run.stdout)["onnx"]["files"] == []
    assert _names(samples.dir) == ["digits_cnn.safetensors", "digits_mlp.pt"], "no file, temp or scratch left"


@pytest.mark.parametrize(("error", "code"), [(RuntimeError("injected"), 3), (KeyboardInterrupt(), 130)])
def test_a_failure_after_the_pair_was_written_leaves_neither(samples, invoke, monkeypatch, error, code):
    import epcli.jobs.export as export_job

    seen: list[list[str]] = []

    def broken(model, *args, **kwargs):
        seen.append(sorted(os.listdir(model.parent)))  # the pair, in the scratch directory by now
        raise error

    monkeypatch.setattr(export_job, "OnnxSession", broken)

    run = invoke("export", samples.mlp, "--onnx", samples.dir / "m.onnx", "--external-data")

    assert run.returncode == code, run.describe()
    assert seen == [["m.onnx", "m.onnx.data"]]
    assert _names(samples.dir) == ["digits_cnn.safetensors", "digits_mlp.pt"]


def test_an_existing_data_file_needs_force(samples, invoke, flat):
    output = samples.dir / "m.onnx"
    data = samples.dir / "m.onnx.data"
    data.write_bytes(b"not yours")

    run = invoke("export", samples.mlp, "--onnx", output, *LOW)

    assert run.returncode == 4, run.describe()
    assert str(data) in flat(run.stderr) and "--force" in run.stderr
    assert data.read_bytes() == b"not yours" and not output.exists()

    forced = invoke("export", samples.mlp, "--onnx", output, *LOW, "--force")

    assert forced.returncode == 0, forced.describe()
    assert data.read_bytes() != b"not yours"
    onnx.checker.check_model(str(output), full_check=True)

"""``epcli compress CKPT [-o OUT] [--max-error E] [--inputs FILE] [--onnx OUT.onnx] [--json]`` on the samples."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import save_file

import epcli
from epcli.convert import expanded_eval

RECORD = json.loads((Path(__file__).resolve().parents[2] / "sample_checkpoints" / "samples.json").read_text())


def _digits(test: bool, count: int = 400) -> tuple[torch.Tensor, torch.Tensor]:
    """The recorded test split, or ``count`` digits outside it; pixels / 16 as the samples were trained."""
    from sklearn.datasets import load_digits

    data = load_digits()
    held = set(RECORD["split"]["test_indices"])
    indices = sorted(held) if test else [i for i in range(len(data.target)) if i not in held][:count]
    return torch.tensor(data.data[indices] / 16.0, dtype=torch.float32), torch.tensor(data.target[indices])


def _inputs(directory: Path, shape: tuple[int, ...], count: int = 400) -> Path:
    path = directory / "calibration.safetensors"
    save_file({"x": _digits(test=False, count=count)[0].reshape(-1, *shape).contiguous()}, str(path))
    return path


def _accuracy(model: torch.nn.Module, shape: tuple[int, ...]) -> float:
    x, y = _digits(test=True)
    with expanded_eval(model), torch.no_grad():
        return float((model(x.reshape(-1, *shape)).argmax(1) == y).float().mean())


def test_subprocess_compress_mlp_with_onnx(samples, run_epcli, invoke, json_doc, golden, schema_of):
    inputs = _inputs(samples.dir, (64,))
    out, onnx_out = samples.dir / "mlp.small.safetensors", samples.dir / "mlp.small.onnx"

    run = run_epcli("compress", samples.mlp, "-o", out, "--inputs", inputs, "--max-error", "0.1", "--onnx", onnx_out,
                    "--json")

    assert run.returncode == 0, run.describe()
    document = json_doc(run.stdout)
    assert document["command"] == "compress" and document["passed"] is True and document["method"] == "whitened"
    assert schema_of(document) == golden("compress_keys.json")
    assert document["model_max_rel_error"] <= 0.1 and document["onnx_max_rel_error"] <= 0.1
    assert document["params_after"] < document["params_before"] and document["macs_after"] < document["macs_before"]
    assert document["files"] == [str(out), str(onnx_out)]
    layers = {layer["path"]: layer for layer in document["layers"]}
    assert set(layers) == {"0", "3"} and layers["0"]["full_rank"] == 64 and layers["0"]["rank"] < 32
    assert layers["0"]["effective_rank"] == pytest.approx(37.3, abs=0.1)  # what epcli inspect reports

    original, compressed = epcli.load_checkpoint(samples.mlp), epcli.load_checkpoint(out)  # rebuilt from metadata
    assert isinstance(compressed.model[0], epcli.LowRankLinear) and compressed.model[0].rank == layers["0"]["rank"]
    recorded = compressed.metadata["provenance"]["compression"]
    assert recorded["layers"]["0"]["rank"] == layers["0"]["rank"]
    assert recorded["model_max_rel_error"] == document["model_max_rel_error"]
    x = _digits(test=False)[0]
    with expanded_eval(original.model), torch.no_grad():
        want, got = original.model(x), compressed.model(x)
    assert float((got - want).abs().max() / want.abs().max()) <= 0.1
    session = ort.InferenceSession(str(onnx_out), providers=["CPUExecutionProvider"])
    (from_onnx,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    np.testing.assert_allclose(from_onnx, got.numpy(), atol=1e-4, rtol=1e-4)
    assert _accuracy(compressed.model, (64,)) >= _accuracy(original.model, (64,)) - 0.02

    # the ONNX carries the checkpoint's record, so verify judges it by its budget, on the samples it was made on
    props = {entry.key: entry.value for entry in onnx.load(str(onnx_out)).metadata_props}
    assert json.loads(props["compression"]) == recorded and props["source_sha256"] == recorded_source(compressed)
    run = invoke("verify", samples.mlp, onnx_out, "--inputs", inputs, "--json")  # the process: compress's, above
    assert run.returncode == 0, run.describe()
    report = json_doc(run.stdout)
    assert report["max_error"] == 0.1 and report["artifact_stale"] is False
    assert [c["name"] for c in report["comparisons"]] == ["<model>"]
    assert report["comparisons"][0]["max_rel_error"] == pytest.approx(document["onnx_max_rel_error"], rel=1e-3)
    elsewhere = json_doc(invoke("verify", samples.mlp, out, "--json").stdout)  # on random inputs: said, with the fix
    assert any(f"pass --inputs '{inputs.name}'" in warning for warning in elsewhere["warnings"])
    assert recorded["samples_file"] == inputs.name  # the ONNX holds the same record


def recorded_source(checkpoint: epcli.Checkpoint) -> str:
    source: str = checkpoint.metadata["provenance"]["source_sha256"]
    return source


def test_cnn_within_budget_keeps_its_accuracy(samples, invoke, json_doc):
    inputs = _inputs(samples.dir, (1, 8, 8), count=128)  # float64 convolutions are slow: a small calibration
    run = invoke("compress", samples.cnn, "--inputs", inputs, "--max-error", "0.1", "--json")
    assert run.returncode == 0, run.describe()
    document = json_doc(run.stdout)
    out = samples.dir / "digits_cnn.compressed.safetensors"
    assert document["output"] == str(out) and out.is_file()
    assert any(layer["rank"] is not None and layer["type"] == "Conv2d" for layer in document["layers"])
    compressed = epcli.load_checkpoint(out)
    assert any(isinstance(m, epcli.LowRankConv2d) for m in compressed.model.modules())
    original = epcli.load_checkpoint(samples.cnn)
    assert _accuracy(compressed.model, (1, 8, 8)) >= _accuracy(original.model, (1, 8, 8)) - 0.02
    inspect = invoke("inspect", out)
    assert inspect.returncode == 0, inspect.describe()
    assert "Compressed (whitened, --max-error 0.1)" in inspect.stdout and "EP layers" not in inspect.stdout
    verify = invoke("verify", samples.cnn, out, "--inputs", inputs, "--json")
    assert verify.returncode == 0, verify.describe()
    (model,) = json_doc(verify.stdout)["comparisons"]
    assert model["scope"] == "model" and model["max_rel_error"] == pytest.approx(document["model_max_rel_error"], rel=1e-3)
    assert "only the whole model is compared" in verify.stderr


def test_zero_budget_is_refused_and_writes_nothing(samples, invoke, json_doc):
    before = sorted(samples.dir.iterdir())
    run = invoke("compress", samples.mlp, "--max-error", "0", "--onnx", samples.dir / "m.onnx", "--json")
    assert run.returncode == 1, run.describe()
    document = json_doc(run.stdout)
    assert document["passed"] is False and document["files"] == [] and document["output"] is None
    assert "no layer can be factored" in document["reason"] and "--max-error" in run.stderr
    assert all(layer["rank"] is None for layer in document["layers"])
    assert sorted(samples.dir.iterdir()) == before


def test_without_samples_plain_svd_on_random_inputs(samples, invoke, json_doc):
    before = set(samples.dir.iterdir())
    run = invoke("compress", samples.mlp, "--max-error", "0.5", "--json")
    document = json_doc(run.stdout)
    assert document["method"] == "svd" and "64 seeded random samples of the input specs" in document["measured_on"]
    assert document["model_max_rel_error"] <= 0.5 and (run.returncode == 0) == document["passed"]
    # the weights parked while searching leave nothing behind (the scratch file has no name)
    assert set(samples.dir.iterdir()) - before == {Path(file) for file in document["files"]}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--max-error", "-1"], "expected a finite number >= 0"),
        (["--max-error", "nan"], "expected a finite number >= 0"),
        (["-o", "out.npz"], ".safetensors"),
    ],
)
def test_bad_arguments_exit_2(samples, invoke, argv, message):
    run = invoke("compress", samples.mlp, *argv)
    assert run.returncode == 2 and message in run.stderr, run.describe()


def test_an_existing_output_needs_force(samples, invoke):
    out = samples.dir / "digits_mlp.compressed.safetensors"
    out.write_bytes(b"precious")
    run = invoke("compress", samples.mlp, "--max-error", "0.5")
    assert run.returncode == 4 and "--force" in run.stderr, run.describe()
    assert out.read_bytes() == b"precious"


def _rewritten(path, out, change):
    """A copy of the compressed file at ``out`` whose metadata ``change`` edited (a damaged or forged record)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    document = json.loads(metadata["epcli"])
    change(document["provenance"]["compression"])
    save_file(load_file(str(path)), str(out), metadata={**metadata, "epcli": json.dumps(document)})
    return out


@pytest.fixture
def compressed_custom(custom_model, invoke, json_doc):
    """The custom-forward model (no architecture embedded: only its factory rebuilds it) compressed."""
    out = custom_model.dir / "custom.small.safetensors"
    run = invoke("compress", custom_model.path, "--model", custom_model.factory, "--max-error", "0.5", "-o", out,
                 "--json")
    assert run.returncode == 0, run.describe()
    document = json_doc(run.stdout)
    assert document["files"] == [str(out)] and document["params_after"] < document["params_before"]
    return custom_model, out, document


def test_a_compressed_file_of_a_factory_model_is_verified_inspected_and_exported(compressed_custom, invoke, json_doc):
    custom, out, document = compressed_custom
    factory = ("--model", custom.factory)
    ranks = {layer["path"]: layer["rank"] for layer in document["layers"] if layer["rank"] is not None}
    rebuilt = epcli.load_checkpoint(out, model_factory=custom.factory).model
    assert {path: module.rank for path, module in rebuilt.named_modules() if isinstance(module, epcli.LowRankLinear)} == ranks

    verify = invoke("verify", custom.path, out, *factory, "--json")
    assert verify.returncode == 0, verify.describe()
    report = json_doc(verify.stdout)
    assert report["pass_rule"] == "max |compressed - expanded| / max |expanded| <= max_error, for every output"
    assert (report["max_error"], report["atol"], report["rtol"]) == (0.5, None, None)
    (model,) = report["comparisons"]
    assert model["max_rel_error"] == pytest.approx(document["model_max_rel_error"], rel=1e-3)
    assert "max |err| / max |expanded| <= 0.5, float32" in verify.stderr

    assert invoke("inspect", out, *factory).returncode == 0
    without = invoke("verify", custom.path, out)
    assert without.returncode == 2 and "name the factory that builds the model with --model module:function" in without.stderr
    export = invoke("export", out, *factory, "--onnx", custom.dir / "small.onnx")
    assert export.returncode == 0 and (custom.dir / "small.onnx").is_file(), export.describe()
    # its ONNX stands for the expanded checkpoint it was compressed from: not stale, judged by the budget
    onnx_verify = invoke("verify", custom.path, custom.dir / "small.onnx", *factory, "--json")
    assert onnx_verify.returncode == 0, onnx_verify.describe()
    checked = json_doc(onnx_verify.stdout)
    assert checked["artifact_stale"] is False and checked["max_error"] == 0.5


def test_a_compressed_file_over_its_budget_fails_by_the_budget(compressed_custom, invoke, json_doc, tmp_path):
    custom, out, document = compressed_custom
    tight = _rewritten(out, tmp_path / "tight.safetensors", lambda record: record.update(max_error=1e-9))
    junit = tmp_path / "verify.xml"
    run = invoke("verify", custom.path, tight, "--model", custom.factory, "--json", "--atol", "1", "--junit-xml", junit)
    assert run.returncode == 1, run.describe()
    report = json_doc(run.stdout)
    assert report["passed"] is False and report["max_error"] == 1e-9
    assert "1 of 1 comparison failed (max |err| / max |expanded| <= 1e-09, float32" in run.stderr
    assert "over the budget (max |err| / max |expanded| &lt;= 1e-09)" in junit.read_text()
    assert any("--atol / --rtol do not apply" in note for note in report["notes"])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda record: record.pop("layers"), "provenance.compression.layers must be an object"),
        (lambda record: record["layers"].update(body={"rank": "two"}), "provenance.compression.layers['body'] must"),
        (lambda record: record["layers"].update(nowhere={"rank": 1}), "has no module 'nowhere'"),
        (lambda record: record["layers"].update(body={"rank": 99}), "at 'body' of full rank 6"),
        (lambda record: record.update(max_error="1%"), "provenance.compression.max_error must be a number"),
    ],
)
def test_a_damaged_compression_record_is_named(compressed_custom, invoke, json_doc, tmp_path, change, message):
    custom, out, _ = compressed_custom
    damaged = _rewritten(out, tmp_path / "damaged.safetensors", change)
    run = invoke("verify", custom.path, damaged, "--model", custom.factory, "--json")
    assert run.returncode == 3, run.describe()
    error = json_doc(run.stdout)["error"]
    assert message in error["message"] and str(damaged) in error["message"], error
    assert "compress" in error["message"]  # the fix: compress again, or build the model it was compressed from


def test_ranks_that_do_not_match_the_tensors_name_the_key(compressed_custom, invoke, json_doc, tmp_path):
    custom, out, document = compressed_custom
    (path, rank), *_ = ((layer["path"], layer["rank"]) for layer in document["layers"] if layer["rank"] is not None)
    forged = _rewritten(out, tmp_path / "forged.safetensors", lambda record: record["layers"][path].update(rank=rank - 1 or 2))
    run = invoke("verify", custom.path, forged, "--model", custom.factory, "--json")
    assert run.returncode == 3, run.describe()
    message = json_doc(run.stdout)["error"]["message"]
    assert str(forged) in message and f"{path}.down.weight" in message and custom.factory in message


def test_a_budget_of_1_or_more_is_warned_about(samples, invoke, json_doc, flat):
    """1.5 meant as 1.5%: allowed (the outputs may move by 1.5 times their magnitude), but said in the log and JSON."""
    run = invoke("compress", samples.mlp, "-o", samples.dir / "loose.safetensors", "--max-error", "1.5", "--json")
    assert run.returncode == 0, run.describe()
    text = "--max-error 1.5 lets the outputs move by 1.5 times their largest magnitude; the budget is a fraction"
    assert text in flat(run.stderr)
    assert any(text in warning for warning in json_doc(run.stdout)["warnings"])

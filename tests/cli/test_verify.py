"""``epcli verify CKPT [ARTIFACT] [--atol] [--rtol] [--samples N] [--batch-size B] [--seed S] [--dtype] [--json]``."""

from __future__ import annotations

import re
import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import epcli
from epcli.verification.compare import DEFAULT_TOLERANCES

REQUIRED_TOP_KEYS = {"schema_version", "command", "passed", "comparisons"}
REQUIRED_COMPARISON_KEYS = {
    "name",
    "scope",
    "max_abs_error",
    "mean_abs_error",
    "max_rel_error",
    "mean_rel_error",
    "min_passing_atol",
    "passed",
}


def _check_document(document, golden, schema_of, *, checkpoint, passed):
    """Schema (golden key sets) and the invariants every verify report satisfies."""
    keys = schema_of(document)
    assert keys.pop("$.error", None) == (None if passed else ["file", "message", "type"])  # why it failed
    assert keys == golden("verify_keys.json")
    assert REQUIRED_TOP_KEYS <= set(golden("verify_keys.json")["$"])
    assert REQUIRED_COMPARISON_KEYS <= set(golden("verify_keys.json")["$.comparisons[]"])
    assert document["schema_version"] == 1 and document["command"] == "verify"
    assert document["passed"] is passed
    assert document["passed"] == all(c["passed"] for c in document["comparisons"])
    expected = epcli.load_checkpoint(checkpoint)
    names = [c["name"] for c in document["comparisons"]]
    assert names == [*expected.ep_layers, *(["<model>"] if expected.model is not None else [])]
    for comparison in document["comparisons"]:
        assert comparison["scope"] == ("model" if comparison["name"] == "<model>" else "layer")
        assert 0 <= comparison["mean_abs_error"] <= comparison["max_abs_error"]
        assert 0 <= comparison["mean_rel_error"] and 0 <= comparison["max_rel_error"]
        assert 0 <= comparison["min_passing_atol"] <= comparison["max_abs_error"]
        assert comparison["passed"] == (comparison["min_passing_atol"] <= document["atol"])
    return {c["name"]: c for c in document["comparisons"]}


def _tamper_safetensors(source, target, key):
    """Add 1e-2 to one weight of one EP layer, keeping the metadata (what a bad copy or a bad merge does)."""
    with safe_open(str(source), "pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(source))
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] += 1e-2
    save_file(tensors, str(target), metadata=metadata)


# ---- the installed console script ------------------------------------------------------------
def test_subprocess_tampered_artifact_exits_1_and_names_the_layer(
    artifacts, tmp_path, run_epcli, json_doc, golden, schema_of
):
    tampered = tmp_path / "digits_mlp.tampered.safetensors"
    _tamper_safetensors(artifacts.collapsed["digits_mlp"], tampered, "3.weight")

    run = run_epcli("verify", artifacts.sources["digits_mlp"], tampered, "--json")

    assert run.returncode == 1, run.describe()
    assert "Traceback" not in run.stderr and "\x1b" not in run.stderr
    document = json_doc(run.stdout)  # exactly one JSON document even though the check failed
    by_name = _check_document(document, golden, schema_of, checkpoint=artifacts.sources["digits_mlp"], passed=False)
    assert {name for name, c in by_name.items() if not c["passed"]} == {"3", "<model>"}
    assert by_name["0"]["passed"]
    assert by_name["3"]["max_abs_error"] > 1e-3
    assert document["artifact"] == str(tampered)


# ---- in memory -------------------------------------------------------------------------------
@pytest.mark.parametrize("stem", ["digits_mlp", "digits_cnn"])
def test_in_memory_json_report(stem, artifacts, invoke, json_doc, golden, schema_of):
    source = artifacts.sources[stem]

    run = invoke("verify", source, "--json")

    assert run.returncode == 0, run.describe()
    document = json_doc(run.stdout)
    _check_document(document, golden, schema_of, checkpoint=source, passed=True)
    default = DEFAULT_TOLERANCES["float32"]
    assert (document["dtype"], document["atol"], document["rtol"]) == ("float32", default.atol, default.rtol)
    assert (document["samples"], document["batch_size"], document["seed"]) == (64, 32, 0)
    assert document["artifact"] is None and document["checkpoint"] == str(source)
    assert "passed" in run.stderr  # the table and the verdict go to stderr


def test_zero_tolerance_in_float32_fails(artifacts, invoke, json_doc, golden, schema_of):
    source = artifacts.sources["digits_mlp"]

    run = invoke("verify", source, "--atol", "0", "--rtol", "0", "--dtype", "float32", "--json")

    assert run.returncode == 1, run.describe()
    document = json_doc(run.stdout)
    by_name = _check_document(document, golden, schema_of, checkpoint=source, passed=False)
    assert all(c["min_passing_atol"] > 0 for c in by_name.values()), "float32 rounding is never exactly zero"


@pytest.mark.parametrize("stem", ["digits_mlp", "digits_cnn"])
def test_float64_passes_with_its_default_tolerances(stem, artifacts, invoke, json_doc, golden, schema_of):
    source = artifacts.sources[stem]

    run = invoke("verify", source, "--dtype", "float64", "--json")

    assert run.returncode == 0, run.describe()
    document = json_doc(run.stdout)
    by_name = _check_document(document, golden, schema_of, checkpoint=source, passed=True)
    default = DEFAULT_TOLERANCES["float64"]
    assert (document["dtype"], document["atol"], document["rtol"]) == ("float64", default.atol, default.rtol)
    assert max(c["max_abs_error"] for c in by_name.values()) < 1e-10


def test_options_are_reported_and_seed_changes_the_inputs(artifacts, invoke, json_doc):
    source = artifacts.sources["digits_mlp"]

    first = json_doc(invoke("verify", source, "--samples", "10", "--batch-size", "3", "--seed", "5", "--json").stdout)
    other = json_doc(invoke("verify", source, "--samples", "10", "--batch-size", "3", "--seed", "6", "--json").stdout)

    assert (first["samples"], first["batch_size"], first["seed"]) == (10, 3, 5)
    assert first["comparisons"][0]["max_abs_error"] != other["comparisons"][0]["max_abs_error"]


def test_same_input_same_report(artifacts, invoke):
    runs = [invoke("verify", artifacts.sources["digits_cnn"], "--samples", "16", "--json") for _ in range(2)]

    assert runs[0].returncode == runs[1].returncode == 0
    assert runs[0].stdout == runs[1].stdout


def test_help_states_the_pass_rule_and_dtype_defaults(invoke):
    run = invoke("verify", "--help")

    assert run.returncode == 0, run.describe()
    text = " ".join(run.stdout.split())
    assert "|collapsed - expanded| <= atol + rtol * |expanded|" in text
    stated = {
        m[0]: (float(m[1]), float(m[2]))
        for m in re.findall(r"(float32|float64) atol=(\S+?) rtol=(\S+?)[;.]?(?:\s|$)", text)
    }
    assert stated == {name: (t.atol, t.rtol) for name, t in DEFAULT_TOLERANCES.items()}, text
    assert "1 a comparison failed" in text or "1 verification failed" in text


# ---- against artifacts -----------------------------------------------------------------------
@pytest.mark.parametrize("stem", ["digits_mlp", "digits_cnn"])
def test_collapsed_safetensors_artifact_passes(stem, artifacts, invoke, json_doc, golden, schema_of):
    source, artifact = artifacts.sources[stem], artifacts.collapsed[stem]

    run = invoke("verify", source, artifact, "--json")

    assert run.returncode == 0, run.describe()
    document = json_doc(run.stdout)
    by_name = _check_document(document, golden, schema_of, checkpoint=source, passed=True)
    assert document["artifact"] == str(artifact)
    assert {c["candidate"] for c in by_name.values()} == {artifact.name}


def test_collapsed_pt_artifact_passes(samples, invoke, json_doc):
    artifact = samples.dir / "cnn.collapsed.pt"
    assert invoke("collapse", samples.cnn, "-o", artifact).returncode == 0

    run = invoke("verify", samples.cnn, artifact, "--json")

    assert run.returncode == 0, run.describe()
    assert json_doc(run.stdout)["passed"] is True


def test_tampered_conv_artifact_exits_1(artifacts, tmp_path, invoke, json_doc):
    tampered = tmp_path / "cnn.tampered.safetensors"
    _tamper_safetensors(artifacts.collapsed["digits_cnn"], tampered, "0.weight")

    run = invoke("verify", artifacts.sources["digits_cnn"], tampered, "--json")

    assert run.returncode == 1, run.describe()
    document = json_doc(run.stdout)
    failing = {c["name"] for c in document["comparisons"] if not c["passed"]}
    assert failing == {"0", "<model>"}
    assert "0" in run.stderr and "failed" in run.stderr


@pytest.mark.parametrize("stem", ["digits_mlp", "digits_cnn"])
def test_onnx_artifact_passes(stem, artifacts, invoke, json_doc, golden, schema_of):
    source = artifacts.sources[stem]

    run = invoke("verify", source, artifacts.onnx[stem], "--json")

    assert run.returncode == 0, run.describe()
    by_name = _check_document(json_doc(run.stdout), golden, schema_of, checkpoint=source, passed=True)
    assert "onnx" in by_name["<model>"]["candidate"].lower()


def test_the_table_says_the_layer_rows_of_an_onnx_check_ran_in_memory(artifacts, invoke, json_doc):
    """An ONNX graph runs only as a whole: the table (titled "expanded vs X.onnx in onnxruntime") says under it that
    the EP layer rows are each layer against its collapse in memory, and the JSON says it row by row; a collapsed
    file's table, all of whose rows ran the file, has no such line."""
    source, onnx_path = artifacts.sources["digits_mlp"], artifacts.onnx["digits_mlp"]
    caption = (f"EP layer rows: each layer alone against its collapse computed in memory (an ONNX file runs only as a "
               f"whole); the <model> row runs {onnx_path} in onnxruntime")

    human = invoke("verify", source, onnx_path, "--samples", "8")
    document = json_doc(invoke("verify", source, onnx_path, "--samples", "8", "--json").stdout)
    collapsed = invoke("verify", source, artifacts.collapsed["digits_mlp"], "--samples", "8")

    assert human.returncode == 0 and collapsed.returncode == 0, (human.describe(), collapsed.describe())
    lines = human.stdout.splitlines()
    bottom = next(index for index, line in enumerate(lines) if line.startswith("└"))  # the table's last line
    assert lines[0].endswith(f"expanded vs {onnx_path} in onnxruntime") and lines[bottom + 1] == caption
    assert [(c["name"], c["scope"], c["candidate"]) for c in document["comparisons"]] == [
        ("0", "layer", "collapsed in memory"), ("3", "layer", "collapsed in memory"), ("<model>", "model", "onnxruntime")
    ]
    assert "EP layer rows" not in collapsed.stdout


def test_static_batch_onnx_from_export_verifies(artifacts, invoke, json_doc):
    """``epcli export --static-batch`` writes an ONNX with batch fixed at 1; ``epcli verify`` must still check it.

    (Regression: verify once fed batches of --batch-size (32) to it; onnxruntime refused and the
    guard reported "unexpected InvalidArgument" with exit 2.)
    """
    run = invoke("verify", artifacts.sources["digits_cnn"], artifacts.onnx_static, "--json")

    assert "unexpected" not in run.stderr, run.describe()
    assert run.returncode == 0, run.describe()
    assert json_doc(run.stdout)["passed"] is True


def test_tampered_onnx_exits_1(artifacts, tmp_path, invoke, json_doc):
    model = onnx.load(str(artifacts.onnx["digits_mlp"]))
    first_gemm = next(node for node in model.graph.node if node.op_type in ("Gemm", "MatMul"))
    initializer = next(t for t in model.graph.initializer if t.name in first_gemm.input)
    values = numpy_helper.to_array(initializer).copy()
    values.reshape(-1)[0] += np.float32(1e-2)
    initializer.CopyFrom(numpy_helper.from_array(values, initializer.name))
    tampered = tmp_path / "tampered.onnx"
    onnx.save(model, str(tampered))

    run = invoke("verify", artifacts.sources["digits_mlp"], tampered, "--json")

    assert run.returncode == 1, run.describe()
    document = json_doc(run.stdout)
    assert {c["name"] for c in document["comparisons"] if not c["passed"]} == {"<model>"}


# ---- bad artifacts ---------------------------------------------------------------------------
def test_collapsed_checkpoint_as_first_argument_is_an_input_error(artifacts, invoke, flat):
    run = invoke("verify", artifacts.collapsed["digits_mlp"])

    assert run.returncode == 2, run.describe()
    assert str(artifacts.collapsed["digits_mlp"]) in flat(run.stderr)


def test_expanded_checkpoint_as_artifact_is_an_input_error(artifacts, tmp_path, invoke, flat):
    other = tmp_path / "copy.pt"
    shutil.copyfile(artifacts.sources["digits_mlp"], other)

    run = invoke("verify", artifacts.sources["digits_mlp"], other)

    assert run.returncode == 2, run.describe()
    assert str(other) in flat(run.stderr)


def test_onnx_in_float64_is_an_input_error(artifacts, invoke, flat):
    run = invoke("verify", artifacts.sources["digits_mlp"], artifacts.onnx["digits_mlp"], "--dtype", "float64")

    assert run.returncode == 2, run.describe()
    assert str(artifacts.onnx["digits_mlp"]) in flat(run.stderr)


@pytest.mark.parametrize("suffix", [".onnx", ".safetensors"])
def test_truncated_artifact_is_an_input_error(suffix, artifacts, tmp_path, invoke, flat):
    source = artifacts.onnx["digits_mlp"] if suffix == ".onnx" else artifacts.collapsed["digits_mlp"]
    truncated = tmp_path / f"truncated{suffix}"
    truncated.write_bytes(source.read_bytes()[: source.stat().st_size // 2])

    run = invoke("verify", artifacts.sources["digits_mlp"], truncated, "--json")

    assert run.returncode == 3, run.describe()
    assert str(truncated) in flat(run.stderr)
    assert isinstance(run.exception, SystemExit)


# ---- models without an embedded architecture -------------------------------------------------
def test_custom_model_without_factory_checks_layers_only(custom_model, invoke, json_doc, golden, schema_of):
    assert epcli.load_checkpoint(custom_model.path).model is None

    run = invoke("verify", custom_model.path, "--json")

    assert run.returncode == 0, run.describe()
    document = json_doc(run.stdout)
    assert schema_of(document) == golden("verify_keys.json")
    assert [(c["name"], c["scope"]) for c in document["comparisons"]] == [("body", "layer")]
    assert "<model>" not in run.stderr


def test_custom_model_with_factory_also_checks_the_model(custom_model, invoke, json_doc):
    run = invoke("verify", custom_model.path, "--model", custom_model.factory, "--dtype", "float64", "--json")

    assert run.returncode == 0, run.describe()
    document = json_doc(run.stdout)
    assert [(c["name"], c["scope"]) for c in document["comparisons"]] == [("body", "layer"), ("<model>", "model")]
    assert all(c["max_abs_error"] < 1e-10 for c in document["comparisons"])


def test_custom_model_collapsed_artifact_with_factory(custom_model, invoke, json_doc):
    artifact = custom_model.dir / "custom.collapsed.safetensors"
    assert invoke("collapse", custom_model.path).returncode == 0

    run = invoke("verify", custom_model.path, artifact, "--model", custom_model.factory, "--json")

    assert run.returncode == 0, run.describe()
    assert [c["name"] for c in json_doc(run.stdout)["comparisons"]] == ["body", "<model>"]


# ---- the whole-model check collapses a model it owns, in place ---------------------------------------------------
def test_a_root_ep_layer_is_checked_as_the_whole_model(tmp_path, invoke, json_doc):
    """The model is the EP layer itself: the in-place collapse replaces the whole model (path '')."""
    import torch

    torch.manual_seed(0)
    source = tmp_path / "root.safetensors"
    epcli.save_checkpoint(epcli.EPLinear(6, 4, depth=3), source, input_shape=(6,))
    assert invoke("collapse", source).returncode == 0
    artifact = tmp_path / "root.collapsed.safetensors"
    tampered = tmp_path / "root.tampered.safetensors"
    _tamper_safetensors(artifact, tampered, "weight")

    runs = {name: invoke("verify", source, *extra, "--json") for name, extra in
            {"in memory": [], "artifact": [artifact], "tampered": [tampered]}.items()}

    for name, run in runs.items():
        assert run.returncode == (1 if name == "tampered" else 0), run.describe()
        document = json_doc(run.stdout)
        assert [(c["name"], c["passed"]) for c in document["comparisons"]] == [
            ("", name != "tampered"), ("<model>", name != "tampered")
        ]


def test_compare_model_leaves_the_callers_model_as_it_was(artifacts):
    import torch

    from epcli.verification.compare import VerifySettings
    from epcli.verification.model_check import compare_model

    checkpoint = epcli.load_checkpoint(artifacts.sources["digits_mlp"])
    before = {key: value.clone() for key, value in checkpoint.model.state_dict().items()}

    (comparison,) = compare_model(checkpoint, VerifySettings(samples=4, dtype="float64"))

    assert comparison.passed and comparison.max_abs_error < 1e-10
    after = checkpoint.model.state_dict()
    assert set(after) == set(before)  # still expanded: no EP layer was swapped for its plain layer
    assert all(after[key].dtype == value.dtype and torch.equal(after[key], value) for key, value in before.items())


# ---- the whole-model number, against an independent reference ----------------------------------------------------
TWO_PATHS_MODULE = '''
"""One EP layer reached at two paths (a.0 and b.0), under two parents."""
import torch
from torch import nn

from epcli import EPLinear


class TwoPaths(nn.Module):
    def __init__(self):
        super().__init__()
        shared = EPLinear(5, 5, depth=3, batch_norm=True)
        self.a = nn.Sequential(shared, nn.ReLU())
        self.b = nn.Sequential(shared)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(self.b(self.a(x)))


def build():
    return TwoPaths()
'''


def _reference_model_error(checkpoint, dtype, batches=None, samples=64, batch_size=32):
    """max |collapsed - expanded| over the whole model, computed without epcli.jobs.verify: ``load_checkpoint``'s
    model cast to ``dtype`` and run expanded, against ``collapse_model`` of it, on verify's inputs (seeded draws
    from the checkpoint's specs, or ``batches``)."""
    import torch

    from epcli.checkpoint.inputs import random_inputs
    from epcli.convert import collapse_model, expanded_eval

    model = checkpoint.model.to(getattr(torch, dtype))
    collapsed = collapse_model(model)
    if batches is None:
        batches = random_inputs(checkpoint.inputs, samples, batch_size, 0, dtype=getattr(torch, dtype))
    worst = 0.0
    with torch.no_grad(), expanded_eval(model):
        for batch in batches:
            batch = tuple(t.to(getattr(torch, dtype)) for t in batch)
            worst = max(worst, float((collapsed(*batch).double() - model(*batch).double()).abs().max()))
    return worst


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_the_model_error_is_the_expanded_model_against_its_collapse(dtype, artifacts, invoke, json_doc):
    """The reported number is exactly the independent one, and not 0: comparing the collapse with itself (or the
    expanded model with itself) would report 0."""
    source = artifacts.sources["digits_cnn"]

    run = invoke("verify", source, "--dtype", dtype, "--json")

    assert run.returncode == 0, run.describe()
    (model,) = [c for c in json_doc(run.stdout)["comparisons"] if c["scope"] == "model"]
    expected = _reference_model_error(epcli.load_checkpoint(source), dtype)
    assert model["max_abs_error"] == expected > 0


def test_a_layer_at_two_paths_from_a_factory(tmp_path, monkeypatch, invoke, json_doc):
    """Checked at each path, collapsed once (the plain layer is shared as the EP layer was); in memory, against a
    collapsed file and exported, the whole model matches the independent reference."""
    import torch

    name = f"epcli_two_paths_{abs(hash(str(tmp_path))) % 10**8}"
    (tmp_path / f"{name}.py").write_text(TWO_PATHS_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    factory = f"{name}:build"
    torch.manual_seed(3)
    model = __import__(name).build()
    with torch.no_grad():
        model(torch.randn(32, 5))  # batch-norm statistics, in training mode
    source = epcli.save_checkpoint(model.eval(), tmp_path / "two.safetensors", input_shape=(5,))
    artifact = tmp_path / "two.collapsed.safetensors"
    assert invoke("collapse", source, "--model", factory, "-o", artifact).returncode == 0
    reference = _reference_model_error(epcli.load_checkpoint(source, model_factory=factory), "float32")

    runs = {
        "in memory": invoke("verify", source, "--model", factory, "--json"),
        "artifact": invoke("verify", source, artifact, "--model", factory, "--json"),
        "export": invoke("export", source, "--model", factory, "--onnx", tmp_path / "two.onnx", "--json"),
    }

    for label, run in runs.items():
        assert run.returncode == 0, (label, run.describe())
        document = json_doc(run.stdout)
        comparisons = (document["onnx"] if label == "export" else document)["comparisons"]
        assert [c["name"] for c in comparisons] == ["a.0", "b.0", "<model>"], label
        assert comparisons[0]["max_abs_error"] == comparisons[1]["max_abs_error"], label
        if label != "export":  # onnxruntime rounds on its own
            assert comparisons[2]["max_abs_error"] == reference > 0, label
    assert len(onnx.load(str(tmp_path / "two.onnx")).graph.initializer) == 4  # one weight and bias per plain layer


def test_user_samples_are_what_the_model_is_compared_on(custom_model, tmp_path, invoke, json_doc):
    import torch

    from epcli.verification.samples import read_samples, sample_batches

    path = tmp_path / "samples.safetensors"
    save_file({"x": torch.randn(10, 6, generator=torch.Generator().manual_seed(5))}, str(path))
    checkpoint = epcli.load_checkpoint(custom_model.path, model_factory=custom_model.factory)
    batches = sample_batches(read_samples(path, checkpoint.inputs), 4)

    run = invoke("verify", custom_model.path, "--model", custom_model.factory, "--inputs", path, "--batch-size", 4,
                 "--json")

    assert run.returncode == 0, run.describe()
    model = json_doc(run.stdout)["comparisons"][-1]
    assert model["name"] == "<model>" and json_doc(run.stdout)["samples"] == 10
    assert model["max_abs_error"] == _reference_model_error(checkpoint, "float32", batches) > 0


@pytest.mark.parametrize("form", ["bare tensor .pt", ".npy"])
def test_a_samples_file_of_another_form_says_what_inputs_takes(form, samples, tmp_path, invoke, json_doc):
    """``torch.save(x, path)`` or ``numpy.save``: one unnamed array, not a file of named tensors. The error says what
    --inputs takes and how to write one (not the checkpoint loader's "no epcli metadata"), and the file written as
    it says is taken."""
    import torch

    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(2))
    given, fixed = (tmp_path / "x.pt", tmp_path / "x_fixed.pt") if form.endswith(".pt") else (
        tmp_path / "x.npy", tmp_path / "x_fixed.npz")
    if form.endswith(".pt"):
        torch.save(x, given)
        torch.save({"x": x}, fixed)
    else:
        np.save(given, x.numpy())
        np.savez(fixed, x=x.numpy())

    run = invoke("verify", samples.mlp, "--inputs", given, "--json")

    assert run.returncode == 3, run.describe()
    error = json_doc(run.stdout)["error"]
    assert error["type"] == "CheckpointError" and error["file"] == str(given)
    message = error["message"]
    assert message.startswith(f"{given} (--inputs): ") and "epcli metadata" not in message
    assert ("holds one bare tensor (shape [8, 64])" if form.endswith(".pt") else "is one .npy array") in message
    assert "--inputs takes a .npz, .safetensors or .pt file holding one tensor per model input, batch first" in message
    assert "numpy.savez(path, x=array) or torch.save({'x': tensor}, path)" in message
    followed = invoke("verify", samples.mlp, "--inputs", fixed, "--json")
    assert followed.returncode == 0 and json_doc(followed.stdout)["samples"] == 8, followed.describe()


def test_an_artifact_whose_plain_tensors_differ_fails_the_model_check_only(custom_model, invoke, json_doc):
    """The whole model runs the artifact's own tensors, not only its collapsed layers: a changed head (no EP layer)
    passes every layer check and fails the model."""
    artifact = custom_model.dir / "custom.collapsed.safetensors"
    tampered = custom_model.dir / "custom.tampered.safetensors"
    assert invoke("collapse", custom_model.path).returncode == 0
    _tamper_safetensors(artifact, tampered, "head.weight")

    run = invoke("verify", custom_model.path, tampered, "--model", custom_model.factory, "--json")

    assert run.returncode == 1, run.describe()
    assert [(c["name"], c["passed"]) for c in json_doc(run.stdout)["comparisons"]] == [
        ("body", True), ("<model>", False)
    ]


def test_a_layer_repeated_under_one_parent_is_replaced_everywhere():
    """``Sequential(layer, ReLU, layer)``: find_ep_layers lists the layer once (at '0'), but the collapsed model has
    the one plain layer at both places, and no EP layer (nor its expanded parameters) is left behind."""
    import torch
    from torch import nn

    from epcli.checkpoint.inputs import InputSpec
    from epcli.convert import expanded_eval, layer_states
    from epcli.verification.compare import VerifySettings
    from epcli.verification.model_check import collapse_in_place

    torch.manual_seed(0)
    layer = epcli.EPLinear(5, 5, depth=3)
    model = nn.Sequential(layer, nn.ReLU(), layer).eval()
    states = layer_states(model.state_dict(), ["0"])
    x = torch.randn(7, 5)
    with torch.no_grad(), expanded_eval(model):
        expanded = model(x)

    collapsed, _, _ = collapse_in_place(model, [InputSpec((5,))], states.__getitem__, VerifySettings(dtype="float64"))

    assert type(collapsed[0]) is nn.Linear and collapsed[2] is collapsed[0]
    assert not any(isinstance(m, epcli.EPLinear) for m in collapsed.modules())
    torch.testing.assert_close(collapsed(x.double()).float(), expanded, atol=1e-6, rtol=1e-6)


def test_a_model_without_ep_layers_is_refused_not_compared_with_itself(tmp_path, monkeypatch, invoke, json_doc):
    """A factory of the plain class (a common slip) builds a model with nothing to collapse: comparing it with
    itself would pass and say nothing, so verify refuses, naming the file and the factory."""
    import torch
    from safetensors.torch import save_file

    name = f"epcli_plain_{abs(hash(str(tmp_path))) % 10**8}"
    (tmp_path / f"{name}.py").write_text("import torch\n\ndef build():\n    return torch.nn.Sequential(torch.nn.Linear(4, 3))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    source = tmp_path / "plain.safetensors"
    save_file({"0.weight": torch.randn(3, 4), "0.bias": torch.randn(3)}, source)
    run = invoke("verify", source, "--model", f"{name}:build", "--input-shape", "4", "--json")
    assert run.returncode == 3, run.describe()
    error = json_doc(run.stdout)["error"]
    assert error["type"] == "CheckpointError" and error["file"] == str(source)
    assert "holds no EP layers" in error["message"] and f"--model {name}:build" in error["message"]

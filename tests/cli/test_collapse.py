"""``epcli collapse CKPT [-o OUT] [--format safetensors|pt] [--force]``."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import epcli

SAMPLES_DIR = Path(__file__).resolve().parents[2] / "sample_checkpoints"

REQUIRED_LAYER_KEYS = {"path", "type", "expanded_params", "collapsed_params", "effective_kernel", "max_abs_error"}


def _expected_layer_facts(source):
    """Per EP layer, computed independently of the CLI: parameter counts and effective kernel."""
    checkpoint = epcli.load_checkpoint(source)
    collapsed = epcli.collapse_model(checkpoint.model)
    facts = {}
    for path in checkpoint.ep_layers:
        expanded_layer = checkpoint.model.get_submodule(path)
        plain = collapsed.get_submodule(path)
        weight = plain.weight
        facts[path] = {
            "type": type(expanded_layer).__name__,
            "expanded_params": sum(p.numel() for p in expanded_layer.parameters()),
            "collapsed_params": sum(p.numel() for p in plain.parameters()),
            "effective_kernel": list(weight.shape[2:]) if weight.dim() > 2 else None,
        }
    return facts


# ---- the installed console script ------------------------------------------------------------
def test_subprocess_collapse_writes_default_output_and_table(samples, run_epcli, sha256):
    run = run_epcli("collapse", samples.mlp)

    assert run.returncode == 0, run.describe()
    output = samples.dir / "digits_mlp.collapsed.safetensors"
    assert output.is_file(), f"default output <stem>.collapsed.safetensors missing beside the source: {run.describe()}"
    assert run.stderr == "", "the report is stdout's; stderr is for errors, warnings and progress"
    assert "\x1b" not in run.stdout and "Traceback" not in run.stdout
    facts = _expected_layer_facts(samples.mlp)
    for fact in facts.values():
        assert f"{fact['expanded_params']:,}" in run.stdout and f"{fact['collapsed_params']:,}" in run.stdout
        assert fact["type"] in run.stdout
    total_expanded = sum(f["expanded_params"] for f in facts.values())
    total_collapsed = sum(f["collapsed_params"] for f in facts.values())
    assert f"{total_expanded:,}" in run.stdout and f"{total_collapsed:,}" in run.stdout, run.stdout
    assert f"{total_expanded / total_collapsed:.2f}x" in run.stdout, "the compression ratio is shown"
    assert epcli.load_checkpoint(output).kind == "collapsed"
    # only the output is new: no temp files left behind
    assert sorted(p.name for p in samples.dir.iterdir()) == sorted(
        ["digits_mlp.pt", "digits_cnn.safetensors", "digits_mlp.collapsed.safetensors"]
    )
    assert sha256(samples.mlp) == sha256(SAMPLES_DIR / "digits_mlp.pt"), "the source is left untouched"


# ---- the table / JSON report -----------------------------------------------------------------
@pytest.mark.parametrize("stem", ["digits_mlp", "digits_cnn"])
def test_collapse_json_reports_every_layer(stem, artifacts, json_doc, schema_of, golden, sha256):
    run = artifacts.collapse_runs[stem]
    source = artifacts.sources[stem]
    document = json_doc(run.stdout)

    assert schema_of(document) == golden("collapse_keys.json")
    assert REQUIRED_LAYER_KEYS <= set(golden("collapse_keys.json")["$.layers[]"])
    assert document["schema_version"] == 1 and document["command"] == "collapse"
    assert document["source_sha256"] == sha256(source)
    facts = _expected_layer_facts(source)
    assert [layer["path"] for layer in document["layers"]] == list(facts)
    for layer in document["layers"]:
        fact = facts[layer["path"]]
        for key in ("type", "expanded_params", "collapsed_params", "effective_kernel"):
            assert layer[key] == fact[key], (layer["path"], key)
        # float64 measurement of the stored float32 weights: only the cast's rounding is left
        assert 0 <= layer["max_abs_error"] < 1e-5
    assert document["expanded_params"] == sum(f["expanded_params"] for f in facts.values())
    assert document["collapsed_params"] == sum(f["collapsed_params"] for f in facts.values())
    assert document["compression_ratio"] == pytest.approx(document["expanded_params"] / document["collapsed_params"])
    # measured in float64 on the written (float32) tensors: float32 storage rounding, nothing more
    assert document["model_max_abs_error"] is not None and 0 <= document["model_max_abs_error"] < 1e-4
    for layer in facts:
        assert layer in run.stderr
    assert "total" in run.stderr and "smaller" in run.stderr


# ---- the written checkpoint ------------------------------------------------------------------
@pytest.mark.parametrize("stem", ["digits_mlp", "digits_cnn"])
def test_collapsed_file_has_provenance_metadata(stem, artifacts, sha256):
    source, output = artifacts.sources[stem], artifacts.collapsed[stem]
    expanded = epcli.load_checkpoint(source)

    collapsed = epcli.load_checkpoint(output)

    assert collapsed.kind == "collapsed"
    assert collapsed.metadata["epcli_version"] == epcli.__version__
    provenance = collapsed.metadata["provenance"]
    assert provenance["source_sha256"] == sha256(source)
    assert set(provenance["layer_max_abs_error"]) == set(expanded.ep_layers)
    assert all(0 <= e < 1e-5 for e in provenance["layer_max_abs_error"].values())
    # the collapsed architecture is embedded: the model rebuilds with no EP layer left
    assert collapsed.architecture is not None and collapsed.model is not None
    assert not any(isinstance(m, epcli.EPLayer) for m in collapsed.model.modules())
    assert set(collapsed.ep_layers) == set(expanded.ep_layers)
    x = torch.randn(5, *expanded.input_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(collapsed.model(x), expanded.model(x), atol=1e-4, rtol=1e-4)


def test_collapsed_mlp_loads_strictly_into_a_plain_torch_model(artifacts):
    """Deployment needs no epcli: the tensors fit the obvious hand-written model."""
    plain = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, 10))

    plain.load_state_dict(load_file(str(artifacts.collapsed["digits_mlp"])), strict=True)

    expanded = epcli.load_checkpoint(artifacts.sources["digits_mlp"]).model
    x = torch.randn(9, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x), expanded(x), atol=1e-4, rtol=1e-4)


def test_format_pt_uses_default_pt_name(samples, invoke):
    run = invoke("collapse", samples.mlp, "--format", "pt")

    assert run.returncode == 0, run.describe()
    output = samples.dir / "digits_mlp.collapsed.pt"
    assert zipfile.is_zipfile(output), "a .pt output is a torch zip checkpoint"
    assert epcli.load_checkpoint(output).kind == "collapsed"
    assert not (samples.dir / "digits_mlp.collapsed.safetensors").exists()


def test_output_suffix_pt_chooses_the_format(samples, invoke):
    output = samples.dir / "x.pt"

    run = invoke("collapse", samples.cnn, "-o", output)

    assert run.returncode == 0, run.describe()
    assert zipfile.is_zipfile(output)
    checkpoint = epcli.load_checkpoint(output)
    assert checkpoint.kind == "collapsed" and set(checkpoint.ep_layers) == {"0", "2"}


def test_format_and_suffix_disagree_is_a_usage_error(samples, invoke, flat):
    output = samples.dir / "x.pt"

    run = invoke("collapse", samples.mlp, "-o", output, "--format", "safetensors")

    assert run.returncode == 2, run.describe()
    assert str(output) in flat(run.stderr)
    assert not output.exists()


# ---- existing outputs ------------------------------------------------------------------------
@pytest.mark.parametrize("explicit", [True, False], ids=["-o", "default-name"])
def test_existing_output_is_refused_without_force(samples, invoke, flat, explicit):
    output = samples.dir / ("mine.safetensors" if explicit else "digits_mlp.collapsed.safetensors")
    output.write_bytes(b"precious bytes")
    os.utime(output, ns=(1_000_000_000_000_000_000, 1_000_000_000_000_000_000))
    before = output.stat().st_mtime_ns
    args = ["-o", output] if explicit else []

    run = invoke("collapse", samples.mlp, *args)

    assert run.returncode == 4, run.describe()
    assert str(output) in flat(run.stderr) and "--force" in run.stderr
    assert output.read_bytes() == b"precious bytes" and output.stat().st_mtime_ns == before
    assert "Traceback" not in run.stderr and run.stdout == ""

    forced = invoke("collapse", samples.mlp, *args, "--force")

    assert forced.returncode == 0, forced.describe()
    assert epcli.load_checkpoint(output).kind == "collapsed"


def test_output_may_not_replace_the_source(samples, invoke, sha256):
    before = sha256(samples.cnn)

    run = invoke("collapse", samples.cnn, "-o", samples.cnn, "--force")

    assert run.returncode == 4, run.describe()
    assert sha256(samples.cnn) == before


# ---- determinism -----------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_collapse_twice_gives_identical_bytes(samples, invoke, suffix):
    first, second = samples.dir / f"a{suffix}", samples.dir / f"b{suffix}"

    runs = [invoke("collapse", samples.cnn, "-o", first), invoke("collapse", samples.cnn, "-o", second)]

    assert all(r.returncode == 0 for r in runs), [r.describe() for r in runs]
    assert first.read_bytes() == second.read_bytes()


def test_collapsed_bytes_do_not_depend_on_the_directory(artifacts, samples, invoke):
    """Same source bytes and name, another directory and run: the same file."""
    run = invoke("collapse", samples.mlp)

    assert run.returncode == 0, run.describe()
    assert (samples.dir / "digits_mlp.collapsed.safetensors").read_bytes() == artifacts.collapsed[
        "digits_mlp"
    ].read_bytes()

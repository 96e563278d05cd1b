"""``epcli inspect CKPT [--json] [--plot spectra.png]``."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

import epcli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _erank(weight) -> float:
    """exp(entropy of the normalised singular values), from scratch in numpy (float64)."""
    matrix = weight.detach().double().numpy().reshape(weight.shape[0], -1)
    values = np.linalg.svd(matrix, compute_uv=False)
    p = values / values.sum()
    p = p[p > 0]
    return float(math.exp(-(p * np.log(p)).sum()))


def _collapsed_weights(path):
    checkpoint = epcli.load_checkpoint(path)
    if checkpoint.kind == "collapsed":
        return checkpoint, {p: checkpoint.state_dict[f"{p}.weight"] for p in checkpoint.ep_layers}
    collapsed = epcli.collapse_model(checkpoint.model)
    return checkpoint, {p: collapsed.get_submodule(p).weight for p in checkpoint.ep_layers}


# ---- the installed console script ------------------------------------------------------------
def test_subprocess_inspect_json_and_plot(samples, run_epcli, invoke, json_doc, golden, schema_of):
    plot = samples.dir / "spectra.png"

    run = run_epcli("inspect", samples.cnn, "--json", "--plot", plot)

    assert run.returncode == 0, run.describe()
    assert "Traceback" not in run.stderr and "\x1b" not in run.stderr
    document = json_doc(run.stdout)
    assert schema_of(document) == golden("inspect_keys.json")
    assert plot.read_bytes().startswith(PNG_MAGIC)
    # the same plot from another process (in-process CliRunner): byte-identical
    again = samples.dir / "again" / "spectra.png"
    again.parent.mkdir()
    copy = again.parent / samples.cnn.name
    copy.write_bytes(samples.cnn.read_bytes())
    assert invoke("inspect", copy, "--plot", again).returncode == 0
    assert again.read_bytes() == plot.read_bytes()


# ---- the report ------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["digits_mlp", "digits_cnn", "digits_mlp.collapsed", "digits_cnn.collapsed"])
def test_inspect_json_layers_and_effective_rank(which, artifacts, invoke, json_doc, golden, schema_of):
    stem = which.split(".")[0]
    path = artifacts.collapsed[stem] if which.endswith("collapsed") else artifacts.sources[stem]

    run = invoke("inspect", path, "--json")

    assert run.returncode == 0, run.describe()
    document = json_doc(run.stdout)
    assert schema_of(document) == golden("inspect_keys.json")
    assert document["schema_version"] == 1 and document["command"] == "inspect"
    checkpoint, weights = _collapsed_weights(path)
    assert document["kind"] == checkpoint.kind and document["has_architecture"] is True
    assert document["input_shape"] == list(checkpoint.input_shape)
    assert document["tensor_count"] == len(checkpoint.state_dict)
    assert [layer["path"] for layer in document["layers"]] == list(checkpoint.ep_layers)
    for layer in document["layers"]:
        config = checkpoint.ep_layers[layer["path"]]
        assert layer["type"] == config.layer_type
        assert layer["config"] == json.loads(json.dumps(config.to_dict()))
        weight = weights[layer["path"]]
        out_dim, fan_in = weight.shape[0], int(np.prod(weight.shape[1:]))
        assert 0 < layer["effective_rank"] <= min(out_dim, fan_in) + 1e-9
        assert layer["effective_rank"] == pytest.approx(_erank(weight), rel=1e-5)
        assert 0 < layer["rank"] <= min(out_dim, fan_in)
        assert len(layer["singular_values"]) == min(out_dim, fan_in)
        assert layer["singular_values"] == sorted(layer["singular_values"], reverse=True)
        assert layer["effective_kernel"] == (list(weight.shape[2:]) if weight.dim() > 2 else None)
        assert layer["collapsed_params"] == weight.numel() + out_dim  # both samples' layers have a bias
        assert layer["path"] in run.stderr


def test_inspect_custom_model_without_architecture(custom_model, invoke, json_doc):
    run = invoke("inspect", custom_model.path, "--json")

    assert run.returncode == 0, run.describe()
    document = json_doc(run.stdout)
    assert document["has_architecture"] is False
    assert [layer["path"] for layer in document["layers"]] == ["body"]
    assert "--model" in run.stderr, "the table says how to give the architecture"


def test_inspect_without_json_prints_the_report_on_stdout(artifacts, invoke):
    run = invoke("inspect", artifacts.sources["digits_mlp"])

    assert run.returncode == 0, run.describe()
    assert "erank" in run.stdout and run.stderr == ""


# ---- --plot ----------------------------------------------------------------------------------
def test_plot_twice_gives_identical_png(samples, invoke):
    first, second = samples.dir / "a.png", samples.dir / "b.png"

    runs = [invoke("inspect", samples.mlp, "--plot", first), invoke("inspect", samples.mlp, "--plot", second)]

    assert all(r.returncode == 0 for r in runs), [r.describe() for r in runs]
    assert first.read_bytes().startswith(PNG_MAGIC)
    assert first.read_bytes() == second.read_bytes()


def test_plot_needs_a_png_path(samples, invoke, flat):
    plot = samples.dir / "spectra.jpg"

    run = invoke("inspect", samples.mlp, "--plot", plot)

    assert run.returncode == 2, run.describe()
    assert str(plot) in flat(run.stderr)
    assert not plot.exists()


def test_existing_plot_is_not_overwritten_without_force(samples, invoke, flat):
    """CI-grade rule of the issue: an existing output is not overwritten without --force.

    BUG (at the time of writing): ``inspect --plot`` has no --force and silently replaces the file.
    """
    plot = samples.dir / "spectra.png"
    plot.write_bytes(b"someone else's figure")
    os.utime(plot, ns=(10**18, 10**18))

    run = invoke("inspect", samples.mlp, "--plot", plot)

    assert plot.read_bytes() == b"someone else's figure" and plot.stat().st_mtime_ns == 10**18, (
        "inspect --plot overwrote an existing file without --force"
    )
    assert run.returncode == 2, run.describe()
    assert str(plot) in flat(run.stderr)


def test_a_plot_made_meanwhile_is_not_overwritten_without_force(samples, tmp_path, monkeypatch):
    """The up-front existence check can be raced; the write itself refuses to replace a file without --force."""
    import epcli.jobs.inspect as inspect_job
    from epcli.errors import CheckpointError

    plot = tmp_path / "spectra.png"
    plot.write_bytes(b"someone else's")
    monkeypatch.setattr(inspect_job, "check_output", lambda *args, **kwargs: None)  # as if made after the check

    with pytest.raises(CheckpointError, match="already exists"):
        inspect_job.inspect_file(samples.mlp, plot=plot)

    assert plot.read_bytes() == b"someone else's"
    inspect_job.inspect_file(samples.mlp, plot=plot, force=True)
    assert plot.read_bytes().startswith(b"\x89PNG")

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


def test_inspect_with_a_factory_checks_it_against_the_file(custom_model, invoke, json_doc, flat):
    run = invoke("inspect", custom_model.path, "--model", custom_model.factory, "--json")
    wrong = invoke("inspect", custom_model.path, "--model", "torch.nn:Identity")

    assert run.returncode == 0, run.describe()
    assert json_doc(run.stdout)["has_architecture"] is True
    assert wrong.returncode == 3 and str(custom_model.path) in flat(wrong.stderr), wrong.describe()


def test_inspect_shows_each_inputs_dtype_and_range(tmp_path, artifacts, invoke, json_doc):
    """Token ids are not "[16]": the report says int64 and the ids' range, and the JSON holds the specs; a plain
    float input says float32 and no range."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(17, 8), epcli.EPLinear(8, 8, depth=2)).eval()
    path = epcli.save_checkpoint(model, tmp_path / "tokens.safetensors",
                                 inputs=[epcli.InputSpec((16,), torch.int64, 0, 17)])

    tokens = invoke("inspect", path, "--json")
    plain = invoke("inspect", artifacts.sources["digits_mlp"], "--json")

    assert tokens.returncode == 0 and plain.returncode == 0, (tokens.describe(), plain.describe())
    assert "; input int64[16] with values in [0, 17); " in tokens.stderr.replace("\n", "")
    assert json_doc(tokens.stdout)["inputs"] == [{"shape": [16], "dtype": "int64", "low": 0, "high": 17}]
    assert "; input float32[64]; " in plain.stderr.replace("\n", "")
    assert json_doc(plain.stdout)["inputs"] == [{"shape": [64], "dtype": "float32", "low": None, "high": None}]


def test_inspect_says_what_the_skips_are(tmp_path, artifacts, invoke):
    """The chain column in the layer docs' words: "identity" / "learnable" skips, how many, and how many layers each
    spans (the config's residual_mode "none" read as "no skips"); a layer whose interval exceeds its depth has none."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(
        epcli.EPLinear(8, 8, depth=6, residual=True, residual_intervals=[2, 3]),  # 0-2 2-4 4-6 and 0-3 3-6
        epcli.EPLinear(8, 8, depth=2, residual=True, residual_intervals=1, batch_norm=True),  # 0-1 1-2
        epcli.EPLinear(8, 8, depth=2, residual=True, residual_intervals=4),  # no node 4: no skip
    ).eval()
    path = epcli.save_checkpoint(model, tmp_path / "skips.safetensors", input_shape=(8,))

    built, sample = invoke("inspect", path), invoke("inspect", artifacts.sources["digits_mlp"])

    assert built.returncode == 0 and sample.returncode == 0, (built.describe(), sample.describe())
    assert _chains(built.stdout) == {
        "0": "depth 6, width 1, 5 identity skips over 2 or 3 layers",
        "1": "depth 2, width 1, batch-norm, 2 identity skips over 1 layer",
        "2": "depth 2, width 1",
    }
    assert _chains(sample.stdout) == {
        "0": "depth 4, width 1, batch-norm, 2 identity skips over 2 layers",
        "3": "depth 2, width 2, 1 learnable skip over 2 layers",
    }


def _chains(table: str) -> dict[str, str]:
    """The chain column of inspect's table, by layer."""
    rows = [line.split("│") for line in table.splitlines() if line.startswith("│")]
    return {row[1].strip(): row[3].strip() for row in rows}


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
    """CI-grade rule: an existing output is not overwritten without --force.

    BUG (at the time of writing): ``inspect --plot`` has no --force and silently replaces the file.
    """
    plot = samples.dir / "spectra.png"
    plot.write_bytes(b"someone else's figure")
    os.utime(plot, ns=(10**18, 10**18))

    run = invoke("inspect", samples.mlp, "--plot", plot)

    assert plot.read_bytes() == b"someone else's figure" and plot.stat().st_mtime_ns == 10**18, (
        "inspect --plot overwrote an existing file without --force"
    )
    assert run.returncode == 4, run.describe()
    assert str(plot) in flat(run.stderr)


def test_a_plot_made_meanwhile_is_not_overwritten_without_force(samples, tmp_path, monkeypatch):
    """The up-front existence check can be raced; the write itself refuses to replace a file without --force."""
    import epcli.jobs.inspect as inspect_job
    from epcli.errors import OutputError

    plot = tmp_path / "spectra.png"
    plot.write_bytes(b"someone else's")
    monkeypatch.setattr(inspect_job, "check_output", lambda *args, **kwargs: None)  # as if made after the check

    with pytest.raises(OutputError, match="already exists"):
        inspect_job.inspect_file(samples.mlp, plot=plot)

    assert plot.read_bytes() == b"someone else's"
    inspect_job.inspect_file(samples.mlp, plot=plot, force=True)
    assert plot.read_bytes().startswith(b"\x89PNG")


# ---- spectra: exact and approximate ------------------------------------------------------------
def _known_spectrum(rows: int, cols: int, values: list[float]):
    """A float64 matrix with the given singular values (the rest 0), from seeded random orthonormal bases."""
    import torch

    generator = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(rows, rows, dtype=torch.float64, generator=generator))
    v, _ = torch.linalg.qr(torch.randn(cols, cols, dtype=torch.float64, generator=generator))
    s = torch.zeros(rows, cols, dtype=torch.float64)
    s[range(len(values)), range(len(values))] = torch.tensor(values, dtype=torch.float64)
    return u @ s @ v.T


@pytest.mark.parametrize("shape", [(40, 70), (70, 40)])
def test_float64_gram_spectrum_is_close_and_its_rank_ignores_its_rounding_noise(shape):
    """A float64 weight's Gram matrix resolves singular values down to ~1e-8 * s_max; the SVD to ~n * eps * s_max:
    a value of 1e-10 * s_max counts for the exact rank only (the zeros' eigenvalues are rounding noise of either
    sign, and the Gram rank threshold follows it)."""
    from epcli.core.spectrum import spectrum

    values = [10.0, 7.0, 3.0, 1.0, 0.5, 1e-3, 1e-10]
    weight = _known_spectrum(*shape, values)

    exact, approximate = spectrum(weight, exact=True), spectrum(weight, exact=False)

    assert (exact.method, exact.approximate, approximate.method, approximate.approximate) == (
        "svd", False, "gram", True
    )
    assert (exact.dtype, approximate.dtype) == ("float64", "float64")
    expected = values + [0.0] * (min(shape) - len(values))
    np.testing.assert_allclose(exact.singular_values, expected, rtol=0, atol=1e-13 * values[0])
    np.testing.assert_allclose(approximate.singular_values, expected, rtol=0, atol=1e-7 * values[0])
    assert exact.rank == 7 and approximate.rank == 6
    reference = _erank(weight)
    assert exact.effective_rank == pytest.approx(reference, rel=1e-12)
    assert approximate.effective_rank == pytest.approx(reference, rel=1e-6)


@pytest.mark.parametrize("shape", [(60, 90), (90, 60), (600, 530)])
def test_float32_gram_spectrum_is_close_and_its_rank_is_the_stored_weights(shape):
    """A float32 weight's approximate spectrum is computed in float32: values within 1e-4 of s_max, and the
    rank torch.linalg.matrix_rank gives for the stored weight (n * eps32 * s_max), although the zero singular
    values come out of the float32 Gram matrix as noise far above that threshold."""
    import torch

    from epcli.core.spectrum import spectrum

    values = [10.0, 7.0, 3.0, 1.0, 0.5, 0.1, 0.03]  # a clear gap to zero: every method counts the same rank
    weight = _known_spectrum(*shape, values).to(torch.float32)

    exact, approximate = spectrum(weight, exact=True), spectrum(weight, exact=False)

    assert (approximate.method, approximate.dtype, exact.method, exact.dtype) == ("gram", "float32", "svd", "float64")
    reference = np.linalg.svd(weight.double().numpy(), compute_uv=False)
    np.testing.assert_allclose(exact.singular_values, reference, rtol=0, atol=1e-12 * values[0])
    np.testing.assert_allclose(approximate.singular_values, reference, rtol=0, atol=1e-4 * values[0])
    assert exact.rank == approximate.rank == int(torch.linalg.matrix_rank(weight)) == len(values)
    assert approximate.effective_rank == pytest.approx(_erank(weight), rel=1e-4)


def test_spectrum_method_follows_size_unless_exact_is_asked_for(monkeypatch):
    import torch

    from epcli.core import spectrum as spectra

    weight = torch.randn(3, 5, 2, generator=torch.Generator().manual_seed(1))  # a conv weight: [out, in * k]
    assert spectra.spectrum(weight).method == "svd"
    monkeypatch.setattr(spectra, "EXACT_SPECTRUM_MAX_SIDE", 2)
    assert spectra.spectrum(weight).method == "gram"
    assert spectra.spectrum(weight, exact=True).method == "svd"


def test_a_large_low_rank_layer_gets_its_rank_and_effective_rank_from_the_float32_gram(tmp_path, invoke, json_doc):
    """A 530 x 520 EP layer whose collapse has rank 12: the default (float32 collapse and Gram matrix) reports
    rank 12 and the exact effective rank, although its 508 zero singular values come out of float32 as noise
    that would otherwise count and inflate the effective rank."""
    import torch

    torch.manual_seed(0)
    layer = epcli.EPLinear(520, 530, depth=3, bias=False)
    with torch.no_grad():
        layer.layer_dict["0"][0].weight[12:] = 0  # the first map keeps 12 directions: the chain has rank 12
    path = tmp_path / "low_rank.safetensors"
    epcli.save_checkpoint(torch.nn.Sequential(layer), path, input_shape=(520,))

    default, exact = invoke("inspect", path, "--json"), invoke("inspect", path, "--json", "--exact")

    assert default.returncode == 0 and exact.returncode == 0, default.describe() + exact.describe()
    (approximate,), (reference,) = json_doc(default.stdout)["layers"], json_doc(exact.stdout)["layers"]
    assert (approximate["spectrum_method"], approximate["spectrum_dtype"]) == ("gram", "float32")
    assert (reference["spectrum_method"], reference["spectrum_dtype"]) == ("svd", "float64")
    assert approximate["rank"] == reference["rank"] == 12
    assert approximate["effective_rank"] == pytest.approx(reference["effective_rank"], rel=1e-4)
    top = reference["singular_values"][0]
    np.testing.assert_allclose(approximate["singular_values"], reference["singular_values"], rtol=0, atol=1e-4 * top)


def test_approximate_ranks_are_marked_in_the_table_and_json(artifacts, invoke, json_doc, flat, monkeypatch):
    """Layers over the exact-spectrum size (lowered here so the samples' layers are over it) are marked ``~``
    and say so in the JSON; ``--exact`` gives exact spectra for them."""
    from epcli.core import spectrum as spectra

    monkeypatch.setattr(spectra, "EXACT_SPECTRUM_MAX_SIDE", 1)
    path = artifacts.sources["digits_cnn"]

    approximate, exact = invoke("inspect", path, "--json"), invoke("inspect", path, "--json", "--exact")

    assert approximate.returncode == 0 and exact.returncode == 0, approximate.describe() + exact.describe()
    for layer, reference in zip(
        json_doc(approximate.stdout)["layers"], json_doc(exact.stdout)["layers"], strict=True
    ):
        assert (layer["spectrum_method"], layer["ranks_approximate"]) == ("gram", True)
        assert (reference["spectrum_method"], reference["ranks_approximate"]) == ("svd", False)
        assert layer["effective_rank"] == pytest.approx(reference["effective_rank"], rel=1e-6)
        top = reference["singular_values"][0]
        np.testing.assert_allclose(layer["singular_values"], reference["singular_values"], rtol=0, atol=1e-6 * top)
    assert "~" in approximate.stderr and "--exact" in flat(approximate.stderr)  # with --json the table is on stderr
    assert "~" not in exact.stderr


@pytest.mark.parametrize("which", ["digits_mlp", "digits_cnn.collapsed"])
def test_inspect_reads_one_ep_layer_at_a_time(which, artifacts, monkeypatch):
    """Streaming: every read holds the tensors of at most one EP layer, and tensors of no other module."""
    from epcli.checkpoint.opened import CheckpointFile
    from epcli.convert import layer_states
    from epcli.jobs.inspect import inspect_file

    stem = which.split(".")[0]
    path = artifacts.collapsed[stem] if which.endswith("collapsed") else artifacts.sources[stem]
    reads: list[list[str]] = []
    original = CheckpointFile.read

    def recording_read(self, keys, **kwargs):
        keys = list(keys)
        reads.append(keys)
        return original(self, keys, **kwargs)

    monkeypatch.setattr(CheckpointFile, "read", recording_read)

    result = inspect_file(path)

    layers = [layer.summary.path for layer in result.layers]
    assert len(reads) == len(layers) >= 2
    for keys, layer in zip(reads, layers, strict=True):
        owner = {p: set(state) for p, state in layer_states(dict.fromkeys(keys), layers).items() if state}
        assert list(owner) == [layer], (layer, keys)

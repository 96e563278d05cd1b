"""Findings of a new user's pass: fast output-name errors, one line for an unusable --junit-xml, messages that name
the file and the fix (--plain-model, --require-model-check, a collapsed file re-saved without metadata), counts
in the right number, and the exit code of a model that cannot run on its inputs (2 for the command line's own
input specs or sample count, 3 for the checkpoint's)."""

from __future__ import annotations

import hashlib
import importlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest


# ---- 1. an output name with the wrong suffix fails before torch is imported ----------------------------------
def test_output_name_usage_errors_do_not_import_torch(samples, tmp_path):
    """Each run fails like any other usage error (2; a directory given as the output file: 4) without importing
    torch, so it takes as long as ``epcli verify`` with no arguments, not the ~3 s of ``import torch``."""
    mlp = str(samples.mlp)
    runs = [
        (["collapse", mlp, "-o", "out.bin"], 2, "unsupported output suffix '.bin' for -o"),
        (["collapse", mlp, "-o", "out.onnx"], 2, "for ONNX run epcli export"),
        (["collapse", mlp, "-o", "out.pt", "--format", "safetensors"], 2, "does not match --format"),
        (["collapse", mlp, "--max-shard-size", "0"], 2, "--max-shard-size '0'"),
        (["collapse", mlp, "-o", str(tmp_path)], 4, "is a directory"),
        (["export", mlp, "--onnx", "out.bin"], 2, "for --onnx"),
        (["export", mlp, "--safetensors", "out.bin"], 2, "for --safetensors"),
        (["export", mlp], 2, "nothing to export"),
        (["compress", mlp, "-o", "out.bin"], 2, "for -o"),
        (["compress", mlp, "-o", "out.onnx"], 2, "for ONNX add --onnx out.onnx"),
        (["compress", mlp, "--onnx", "out.bin"], 2, "for --onnx"),
        (["inspect", mlp, "--plot", "spectra.bin"], 2, "for --plot"),
    ]
    _fail_without_torch(runs, tmp_path)
    assert not list(tmp_path.glob("out.*")) and not list(tmp_path.glob("spectra.*"))


def test_a_missing_or_empty_checkpoint_fails_before_torch_is_imported(samples, tmp_path):
    """The error opening the file would give (exit 3), at once: a mistyped path costs no ``import torch``."""
    (tmp_path / "empty.pt").write_bytes(b"")
    runs = [
        ([command, "missing.pt", *extra], 3, "missing.pt: no such file; check the path")
        for command, extra in [("collapse", []), ("verify", []), ("export", ["--onnx", "m.onnx"]), ("inspect", []),
                               ("compress", [])]
    ]
    runs.append((["collapse", "empty.pt"], 3, "empty.pt: is empty (0 bytes)"))
    runs.append((["verify", "missing.pt", str(samples.mlp)], 3, "missing.pt: no such file"))
    # an empty artifact is written again by the command that made it, not saved as a checkpoint
    (tmp_path / "empty.safetensors").write_bytes(b"")
    (tmp_path / "empty.onnx").write_bytes(b"")
    runs.append((["verify", str(samples.mlp), "empty.safetensors"], 3,
                 f"empty.safetensors: is empty (0 bytes); it was not written completely: write it again with epcli "
                 f"collapse {samples.mlp} -o empty.safetensors (epcli compress {samples.mlp} -o empty.safetensors"))
    runs.append((["verify", str(samples.mlp), "empty.onnx"], 3,
                 f"empty.onnx: is empty (0 bytes); it was not written completely: write it again with epcli export "
                 f"{samples.mlp} --onnx empty.onnx"))
    _fail_without_torch(runs, tmp_path)


def test_the_library_says_how_to_write_an_empty_artifact_again(samples, tmp_path):
    """``verify_files`` (the API behind ``epcli verify``) names the artifact and the command that writes it."""
    from epcli.errors import CheckpointError
    from epcli.jobs.verify import verify_files
    from epcli.verification.compare import VerifySettings

    empty = tmp_path / "m.collapsed.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError) as raised:
        verify_files(samples.mlp, empty, VerifySettings(samples=8))
    assert raised.value.file == str(empty)
    assert str(raised.value) == (
        f"{empty}: is empty (0 bytes); it was not written completely: write it again with epcli collapse "
        f"{samples.mlp} -o {empty} (epcli compress {samples.mlp} -o {empty} for a compressed model)"
    )


def test_samples_with_inputs_is_a_usage_error_before_torch(samples, tmp_path):
    """--samples N would be ignored (every sample of --inputs FILE is compared): refused as --input-shape with --input
    is, from the command line alone, before torch is imported; the default 64 is the library's."""
    from epcli.cli.verify import DEFAULT_SAMPLES
    from epcli.verification.compare import VerifySettings

    assert DEFAULT_SAMPLES == VerifySettings().samples
    message = ("give the samples either with --samples 5 (seeded random ones) or with --inputs x.npz (yours: every "
               "sample of the file is compared), not both; drop --samples")
    _fail_without_torch([(["verify", str(samples.mlp), "--inputs", "x.npz", "--samples", "5"], 2, message)], tmp_path)


def _fail_without_torch(runs: list[tuple[list[str], int, str]], cwd: Path) -> None:
    """Each run exits with its code and says its text, in one process that never imports torch (nor onnx)."""
    code = textwrap.dedent(
        f"""
        import json, sys
        from typer.testing import CliRunner
        from epcli.cli.app import app
        results = []
        for args in {[args for args, _, _ in runs]!r}:
            result = CliRunner().invoke(app, args)
            results.append([result.exit_code, result.stderr])
        heavy = sorted(m for m in ('torch', 'onnx', 'onnxruntime', 'matplotlib') if m in sys.modules)
        print(json.dumps({{"results": results, "heavy": heavy}}))
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=120)

    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    for (args, expected, text), (exit_code, stderr) in zip(runs, report["results"], strict=True):
        assert exit_code == expected and text in " ".join(stderr.split()), (args, exit_code, stderr)
    assert report["heavy"] == [], f"heavy modules imported before the error: {report['heavy']}"


# ---- 2. --junit-xml DIR: one line, exit 4 like -o DIR ----------------------------------------------------------
def test_junit_xml_directory_is_one_error_line_and_exit_4_like_o_dir(samples, invoke, json_doc, flat):
    directory = samples.dir / "reports"
    directory.mkdir()

    junit = invoke("verify", samples.mlp, "--junit-xml", directory, "--json")
    output = invoke("collapse", samples.mlp, "-o", directory)

    assert junit.returncode == 4 == output.returncode, (junit.describe(), output.describe())
    lines = [line for line in junit.stderr.splitlines() if line.startswith("error")]
    assert len(lines) == 1, junit.stderr
    assert f"{directory} is a directory; give a file name with --junit-xml" in flat(junit.stderr)
    document = json_doc(junit.stdout)
    assert document["error"]["type"] == "OutputError" and document["error"]["file"] == str(directory)
    assert list(directory.iterdir()) == []


# ---- 3. --plain-model and --require-model-check name the file and the fix ----------------------------------------
PLAIN_MODULE = textwrap.dedent(
    '''
    from torch import nn


    def resized():  # the sample MLP's class with a head of 11 classes instead of 10
        return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Dropout(), nn.Linear(64, 11))


    def renamed():  # the head under another name
        return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Dropout(), nn.Sequential(nn.Linear(64, 10)))
    '''
)


@pytest.fixture
def plain_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    name = f"epcli_cli_plain_{hashlib.sha1(str(tmp_path).encode()).hexdigest()[:10]}"
    (tmp_path / f"{name}.py").write_text(PLAIN_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    return name


def test_plain_model_failures_name_the_file_keys_and_fix(samples, invoke, json_doc, flat, plain_module):
    collapsed = samples.dir / "mlp.collapsed.safetensors"
    assert invoke("collapse", samples.mlp, "-o", collapsed, "-q").returncode == 0

    no_artifact = invoke("verify", samples.mlp, "--plain-model", f"{plain_module}:renamed", "--json")
    resized = invoke("verify", samples.mlp, collapsed, "--plain-model", f"{plain_module}:resized", "--json")
    renamed = invoke("verify", samples.mlp, collapsed, "--plain-model", f"{plain_module}:renamed", "--json")
    missing = invoke("verify", samples.mlp, collapsed, "--plain-model", f"{plain_module}:nope", "--json")

    assert no_artifact.returncode == 2, no_artifact.describe()
    text = flat(no_artifact.stderr)
    assert f"{samples.mlp} was given without a collapsed file" in text
    assert f"run epcli verify {samples.mlp} COLLAPSED.safetensors --plain-model {plain_module}:renamed" in text
    assert json_doc(no_artifact.stdout)["error"]["file"] == str(samples.mlp)

    assert resized.returncode == 1, resized.describe()  # was "unexpected RuntimeError" (exit 3)
    text = flat(resized.stderr)
    assert "unexpected" not in text and "RuntimeError" not in text
    assert f"{collapsed} does not fit --plain-model '{plain_module}:resized'" in text
    assert "'3.weight' is [10, 64] in mlp.collapsed.safetensors, [11, 64] in the class" in text
    assert "give --plain-model the function that builds the model you deploy" in text
    assert json_doc(resized.stdout)["error"]["file"] == str(collapsed)

    assert renamed.returncode == 1, renamed.describe()
    text = flat(renamed.stderr)
    assert f"{collapsed} does not load strictly into --plain-model '{plain_module}:renamed'" in text
    assert "unexpected keys ['3.bias', '3.weight']" in text and "give --plain-model the function" in text
    assert json_doc(renamed.stdout)["error"]["file"] == str(collapsed)

    assert missing.returncode == 3 and f"--plain-model: model factory '{plain_module}:nope'" in flat(missing.stderr)


def test_require_model_check_failure_names_the_checkpoint_and_the_fix(custom_model, invoke, json_doc, flat):
    run = invoke("verify", custom_model.path, "--samples", "8", "--require-model-check", "--json")

    assert run.returncode == 1, run.describe()
    message = json_doc(run.stdout)["error"]["message"]
    assert message.startswith(f"{custom_model.path}: the whole model was not compared"), message
    assert "--require-model-check" in message and "--model module:function" in message
    assert message in flat(run.stderr)


# ---- 4. a collapsed file re-saved without epcli's metadata -------------------------------------------------------
def test_collapsed_file_resaved_without_metadata_gets_a_hint_that_leads_somewhere(samples, invoke, flat, monkeypatch):
    """The old hint said to name the model's factory with --model, which leads back to an error (the file holds
    the collapsed layers, not the EP layers a factory builds); following the new one works."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    collapsed = samples.dir / "mlp.collapsed.safetensors"
    assert invoke("collapse", samples.mlp, "-o", collapsed, "-q").returncode == 0
    tensors = load_file(collapsed)
    bare = samples.dir / "bare.safetensors"
    save_file(tensors, bare)  # what a user's re-save does: no metadata
    bare_pt = samples.dir / "bare.pt"
    torch.save(dict(tensors), bare_pt)
    name = f"epcli_cli_expanded_{hashlib.sha1(str(samples.dir).encode()).hexdigest()[:10]}"
    (samples.dir / f"{name}.py").write_text(  # the expanded model, as the old hint asked for
        f"import epcli\n\ndef build():\n    return epcli.load_checkpoint({str(samples.mlp)!r}).model\n"
    )
    monkeypatch.syspath_prepend(str(samples.dir))
    importlib.invalidate_caches()

    runs = [
        invoke("verify", samples.mlp, bare),
        invoke("verify", bare),
        invoke("collapse", bare),
        invoke("inspect", bare_pt),
        invoke("verify", bare, "--model", f"{name}:build", "--input-shape", "64"),
    ]
    for run in runs:
        text = flat(run.stderr)
        assert run.returncode == 3, run.describe()
        assert "looks like an already-collapsed (plain) model saved without epcli's metadata" in text, text
        assert "epcli collapse EXPANDED -o FILE" in text and "name the model's factory with --model" not in text
    assert "save_file(tensors, path, metadata=...)" in flat(runs[0].stderr)
    assert "torch.save the dict torch.load returned" in flat(runs[3].stderr)

    with safe_open(collapsed, "pt") as handle:  # the hint's re-save, keeping the metadata
        metadata = handle.metadata()
    kept = samples.dir / "kept.safetensors"
    save_file(tensors, kept, metadata=metadata)
    assert invoke("verify", samples.mlp, kept, "--samples", "8").returncode == 0


def test_a_foreign_expanded_state_dict_keeps_the_model_hint(samples, invoke, flat):
    """A plain state dict of an expanded model (EP tensors under layer_dict.*) is what --model is for."""
    import torch

    import epcli

    state = epcli.load_checkpoint(samples.mlp).model.state_dict()
    foreign = samples.dir / "expanded_state.pt"
    torch.save(state, foreign)

    run = invoke("verify", foreign)

    assert run.returncode == 3, run.describe()
    assert "name the model's factory with --model" in flat(run.stderr) and "already-collapsed" not in run.stderr


# ---- 5. counts in the right number ------------------------------------------------------------------------------
def test_one_comparison_on_one_sample_reads_in_the_singular(custom_model, invoke, flat):
    run = invoke("verify", custom_model.path, "--samples", "1")

    assert run.returncode == 0, run.describe()
    text = " ".join((run.stdout + run.stderr).split())  # in-process, rich may print the report to either
    assert "1 comparison passed (" in text and "float32, 1 sample, seed 0)" in text, text
    assert "comparisons" not in text and "1 samples" not in text


def test_plural_helper():
    from epcli.text import plural

    assert [plural(n, "comparison") for n in (0, 1, 2)] == ["0 comparisons", "1 comparison", "2 comparisons"]
    assert plural(1, "CUDA device") == "1 CUDA device" and plural(3, "child", "children") == "3 children"


# ---- 6. a model that cannot run on its inputs: 3 for the checkpoint's specs, 2 for the command line's -------------
LONG_MODULE = textwrap.dedent(
    '''
    from torch import nn

    from epcli import EPConv1d


    def build():
        return nn.Sequential(EPConv1d(1, 1, 3, depth=2, padding=1))
    '''
)


@pytest.fixture
def long_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """A conv model saved with an input one sample of which exceeds a check's memory budget, the same model as a
    plain state dict (read with --model and --input-shape), and its factory."""
    import torch

    import epcli

    name = f"epcli_cli_long_{hashlib.sha1(str(tmp_path).encode()).hexdigest()[:10]}"
    (tmp_path / f"{name}.py").write_text(LONG_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    model = importlib.import_module(name).build()
    # a budget of 8 MiB (the limit is 768 MiB): the same refusals, without a 256 MiB sample
    monkeypatch.setattr("epcli.verification.compare.MAX_CHECK_BYTES", 8 * 2**20)
    embedded = epcli.save_checkpoint(model, tmp_path / "long.pt", input_shape=[1, 2**20])
    foreign = tmp_path / "long_state.pt"
    torch.save(model.state_dict(), foreign)
    return SimpleNamespace(embedded=embedded, foreign=foreign, factory=f"{name}:build")


def test_budget_refusal_is_3_for_the_checkpoint_input_and_2_for_the_command_line(long_input, invoke, json_doc, flat):
    embedded = invoke("verify", long_input.embedded, "--json")
    typed = invoke("verify", long_input.foreign, "--model", long_input.factory, "--input-shape", "1,1048576", "--json")
    count = invoke("verify", long_input.foreign, "--model", long_input.factory, "--input-shape", "1,4096",
                   "--samples", "1000000", "--json")

    assert embedded.returncode == 3, embedded.describe()
    assert json_doc(embedded.stdout)["error"]["type"] == "ModelInputError"
    assert "even with one sample; give a smaller input shape" in flat(embedded.stderr)
    assert typed.returncode == 2, typed.describe()
    assert json_doc(typed.stdout)["error"]["type"] == "UsageError"
    assert "(the input was given with --input-shape)" in flat(typed.stderr)
    assert count.returncode == 2, count.describe()
    assert "give fewer samples (--samples, or fewer in the --inputs file)" in flat(count.stderr)


TOKENS_MODULE = textwrap.dedent(
    '''
    import torch
    from torch import nn

    from epcli import EPLinear


    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = nn.Embedding(17, 8)
            self.mix = EPLinear(8, 8, depth=2)

        def forward(self, ids):
            return self.mix(self.wte(ids))


    def build():
        torch.manual_seed(0)
        return Tokens()
    '''
)


def test_rejected_inputs_are_3_for_the_checkpoint_specs_and_2_for_typed_ones(tmp_path, monkeypatch, invoke, flat):
    import torch

    import epcli
    from epcli import InputSpec

    name = f"epcli_cli_tokens_{hashlib.sha1(str(tmp_path).encode()).hexdigest()[:10]}"
    (tmp_path / f"{name}.py").write_text(TOKENS_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    model = importlib.import_module(name).build()
    embedded = epcli.save_checkpoint(model, tmp_path / "tokens.pt", inputs=[InputSpec((4,), torch.int64, 0, 1000)])
    foreign = tmp_path / "tokens_state.pt"
    torch.save(model.state_dict(), foreign)

    from_file = invoke("verify", embedded, "--model", f"{name}:build", "--samples", "8")
    from_command_line = invoke("verify", foreign, "--model", f"{name}:build", "--input", "int64[4]:0:1000",
                               "--samples", "8")

    assert from_file.returncode == 3, from_file.describe()
    assert "the model rejected its inputs" in flat(from_file.stderr)
    assert from_command_line.returncode == 2, from_command_line.describe()
    assert "(the input was given with --input)" in flat(from_command_line.stderr)

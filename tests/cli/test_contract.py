"""The CLI contract a CI step relies on: outputs, messages, order, and what verify says it checked.

In-process runs (``invoke``) where the behaviour does not depend on the process; the
stdout/stderr split, exit codes and environment are checked with subprocesses in
``test_cli_behaviour.py``.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

import epcli
from epcli.cli.render import printable

UNEXPECTED = "unexpected"


def _one_line_error(run, *named: Path | str, code: int) -> str:
    """Exit ``code``, one message on stderr naming every ``named``, never an "unexpected" error; returns stderr as one
    line."""
    assert run.returncode == code, run.describe()
    assert isinstance(run.exception, SystemExit), repr(run.exception)
    text = run.stderr.replace("\n", "")
    assert UNEXPECTED not in text, run.describe()
    for item in named:
        assert str(item) in text, f"the message does not name {item}:\n{run.stderr}"
    return text


# ---- outputs ---------------------------------------------------------------------------------
def test_missing_output_directories_are_created(samples, artifacts, invoke, monkeypatch):
    """The README's own CI step: ``-o dist/model.safetensors`` into a fresh checkout.

    (The torch exporter is replaced by the model it gave for this sample, to keep the test fast;
    onnxruntime still validates it against the torch model.)
    """
    import onnx

    import epcli.jobs.export as export_job

    monkeypatch.setattr(export_job, "build_onnx", lambda *a, **k: onnx.load(str(artifacts.onnx["digits_mlp"])))
    collapsed = samples.dir / "dist" / "model.safetensors"
    onnx_path = samples.dir / "deploy" / "onnx" / "model.onnx"
    exported = samples.dir / "deploy" / "st" / "model.safetensors"
    plot = samples.dir / "plots" / "spectra.png"

    runs = [
        invoke("collapse", samples.mlp, "-o", collapsed, "-q"),
        invoke("export", samples.mlp, "--onnx", onnx_path, "--safetensors", exported, "--samples", "8", "-q"),
        invoke("inspect", samples.mlp, "--plot", plot, "-q"),
    ]

    for run in runs:
        assert run.returncode == 0, run.describe()
    for path in (collapsed, onnx_path, exported, plot):
        assert path.is_file() and path.stat().st_size > 0, path
    assert epcli.load_checkpoint(collapsed).kind == "collapsed"


@pytest.mark.parametrize("case", ["exists", "suffix", "directory", "parent-is-a-file"])
def test_export_output_problems_are_found_before_any_export_work(case, samples, invoke, monkeypatch):
    import epcli.jobs.export as export_job

    def no_work(*args, **kwargs):
        raise AssertionError("the export ran before the output path was checked")

    monkeypatch.setattr(export_job, "collapse_opened", no_work)
    monkeypatch.setattr(export_job, "build_onnx", no_work)
    target = {
        "exists": samples.dir / "taken.onnx",
        "suffix": samples.dir / "model.txt",
        "directory": samples.dir / "adir",
        "parent-is-a-file": samples.dir / "afile" / "model.onnx",
    }[case]
    if case == "exists":
        target.write_bytes(b"keep me")
    elif case == "directory":
        target.mkdir()
    elif case == "parent-is-a-file":
        target.parent.write_bytes(b"")

    run = invoke("export", samples.mlp, "--onnx", target)

    text = _one_line_error(run, target, code=2 if case == "suffix" else 4)
    assert {"exists": "--force", "suffix": ".onnx", "directory": "is a directory", "parent-is-a-file": "directory"}[
        case
    ] in text
    if case == "exists":
        assert target.read_bytes() == b"keep me"


def test_output_that_is_a_directory_is_named_as_such(samples, invoke):
    (samples.dir / "adir").mkdir()

    text = _one_line_error(invoke("collapse", samples.mlp, "-o", samples.dir / "adir"), samples.dir / "adir", code=4)

    assert "is a directory" in text and "digits_mlp.collapsed.safetensors" in text, "suggests a file name"


def test_input_is_checked_before_the_output(samples, invoke):
    """``collapse mlp.onnx`` (with mlp.collapsed.safetensors present) is about the input's suffix."""
    wrong = samples.dir / "mlp.onnx"
    wrong.write_bytes(samples.mlp.read_bytes())
    (samples.dir / "mlp.collapsed.safetensors").write_bytes(b"an earlier output")

    text = _one_line_error(invoke("collapse", wrong), wrong, code=3)

    assert ".onnx" in text and "already exists" not in text


def test_inspect_checks_its_input_before_the_plot_path(samples, invoke):
    wrong = samples.dir / "mlp.onnx"
    wrong.write_bytes(samples.mlp.read_bytes())
    (samples.dir / "taken.png").write_bytes(b"")

    text = _one_line_error(invoke("inspect", wrong, "--plot", samples.dir / "taken.png"), wrong, code=3)

    assert ".onnx" in text and "already exists" not in text


def test_collapse_of_a_directory_is_an_input_error(samples, invoke, monkeypatch):
    monkeypatch.chdir(samples.dir)

    text = _one_line_error(invoke("collapse", "."), code=3)

    assert "directory" in text and "empty name" not in text


def test_checkpoint_without_ep_layers_has_nothing_to_collapse(tmp_path, invoke):
    plain = epcli.save_checkpoint(
        nn.Sequential(nn.Linear(4, 3), nn.ReLU()), tmp_path / "plain.safetensors", input_shape=(4,)
    )
    before = sorted(tmp_path.iterdir())

    text = _one_line_error(invoke("collapse", plain), plain, code=3)

    assert "nothing to collapse" in text
    assert sorted(tmp_path.iterdir()) == before, "nothing is written"


def test_collapsed_pt_is_a_plain_state_dict(samples, invoke):
    """``--format pt`` loads with torch.load(weights_only=True) + strict load_state_dict into the plain model."""
    out = samples.dir / "plain.pt"
    assert invoke("collapse", samples.mlp, "-o", out, "-q").returncode == 0
    source = epcli.load_checkpoint(samples.mlp)
    plain = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, 10)).eval()  # by hand

    state = torch.load(out, weights_only=True)
    plain.load_state_dict(state)

    assert isinstance(state, OrderedDict) and set(state) == {"0.weight", "0.bias", "3.weight", "3.bias"}
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(plain(x), source.model(x), atol=1e-4, rtol=1e-4)
    assert epcli.load_checkpoint(out).kind == "collapsed", "epcli still reads its metadata"


# ---- order -----------------------------------------------------------------------------------
@pytest.fixture
def twelve_layers(tmp_path) -> Path:
    torch.manual_seed(0)
    model = nn.Sequential(*[epcli.EPLinear(3, 3, depth=2) for _ in range(12)]).eval()
    return epcli.save_checkpoint(model, tmp_path / "deep.safetensors", input_shape=(3,))


def test_layers_are_listed_in_natural_order(twelve_layers, invoke, json_doc):
    natural = [str(i) for i in range(12)]
    out = twelve_layers.with_name("deep.out.safetensors")

    collapse = json_doc(invoke("collapse", twelve_layers, "-o", out, "--json").stdout)
    verify = json_doc(invoke("verify", twelve_layers, "--samples", "4", "--json").stdout)
    inspect = json_doc(invoke("inspect", twelve_layers, "--json").stdout)
    table = invoke("inspect", twelve_layers).stdout

    assert [layer["path"] for layer in collapse["layers"]] == natural
    assert [c["name"] for c in verify["comparisons"]] == [*natural, "<model>"]
    assert [layer["path"] for layer in inspect["layers"]] == natural
    rows = [line.split("│")[1].strip() for line in table.splitlines() if line.startswith("│")]
    assert rows == natural


# ---- what verify says it checked ---------------------------------------------------------------
def test_verify_says_when_the_whole_model_was_not_compared(custom_model, invoke, json_doc):
    """No architecture and no --model: layers only, and the report says so (table and JSON)."""
    document = json_doc(invoke("verify", custom_model.path, "--samples", "8", "--json").stdout)
    table = invoke("verify", custom_model.path, "--samples", "8")

    assert document["passed"] is True
    assert [c["scope"] for c in document["comparisons"]] == ["layer"]
    assert "no architecture" in document["model_check_skipped"]
    assert "whole model: not compared" in table.stdout.replace("\n", " "), table.describe()
    with_factory = json_doc(
        invoke("verify", custom_model.path, "--samples", "8", "--model", custom_model.factory, "--json").stdout
    )
    assert with_factory["model_check_skipped"] is None


def test_stale_artifact_is_named_from_its_recorded_source(samples, invoke, json_doc, tmp_path):
    artifact = samples.dir / "mlp.collapsed.safetensors"
    assert invoke("collapse", samples.mlp, "-o", artifact, "-q").returncode == 0
    model = epcli.load_checkpoint(samples.mlp).model
    with torch.no_grad():
        model[3].layer_dict["1"][0].weight.add_(0.05)  # retrained: same layers, other weights
    retrained = epcli.save_checkpoint(model, tmp_path / "retrained.pt", input_shape=(64,))

    stale = invoke("verify", retrained, artifact, "--samples", "8", "--json")
    fresh = json_doc(invoke("verify", samples.mlp, artifact, "--samples", "8", "--json").stdout)

    assert stale.returncode == 1, stale.describe()
    document = json_doc(stale.stdout)
    assert document["artifact_stale"] is True
    assert any("stale" in note and "digits_mlp.pt" in note for note in document["notes"]), document["notes"]
    assert "stale" in stale.stderr and str(artifact) in stale.stderr.replace("\n", "")
    assert fresh["artifact_stale"] is False and fresh["notes"] == []


@pytest.fixture
def another_models_collapse(tmp_path, invoke):
    """The collapse of a model with the sample MLP's layer paths (0 and 3) and input, but narrower layers; and a copy
    whose provenance no longer says which checkpoint it was made from."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    narrow = nn.Sequential(epcli.EPLinear(64, 32, depth=2), nn.ReLU(), nn.Identity(), epcli.EPLinear(32, 10, depth=2))
    source = epcli.save_checkpoint(narrow.eval(), tmp_path / "narrow.safetensors", input_shape=(64,))
    collapsed = tmp_path / "narrow.collapsed.safetensors"
    assert invoke("collapse", source, "-o", collapsed, "-q").returncode == 0
    with safe_open(str(collapsed), "pt") as handle:
        metadata = handle.metadata()
    document = json.loads(metadata["epcli"])
    del document["provenance"]["source_sha256"]
    unrecorded = tmp_path / "unrecorded.safetensors"
    save_file(load_file(str(collapsed)), str(unrecorded), metadata={**metadata, "epcli": json.dumps(document)})
    return collapsed, unrecorded


@pytest.mark.parametrize("which", ["collapsed CNN", "ONNX of the CNN", "narrower layers at the same paths"])
def test_another_models_artifact_is_stale(which, artifacts, another_models_collapse, tmp_path, invoke, json_doc):
    """A file that records another checkpoint as its source is stale (exit 1, as the README's table says), also when
    it is another model's and does not fit: nothing is compared, the run says why, and CI reports carry the failure;
    no "unexpected" error from inside the model."""
    checkpoint = artifacts.sources["digits_mlp"]
    artifact, misfit = {
        "collapsed CNN": (artifacts.collapsed["digits_cnn"], "its model takes input_shape=[1, 8, 8]"),
        "ONNX of the CNN": (artifacts.onnx["digits_cnn"], "the ONNX file does not match the checkpoint's inputs"),
        "narrower layers at the same paths": (
            another_models_collapse[0],
            f"holds '0.weight' of shape [32, 64], but EP layer '0' of {checkpoint} collapses to a weight of shape [64, 64]",
        ),
    }[which]
    junit = tmp_path / "verify.xml"

    run = invoke("verify", checkpoint, artifact, "--samples", "8", "--json", "--junit-xml", junit)

    assert run.returncode == 1, run.describe()
    document = json_doc(run.stdout)
    assert document["error"]["type"] == "VerificationError" and document["artifact_stale"] is True
    assert "stale artifact; it does not fit this checkpoint's model, so nothing was compared" in document["error"]["message"]
    assert document["comparisons"] == []
    assert any(misfit in note and "nothing was compared" in note for note in document["notes"]), document["notes"]
    assert any("is stale: it was made from" in note for note in document["notes"])
    assert UNEXPECTED not in run.stderr and "comparisons passed" not in run.stderr
    assert 'name="&lt;artifact&gt;"' in junit.read_text() and 'failures="1"' in junit.read_text()


def test_an_artifact_that_does_not_fit_and_records_no_source_is_unusable(another_models_collapse, artifacts, invoke):
    """Without a recorded source there is no telling it stale: a file that does not fit is an unusable input (3),
    named with the key and both shapes, before anything runs."""
    checkpoint = artifacts.sources["digits_mlp"]
    unrecorded = another_models_collapse[1]

    run = invoke("verify", checkpoint, unrecorded, "--samples", "8")

    text = _one_line_error(run, unrecorded, checkpoint, code=3)
    assert "holds '0.weight' of shape [32, 64]" in text and "was it made from this checkpoint?" in text


def test_float64_check_of_a_float32_artifact_is_explained(artifacts, invoke, json_doc):
    source, artifact = artifacts.sources["digits_mlp"], artifacts.collapsed["digits_mlp"]

    refused = invoke("verify", source, artifact, "--dtype", "float64", "--samples", "8")
    bounded = invoke(
        "verify", source, artifact, "--dtype", "float64", "--atol", "1e-4", "--rtol", "1e-4", "--samples", "8", "--json"
    )

    text = _one_line_error(refused, artifact, code=2)
    assert "float32" in text and "--dtype float32" in text
    assert bounded.returncode == 0, bounded.describe()
    assert any("float32 precision" in note for note in json_doc(bounded.stdout)["notes"])


# ---- messages --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv, words",
    [
        (["--samples", "0"], "whole number >= 1"),
        (["--samples", "many"], "whole number >= 1"),
        (["--batch-size", "1.5"], "whole number >= 1"),
        (["--seed", str(2**70)], f"from 0 to {2**64 - 1}"),
        (["--atol", "-1"], "finite number >= 0"),
        (["--rtol", "nan"], "finite number >= 0"),
        (["--timeout", "0"], "seconds > 0"),
        (["--dtype", "float16"], "expected one of float32, float64"),
        (["collapse", "--format", "npz"], "expected one of safetensors, pt"),
        (["export", "--onnx", "x.onnx", "--opset", "3"], "whole number >= 7"),
    ],
)
def test_option_values_are_checked_in_epclis_words(argv, words, bad_good_path, invoke, json_doc):
    command, argv = (argv[0], argv[1:]) if argv[0] in ("collapse", "export") else ("verify", argv)
    run = invoke(command, bad_good_path, *argv, "--json")

    assert run.returncode == 2, run.describe()
    assert words in run.stderr.replace("\n", " ") and "Input should" not in run.stderr
    document = json_doc(run.stdout)
    assert document["error"]["type"] == "UsageError" and words in document["error"]["message"]


@pytest.fixture(scope="module")
def bad_good_path() -> Path:
    return Path(__file__).resolve().parents[2] / "sample_checkpoints" / "digits_mlp.pt"


@pytest.mark.parametrize(
    "argv", [["--bogus", "--json"], ["verify", "--json"], ["nosuch", "--json"], ["inspect", "--json", "x.pt", "--plot"]]
)
def test_every_usage_error_with_json_is_one_document(argv, invoke, json_doc):
    run = invoke(*argv)

    assert run.returncode == 2, run.describe()
    assert json_doc(run.stdout)["error"]["type"] == "UsageError"


def test_usage_lines_have_no_braces(invoke):
    for command, usage in (("collapse", "CKPT"), ("verify", "CKPT [ARTIFACT]"), ("inspect", "CKPT")):
        run = invoke(command, "--help")
        assert f"Usage: epcli {command} [OPTIONS] {usage}" in run.stdout, run.stdout[:300]
        assert "{" not in run.stdout.splitlines()[0]


def test_shell_completion_is_available(invoke):
    run = invoke("--show-completion", "bash")

    assert run.returncode == 0, run.describe()
    assert "_EPCLI_COMPLETE" in run.stdout
    assert "--install-completion" in invoke("--help").stdout


def test_control_characters_never_reach_the_terminal(tmp_path, invoke):
    """A name from a file (here the checkpoint's own name) holding escape sequences is shown escaped."""
    hostile = tmp_path / "x\x1b[2J\x1b]0;owned\x07\r\x9b.pt"

    run = invoke("inspect", hostile)

    assert run.returncode == 3, run.describe()
    for control in ("\x1b", "\x07", "\r", "\x9b"):
        assert control not in run.stderr, repr(run.stderr)
    assert "\\x1b[2J" in run.stderr


def test_printable_escapes_every_control_but_newline_and_tab():
    controls = [chr(c) for c in [*range(0x20), 0x7F, *range(0x80, 0xA0), 0x202E, 0x2066] if chr(c) not in "\n\t"]

    shown = printable("".join(controls) + "a\nb\tc é ✓")

    assert not any(c in shown for c in controls)
    assert shown.endswith("a\nb\tc é ✓") and "\\x1b" in shown and "\\u202e" in shown


def test_save_checkpoint_of_a_state_dict_says_to_pass_the_model(tmp_path):
    model = nn.Sequential(epcli.EPLinear(4, 4, depth=2))

    with pytest.raises(epcli.EpcliError, match="pass the model"):
        epcli.save_checkpoint(model.state_dict(), tmp_path / "x.safetensors", input_shape=(4,))
    assert not (tmp_path / "x.safetensors").exists()


# ---- ONNX artifacts are untrusted ----------------------------------------------------------------
def _onnx_file(path: Path, *, input_shape, output_shape=("batch", 10), loop_trips: int | None = None) -> Path:
    """A small hand-built ONNX model: Identity (or a Loop doubling its input ``loop_trips`` times)."""
    import onnx
    from onnx import TensorProto, helper

    initializers = []
    if loop_trips is None:
        nodes = [helper.make_node("Identity", ["input"], ["output"])]
    else:
        body = helper.make_graph(
            [
                helper.make_node("Identity", ["cond_in"], ["cond_out"]),
                helper.make_node("Add", ["x_in", "x_in"], ["x_out"]),
            ],
            "body",
            [
                helper.make_tensor_value_info("iter", TensorProto.INT64, []),
                helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                helper.make_tensor_value_info("x_in", TensorProto.FLOAT, None),
            ],
            [
                helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
                helper.make_tensor_value_info("x_out", TensorProto.FLOAT, None),
            ],
        )
        nodes = [helper.make_node("Loop", ["trips", "cond", "input"], ["output"], body=body)]
        initializers = [
            helper.make_tensor("trips", TensorProto.INT64, [], [loop_trips]),
            helper.make_tensor("cond", TensorProto.BOOL, [], [True]),
        ]
    graph = helper.make_graph(
        nodes,
        "hostile",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, list(input_shape))],
        [
            helper.make_tensor_value_info(
                "output", TensorProto.FLOAT, None if output_shape is None else list(output_shape)
            )
        ],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize(
    "case, words",
    [
        ("scalar-input", "does not match"),
        ("static-batch-0", "batch size of 0"),
        ("static-batch-3", "multiple of 3"),
        ("wrong-features", "does not match"),
        ("wrong-output", "output"),
    ],
)
def test_onnx_artifact_that_does_not_fit_the_checkpoint(case, words, artifacts, tmp_path, invoke):
    checkpoint = artifacts.sources["digits_mlp"]
    onnx_path = {
        "scalar-input": lambda: _onnx_file(tmp_path / "scalar.onnx", input_shape=[]),
        "static-batch-0": lambda: _onnx_file(tmp_path / "zero.onnx", input_shape=[0, 64]),
        "static-batch-3": lambda: _onnx_file(tmp_path / "three.onnx", input_shape=[3, 64], output_shape=[3, 10]),
        "wrong-features": lambda: _onnx_file(tmp_path / "wide.onnx", input_shape=["batch", 65]),
        "wrong-output": lambda: _onnx_file(
            tmp_path / "out.onnx", input_shape=["batch", 64], output_shape=["batch", 64]
        ),
    }[case]()

    run = invoke("verify", checkpoint, onnx_path, "--samples", "4")

    text = _one_line_error(run, onnx_path, code=2 if case == "static-batch-3" else 3)  # --samples to fit: usage
    assert words in text


def test_onnx_artifact_that_never_returns_is_stopped(artifacts, tmp_path, invoke):
    looping = _onnx_file(tmp_path / "loop.onnx", input_shape=["batch", 64], loop_trips=10**15)
    started = time.monotonic()

    run = invoke("verify", artifacts.sources["digits_mlp"], looping, "--samples", "4", "--timeout", "0.5")

    elapsed = time.monotonic() - started
    text = _one_line_error(run, looping, code=3)
    assert "--timeout" in text and elapsed < 30, elapsed


def test_timeout_default_in_help_is_the_jobs_default(invoke):
    """The CLI repeats the default (its --help must not import torch); pin it to the library's."""
    from epcli.jobs.verify import DEFAULT_ONNX_TIMEOUT

    text = " ".join(invoke("verify", "--help").stdout.split())

    assert "--timeout SECONDS" in text and f"[default: {DEFAULT_ONNX_TIMEOUT}]" in text, text


def test_an_error_is_one_line_at_any_terminal_width(tmp_path, run_epcli):
    """CI logs and grep see the whole message: rich must not wrap it at the console's width."""
    missing = tmp_path / ("a-rather-long-directory-name-" * 3) / "checkpoint.safetensors"

    run = run_epcli("inspect", missing, env={"COLUMNS": "40"})

    assert run.returncode == 3
    assert run.stderr.count("\n") == 1 and str(missing) in run.stderr, repr(run.stderr)


def test_an_unwritable_output_directory_is_refused_before_any_work(samples, invoke, flat):
    """Permission bits say root may write in /proc; only creating a file there tells the truth."""
    run = invoke("collapse", samples.mlp, "-o", "/proc/epcli-out.safetensors")

    assert run.returncode == 4, run.describe()
    assert "cannot write in /proc" in flat(run.stderr) and "collapsing" not in run.stderr


@pytest.mark.parametrize("name", ["model.pt", "model.onnx"])
def test_export_safetensors_names_its_own_option_and_suffix(samples, invoke, flat, name):
    run = invoke("export", samples.mlp, "--safetensors", samples.dir / name)

    assert run.returncode == 2, run.describe()
    message = flat(run.stderr)
    assert "for --safetensors; use .safetensors (e.g." in message
    assert "--format" not in message and "for -o" not in message


# ---- the group's options ---------------------------------------------------------------------
def test_json_and_quiet_belong_to_the_group(samples, invoke, json_doc):
    """``--json`` / ``-q`` are the group's: before the command's name or after its arguments, the same outcome."""
    after = invoke("inspect", samples.mlp, "--json")
    before = invoke("--json", "inspect", samples.mlp)
    quiet = invoke("-q", "inspect", samples.mlp)

    for run in (after, before, quiet):
        assert run.returncode == 0, run.describe()
    assert json_doc(before.stdout) == json_doc(after.stdout)
    assert before.stderr == after.stderr  # the human report moved to stderr in both
    assert quiet.stdout == ""


def test_a_failure_with_the_groups_json_is_one_document(tmp_path, invoke, json_doc):
    run = invoke("--json", "collapse", tmp_path / "missing.pt")

    assert run.returncode == 3, run.describe()
    assert json_doc(run.stdout)["command"] == "collapse"
    assert json_doc(run.stdout)["error"]["type"] == "CheckpointError"

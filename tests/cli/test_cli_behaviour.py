"""CI-grade behaviour shared by every command: exit codes, messages, help, streams, colour.

Exit codes: 0 success, 1 verification failed, 2 usage or input error. Bad input never
shows a traceback (``EPCLI_DEBUG=1`` shows it) and its message names the file.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

import epcli

COMMANDS = ("collapse", "verify", "export", "inspect")
MISSING_MODULE = "epcli_cli_no_such_module_for_tests:build"


# ---- bad inputs ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> SimpleNamespace:
    """One file per kind of bad input (every kind the readers refuse), plus a good checkpoint and a collapsed one."""
    d = tmp_path_factory.mktemp("bad_inputs")
    repo_samples = Path(__file__).resolve().parents[2] / "sample_checkpoints"
    good = d / "digits_mlp.pt"
    good.write_bytes((repo_samples / "digits_mlp.pt").read_bytes())
    cnn_bytes = (repo_samples / "digits_cnn.safetensors").read_bytes()
    files = {"missing": d / "missing.pt", "directory": d / "adir.safetensors", "empty": d / "empty.pt"}
    files["directory"].mkdir()
    files["empty"].write_bytes(b"")
    noise = (
        torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8).numpy().tobytes()
    )
    files["random-pt"] = d / "random.pt"
    files["random-pt"].write_bytes(noise)
    files["random-safetensors"] = d / "random.safetensors"
    files["random-safetensors"].write_bytes(noise)
    files["truncated-pt"] = d / "truncated.pt"
    files["truncated-pt"].write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    files["truncated-safetensors"] = d / "truncated.safetensors"
    files["truncated-safetensors"].write_bytes(cnn_bytes[: len(cnn_bytes) // 2])
    state = epcli.load_checkpoint(good).state_dict
    files["plain-state-dict-pt"] = d / "plain.pt"
    torch.save(state, files["plain-state-dict-pt"])
    files["plain-state-dict-safetensors"] = d / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(files["plain-state-dict-safetensors"]))
    files["unsupported-input-suffix"] = d / "digits_mlp.npz"
    files["unsupported-input-suffix"].write_bytes(good.read_bytes())
    files["collapsed-input"] = d / "already.collapsed.safetensors"
    epcli.save_collapsed_checkpoint(epcli.load_checkpoint(good), files["collapsed-input"])
    return SimpleNamespace(dir=d, good=good, files=files)


FILE_CASES = [
    "missing",
    "directory",
    "empty",
    "random-pt",
    "random-safetensors",
    "truncated-pt",
    "truncated-safetensors",
    "plain-state-dict-pt",
    "plain-state-dict-safetensors",
    "unsupported-input-suffix",
    "collapsed-input",
]
CASES = [*FILE_CASES, "unsupported-output-suffix", "missing-model-module"]
NOT_AN_ERROR = {("inspect", "collapsed-input"), ("export", "collapsed-input")}  # both accept collapsed files
NOT_APPLICABLE = {("verify", "unsupported-output-suffix"), ("inspect", "unsupported-output-suffix")}


def _bad_run(bad: SimpleNamespace, command: str, case: str) -> tuple[list, Path, list[Path]]:
    """(argv, the file the message must name, outputs that must not appear)."""
    checkpoint = bad.files.get(case, bad.good)
    named = checkpoint
    outputs = {
        "collapse": bad.dir / f"out-{command}-{case}.safetensors",
        "export": bad.dir / f"out-{command}-{case}.onnx",
    }
    if case == "unsupported-output-suffix":
        outputs = {"collapse": bad.dir / f"out-{case}.npz", "export": bad.dir / f"out-{case}.txt"}
        named = outputs[command]
    tail = {
        "collapse": ["-o", outputs["collapse"]],
        "export": ["--onnx", outputs["export"]],
        "verify": [],
        "inspect": [],
    }[command]
    extra = ["--model", MISSING_MODULE] if case == "missing-model-module" else []
    return [command, checkpoint, *tail, *extra], named, list(outputs.values())


USAGE_CASES = {"unsupported-output-suffix", ("verify", "collapsed-input")}
"""Not a bad file but a bad command line (exit 2): an output suffix no format has, and the artifact given first."""


def _assert_input_error(run, named: Path, outputs: list[Path], flat, *, code: int = 3) -> None:
    assert run.returncode == code, run.describe()
    assert "Traceback" not in run.stderr, run.describe()
    assert str(named) in flat(run.stderr), f"the message does not name {named}:\n{run.stderr}"
    assert run.stdout == "", "errors go to stderr"
    assert not any(p.exists() for p in outputs), "nothing is written on bad input"


# subprocess runs (the installed script), made together in parallel -----------------------------
# one case per kind of failure path (file system, codec, factory import) and one usage error: the exit code,
# the traceback-free stderr and the empty stdout are the process's; every other case runs in-process below
SUBPROCESS_CASES = ["missing", "truncated-safetensors", "missing-model-module"]
SUBPROCESS_USAGE = {"unknown-option": ["collapse", "{good}", "--no-such-option"]}


@pytest.fixture(scope="module")
def subprocess_runs(bad, run_epcli_many) -> dict[str, object]:
    planned: dict[str, tuple[list, dict | None]] = {}
    for case in SUBPROCESS_CASES:
        planned[f"collapse:{case}"] = (_bad_run(bad, "collapse", case)[0], None)
    for key, argv in SUBPROCESS_USAGE.items():
        planned[f"usage:{key}"] = ([bad.good if a == "{good}" else a for a in argv], None)
    planned["debug:1"] = (["verify", bad.files["missing"]], {"EPCLI_DEBUG": "1"})
    planned["help"] = (["--help"], None)
    planned["version"] = (["--version"], None)
    planned["report:inspect"] = (["inspect", bad.good], None)
    # stderr is a pipe (not a terminal) and NO_COLOR is unset: still no escape codes
    planned["report:json"] = (["verify", bad.good, "--samples", "4", "--json"], {"NO_COLOR": None})
    planned["json-usage"] = (["verify", bad.good, "--json", "--atol", "-1"], None)
    runs = run_epcli_many([argv for argv, _ in planned.values()], envs=[env for _, env in planned.values()])
    return dict(zip(planned, runs, strict=True))


@pytest.mark.parametrize("case", SUBPROCESS_CASES)
def test_subprocess_bad_input_exits_3_naming_the_file(case, bad, subprocess_runs, flat):
    _, named, outputs = _bad_run(bad, "collapse", case)

    run = subprocess_runs[f"collapse:{case}"]

    _assert_input_error(run, named, outputs, flat)
    if case == "missing-model-module":
        assert MISSING_MODULE.split(":")[0] in flat(run.stderr)


@pytest.mark.parametrize("key", list(SUBPROCESS_USAGE))
def test_subprocess_usage_error_exits_2(key, subprocess_runs):
    run = subprocess_runs[f"usage:{key}"]

    assert run.returncode == 2, run.describe()
    assert "Traceback" not in run.stderr and run.stdout == ""
    assert "Usage" in run.stderr or "usage" in run.stderr
    assert "unexpected" not in run.stderr and "Input should" not in run.stderr, "epcli's words, not pydantic's"


def test_subprocess_usage_error_with_json_is_one_document(subprocess_runs, json_doc):
    """Usage errors happen before the command body: ``--json`` still means one JSON document on stdout."""
    run = subprocess_runs["json-usage"]

    assert run.returncode == 2, run.describe()
    document = json_doc(run.stdout)
    assert document["passed"] is False and document["command"] == "verify"
    assert document["error"]["type"] == "UsageError" and "--atol" in document["error"]["message"]
    assert "Usage" in run.stderr and "--atol" in run.stderr


def test_epcli_debug_shows_the_traceback(bad, subprocess_runs, flat):
    run = subprocess_runs["debug:1"]

    assert "Traceback" in run.stderr, run.describe()
    assert str(bad.files["missing"]) in flat(run.stderr)
    assert run.returncode != 0


def test_epcli_debug_keeps_the_input_error_exit_code(subprocess_runs):
    """Exit 1 means "verification failed"; a missing file with the traceback on is still an input error.

    (Regression: the guard once re-raised under EPCLI_DEBUG=1, so Python exited 1.)
    """
    run = subprocess_runs["debug:1"]

    assert run.returncode == 3, run.describe()


@pytest.mark.parametrize("value", ["0", ""])
def test_epcli_debug_off_values(value, bad, invoke):
    run = invoke("verify", bad.files["missing"], env={"EPCLI_DEBUG": value})

    assert run.returncode == 3, run.describe()
    assert isinstance(run.exception, SystemExit), repr(run.exception)


def test_epcli_debug_in_process_shows_the_traceback(bad, invoke, flat):
    run = invoke("verify", bad.files["missing"], env={"EPCLI_DEBUG": "1"})

    assert "Traceback" in run.stderr and str(bad.files["missing"]) in flat(run.stderr), run.describe()
    assert run.returncode == 3, run.describe()


def test_subprocess_help(subprocess_runs):
    run = subprocess_runs["help"]

    assert run.returncode == 0, run.describe()
    for command in COMMANDS:
        assert re.search(rf"^\s+{command}\s", run.stdout, re.MULTILINE), run.stdout
    assert "Exit codes" in run.stdout and run.stderr == ""
    assert "\x1b" not in run.stdout


def test_version_prints_the_version(subprocess_runs):
    """``--version`` is advertised in ``epcli --help`` ("Print the epcli version and exit").

    BUG (at the time of writing): ``epcli --version`` exits 2 with "Missing command." because the
    eager flag is handled in the group callback, which Click does not run without a subcommand.
    """
    run = subprocess_runs["version"]

    assert run.returncode == 0, run.describe()
    assert run.stdout.strip() == epcli.__version__


def test_no_escape_codes_without_a_terminal(subprocess_runs):
    run = subprocess_runs["report:json"]

    assert run.returncode == 0, run.describe()
    assert "\x1b" not in run.stderr and "\x1b" not in run.stdout


def test_python_m_epcli_help(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("EPCLI_DEBUG", "FORCE_COLOR")} | {"NO_COLOR": "1"}

    done = subprocess.run(
        [sys.executable, "-m", "epcli", "--help"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120
    )

    assert done.returncode == 0, done.stderr
    assert (
        "collapse" in done.stdout and "verify" in done.stdout and "export" in done.stdout and "inspect" in done.stdout
    )


def test_help_does_not_import_torch(tmp_path):
    """``--help`` must be instant: torch, onnx, onnxruntime and matplotlib load inside command bodies only
    (``epcli/__init__.py`` must not import torch eagerly: the CLI package imports ``epcli``)."""
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from epcli.cli.app import app\n"
        "for args in (['--help'], ['collapse', '--help'], ['verify', '--help'], ['export', '--help'],\n"
        "             ['inspect', '--help']):\n"
        "    result = CliRunner().invoke(app, args)\n"
        "    assert result.exit_code == 0, (args, result.output)\n"
        "print(sorted(m for m in ('torch', 'onnx', 'onnxruntime', 'matplotlib') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)

    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", f"heavy modules imported by --help: {done.stdout.strip()}"


# in-process runs (CliRunner): every command x every bad input ------------------------------------
@pytest.mark.parametrize(
    "command, case",
    [(c, k) for c in COMMANDS for k in CASES if (c, k) not in NOT_AN_ERROR | NOT_APPLICABLE],
)
def test_bad_input_exits_3_naming_the_file(command, case, bad, invoke, flat):
    argv, named, outputs = _bad_run(bad, command, case)

    run = invoke(*argv)

    usage = case in USAGE_CASES or (command, case) in USAGE_CASES
    _assert_input_error(run, named, outputs, flat, code=2 if usage else 3)
    assert isinstance(run.exception, SystemExit), f"an exception escaped the command: {run.exception!r}"


@pytest.mark.parametrize(
    "argv",
    [
        ["verify", "{good}", "--bogus"],
        ["verify", "{good}", "--samples", "0"],
        ["verify", "{good}", "--batch-size", "0"],
        ["verify", "{good}", "--dtype", "float16"],
        ["verify", "{good}", "--atol", "-1"],
        ["verify", "{good}", "--atol", "inf"],
        ["verify", "{good}", "--seed", "x"],
        ["collapse", "{good}", "--format", "npz"],
        ["export", "{good}", "--onnx", "{dir}/x.onnx", "--opset", "3"],
        ["inspect"],
        ["verify", "{good}", "a", "b"],
    ],
    ids=lambda argv: " ".join(a for a in argv if not a.startswith("{")),
)
def test_usage_errors_exit_2(argv, bad, invoke):
    argv = [a.replace("{good}", str(bad.good)).replace("{dir}", str(bad.dir)) for a in argv]

    run = invoke(*argv)

    assert run.returncode == 2, run.describe()
    assert run.stdout == "" or argv == ["inspect"], "usage errors go to stderr"
    assert isinstance(run.exception, SystemExit), repr(run.exception)
    assert not (bad.dir / "x.onnx").exists()


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, invoke):
    run = invoke(command, "--help")

    assert run.returncode == 0, run.describe()
    assert "--json" in run.stdout and "--model" in run.stdout


# ---- streams ---------------------------------------------------------------------------------
def test_report_goes_to_stdout_messages_to_stderr(subprocess_runs):
    """``epcli inspect x | less`` shows the report: the human report is stdout's, stderr stays for messages."""
    run = subprocess_runs["report:inspect"]

    assert run.returncode == 0, run.describe()
    assert "EP layers" in run.stdout and "erank" in run.stdout, run.describe()
    assert run.stderr == "", run.describe()


def test_json_keeps_stdout_for_the_document_and_the_report_on_stderr(subprocess_runs, json_doc):
    run = subprocess_runs["report:json"]

    assert run.returncode == 0, run.describe()
    assert json_doc(run.stdout)["passed"] is True
    assert "comparisons passed" in run.stderr, "with --json the human report moves to stderr"


def test_quiet_prints_no_report_but_errors(bad, invoke, flat):
    quiet = invoke("verify", bad.good, "--samples", "4", "-q")
    failing = invoke("inspect", bad.files["missing"], "--quiet")

    assert quiet.returncode == 0 and quiet.stdout == "" and quiet.stderr == "", quiet.describe()
    assert failing.returncode == 3 and failing.stdout == "", failing.describe()
    assert str(bad.files["missing"]) in flat(failing.stderr)


# ---- colour on a terminal --------------------------------------------------------------------
_COLOUR_PARAMETER = re.compile(r"^(3[0-9]|4[0-9]|9[0-7]|10[0-7])$")


def _colour_codes(text: str) -> list[str]:
    """SGR sequences that set a colour (bold/italic/reset are styles, which NO_COLOR allows)."""
    found = []
    for params in re.findall(r"\x1b\[([0-9;]*)m", text):
        parts = params.split(";")
        if any(_COLOUR_PARAMETER.match(p) for p in parts):
            found.append(params)
    return found


@pytest.fixture(scope="module")
def terminal_runs(bad, run_on_terminal) -> dict[str, tuple[int, str]]:
    """``verify --json`` of the CNN with stderr on a pseudo-terminal, with and without NO_COLOR (made once)."""
    cnn = bad.dir / "digits_cnn.safetensors"
    if not cnn.exists():
        cnn.write_bytes(
            (Path(__file__).resolve().parents[2] / "sample_checkpoints" / "digits_cnn.safetensors").read_bytes()
        )
    argv = ["verify", cnn, "--samples", "32", "--json"]
    return {
        "styled": run_on_terminal(argv, {"NO_COLOR": None, "TERM": "xterm-256color"}),
        "no-color": run_on_terminal(argv, {"NO_COLOR": "1", "TERM": "xterm-256color"}),
    }


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs a pseudo-terminal")
def test_no_color_is_respected_on_a_terminal(terminal_runs):
    """NO_COLOR turns off every style (bold too), not only colour. The report goes to stdout, so ``--json``
    puts it on stderr, the terminal here."""
    (styled_code, styled), (returncode, stderr) = terminal_runs["styled"], terminal_runs["no-color"]

    assert styled_code == 0 and returncode == 0, stderr
    # sanity: without NO_COLOR the pseudo-terminal is seen as a terminal and styled ...
    assert _colour_codes(styled), f"no colour without NO_COLOR: is stderr seen as a terminal? {styled!r}"
    # ... and with it, no style sequence at all
    assert not re.search(r"\x1b\[[0-9;]*m", stderr), f"styles despite NO_COLOR: {stderr!r}"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs a pseudo-terminal")
def test_long_work_shows_progress_on_a_terminal(terminal_runs):
    """Progress bars on long work: on a terminal, never in pipes or CI logs.

    A rich progress display on a terminal hides the cursor when it starts and erases its line when it ends
    (cursor control sequences), which a plain table never emits, however short the work: a verify of 32
    samples shows it as well as a long one. (Regression: at first no command used ``render.progress``.)
    """
    returncode, stderr = terminal_runs["no-color"]

    assert returncode == 0, stderr
    controls = [c for c in ("\x1b[?25l", "\x1b[2K", "\x1b[1A", "\x1b[1G") if c in stderr]
    assert controls, f"no progress display on a terminal during a long verify: {stderr[:400]!r}"

"""What a CI job gates on without parsing text: the exit-code table, one JSON shape per command (checked against
the shipped JSON Schemas), JUnit XML, GitHub Actions annotations and step summary, and logs that read whole."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from collections import OrderedDict
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

import epcli
from epcli.cli.ci_reports import annotation

COMMANDS = ("collapse", "verify", "export", "inspect", "compress")


# ---- a small JSON Schema validator: the subset the shipped schemas use ----------------------------
_TYPES = {
    "object": dict, "array": list, "string": str, "boolean": bool, "null": type(None), "number": (int, float),
    "integer": int,
}


def _is(value: Any, kind: str) -> bool:
    if kind in ("number", "integer") and isinstance(value, bool):
        return False
    return isinstance(value, _TYPES[kind])


def schema_errors(value: Any, schema: dict[str, Any], where: str = "$") -> list[str]:
    """Every way ``value`` breaks ``schema`` (type, const, enum, required, properties, additionalProperties, items,
    oneOf, if/then)."""
    errors: list[str] = []
    kinds = schema.get("type")
    if kinds is not None and not any(_is(value, k) for k in ([kinds] if isinstance(kinds, str) else kinds)):
        return [f"{where}: {value!r} is not {kinds}"]
    if "const" in schema and value != schema["const"]:
        errors.append(f"{where}: {value!r} != {schema['const']!r}")
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{where}: {value!r} not in {schema['enum']}")
    if "oneOf" in schema:
        matching = [s for s in schema["oneOf"] if not schema_errors(value, s, where)]
        if len(matching) != 1:
            errors.append(f"{where}: matches {len(matching)} of oneOf")
    if isinstance(value, dict):
        errors += [f"{where}: missing {key!r}" for key in schema.get("required", ()) if key not in value]
        properties = schema.get("properties", {})
        for key, item in value.items():
            if key in properties:
                errors += schema_errors(item, properties[key], f"{where}.{key}")
            elif schema.get("additionalProperties", True) is False:
                errors.append(f"{where}: unexpected key {key!r}")
        if "if" in schema and not schema_errors(value, schema["if"], where):
            errors += schema_errors(value, schema["then"], where)
    if isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            errors += schema_errors(item, schema["items"], f"{where}[{index}]")
    return errors


def shipped_schema(command: str) -> dict[str, Any]:
    return json.loads(resources.files("epcli").joinpath(f"schemas/{command}.json").read_text())


def assert_valid(document: dict[str, Any], command: str) -> None:
    errors = schema_errors(document, shipped_schema(command))
    assert not errors, "\n".join(errors)


def test_the_validator_finds_what_is_wrong():
    schema = shipped_schema("verify")
    assert schema_errors({"schema_version": 1}, schema)
    bad = {"schema_version": 1, "command": "verify", "passed": "yes", "exit_code": 7, "error": None, "warnings": []}
    assert {e.split(":")[0] for e in schema_errors(bad, schema)} == {"$.passed", "$.exit_code"}


# ---- the exit-code table, row by row ------------------------------------------------------------------
@pytest.fixture
def gate(samples, tmp_path):
    """A collapsed output that exists, and a stale artifact (made from a retrained copy of the checkpoint)."""
    existing = tmp_path / "taken.safetensors"
    existing.write_bytes(b"keep")
    retrained = epcli.load_checkpoint(samples.mlp)
    with __import__("torch").no_grad():
        next(retrained.model.parameters()).mul_(1 + 1e-6)
    other = epcli.save_checkpoint(retrained.model, tmp_path / "retrained.safetensors", input_shape=(64,))
    artifact = tmp_path / "mlp.collapsed.safetensors"
    return samples, existing, other, artifact


ROWS = {
    # name: (argv builder, exit code, error type or None)
    "passed": (lambda s, e, o, a: ["verify", s.mlp, "--samples", "8"], 0, None),
    "out-of-tolerance": (lambda s, e, o, a: ["verify", s.mlp, "--samples", "8", "--atol", "0", "--rtol", "0"], 1,
                         "VerificationError"),
    "stale-artifact": (lambda s, e, o, a: ["verify", o, a, "--samples", "8"], 1, "VerificationError"),
    "another-models-artifact": (lambda s, e, o, a: ["verify", s.mlp, s.dir / "cnn.collapsed.safetensors", "--samples",
                                                    "8"], 1, "VerificationError"),
    "budget-not-met": (lambda s, e, o, a: ["compress", s.mlp, "--max-error", "0"], 1, "VerificationError"),
    "usage": (lambda s, e, o, a: ["verify", s.mlp, "--samples", "0"], 2, "UsageError"),
    "swapped-arguments": (lambda s, e, o, a: ["verify", s.dir / "m.onnx", s.mlp], 2, "UsageError"),
    "missing-input": (lambda s, e, o, a: ["verify", s.dir / "missing.pt"], 3, "CheckpointError"),
    "corrupt-input": (lambda s, e, o, a: ["inspect", s.dir / "corrupt.safetensors"], 3, "CheckpointError"),
    "missing-onnx": (lambda s, e, o, a: ["verify", s.mlp, s.dir / "missing.onnx"], 3, "CheckpointError"),
    "output-exists": (lambda s, e, o, a: ["collapse", s.mlp, "-o", e], 4, "OutputError"),
    "output-is-a-directory": (lambda s, e, o, a: ["export", s.mlp, "--onnx", s.dir], 4, "OutputError"),
    "output-not-writable": (lambda s, e, o, a: ["collapse", s.mlp, "-o", "/proc/epcli.safetensors"], 4, "OutputError"),
}


@pytest.mark.parametrize("row", ROWS)
def test_exit_code_table(row, gate, invoke, json_doc):
    samples, existing, other, artifact = gate
    (samples.dir / "corrupt.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    if row == "stale-artifact":
        assert invoke("collapse", samples.mlp, "-o", artifact).returncode == 0
    if row == "another-models-artifact":  # stale too: it records the CNN as its source
        assert invoke("collapse", samples.cnn, "-o", samples.dir / "cnn.collapsed.safetensors").returncode == 0
    build, code, error_type = ROWS[row]
    argv = build(samples, existing, other, artifact)

    run = invoke(*argv, "--json")

    assert run.returncode == code, run.describe()
    document = json_doc(run.stdout)
    assert document["exit_code"] == code and document["passed"] is (code == 0)
    assert (document["error"] or {}).get("type") == error_type, document["error"]
    assert_valid(document, argv[0])
    assert existing.read_bytes() == b"keep"


def test_exit_codes_in_real_processes(gate, run_epcli_many, tmp_path, invoke):
    """The codes the shell sees, for a few rows (the rest run in-process above). Exit 1 is another model's collapse,
    which is stale (it records the CNN as its source) and does not fit the MLP; the others are rows that fail before
    torch is imported (``-o`` an existing file is refused only once the checkpoint is open: in-process, as the
    table's ``output-exists`` row)."""
    samples, _, _, _ = gate
    another = samples.dir / "cnn.collapsed.safetensors"
    assert invoke("collapse", samples.cnn, "-o", another).returncode == 0
    runs = run_epcli_many(
        [
            ["verify", samples.mlp, another, "--samples", "8", "-q"],
            ["verify", samples.mlp, "--samples", "8", "--bogus"],
            ["collapse", tmp_path / "missing.pt"],
            ["export", samples.mlp, "--onnx", samples.dir],  # the table's output-is-a-directory row
        ]
    )
    assert [run.returncode for run in runs] == [1, 2, 3, 4], [run.describe() for run in runs]
    for run in runs[1:]:
        assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()[-1]) > 0


def test_the_table_is_documented_everywhere(invoke):
    """``--help``, the README, docs/cli.md and docs/ci.md all list the same codes."""
    root = Path(__file__).resolve().parents[2]
    help_text = " ".join(invoke("--help").stdout.split())
    for words in ("0 passed", "1 verification failed", "2 command-line usage", "3 an input", "4 an output", "130 / 143"):
        assert words in help_text, help_text
    for doc in ("README.md", "docs/cli.md", "docs/ci.md"):
        text = (root / doc).read_text()
        for code in ("| 0 |", "| 1 |", "| 2 |", "| 3 |", "| 4 |", "| 130 / 143 |"):
            assert code in text, f"{doc} lacks the row {code}"


# ---- one JSON shape for every command -----------------------------------------------------------------
@pytest.mark.parametrize("command", COMMANDS)
def test_every_commands_documents_match_its_schema(command, samples, invoke, json_doc):
    argv = {
        "collapse": ["collapse", samples.mlp, "-o", samples.dir / "c.safetensors"],
        "verify": ["verify", samples.mlp, "--samples", "8"],
        "export": ["export", samples.mlp, "--onnx", samples.dir / "m.onnx", "--safetensors", samples.dir / "m.safetensors",
                   "--samples", "8"],
        "inspect": ["inspect", samples.cnn],
        "compress": ["compress", samples.mlp, "-o", samples.dir / "small.safetensors", "--max-error", "0.5"],
    }[command]
    for run in (invoke(*argv, "--json"), invoke(command, samples.dir / "missing.pt", "--json"),
                invoke(command, samples.mlp, "--no-such-option", "--json")):
        document = json_doc(run.stdout)
        assert document["command"] == command and document["exit_code"] == run.returncode, run.describe()
        assert document["passed"] is (run.returncode == 0) and isinstance(document["warnings"], list)
        assert_valid(document, command)


def test_schemas_are_package_data():
    root = Path(__file__).resolve().parents[2]
    assert "schemas/*.json" in (root / "pyproject.toml").read_text()
    for command in COMMANDS:
        schema = shipped_schema(command)
        assert schema["properties"]["schema_version"] == {"const": 1}
        assert set(schema["required"]) == {"schema_version", "command", "passed", "exit_code", "error", "warnings"}


def test_schemas_declare_every_key_of_the_golden_documents(golden):
    """Each key the golden files hold (the keys the commands print) is declared by the command's schema, down to the
    items of its lists: a schema that declares only the envelope, or misses a key a command prints, fails here."""
    for command in COMMANDS:
        schema = shipped_schema(command)
        for path, keys in golden(f"{command}_keys.json").items():
            node = schema
            for step in re.findall(r"\.(\w+)(\[\])?", path):
                node = node["properties"][step[0]]
                node = node["items"] if step[1] else node
            missing = sorted(set(keys) - set(node.get("properties", {})))
            assert not missing, f"{command}.json does not declare {missing} at {path}"
            assert node.get("additionalProperties") is False or path != "$", f"{command}.json accepts any key at $"


# ---- --require-model-check ---------------------------------------------------------------------------
def test_require_model_check_fails_a_run_that_skipped_the_model(custom_model, invoke, json_doc):
    lenient = invoke("verify", custom_model.path, "--samples", "8", "--json")
    strict = invoke("verify", custom_model.path, "--samples", "8", "--json", "--require-model-check")
    covered = invoke("verify", custom_model.path, "--samples", "8", "--require-model-check", "--model",
                     custom_model.factory)

    assert lenient.returncode == 0 and json_doc(lenient.stdout)["model_check_skipped"], lenient.describe()
    assert strict.returncode == 1, strict.describe()
    document = json_doc(strict.stdout)
    assert document["passed"] is False and "--require-model-check" in document["error"]["message"]
    assert covered.returncode == 0, covered.describe()


# ---- JUnit XML ----------------------------------------------------------------------------------------
def _cases(path: Path) -> list[ET.Element]:
    root = ET.parse(path).getroot()
    assert root.tag == "testsuites"
    return [case for suite in root.iter("testsuite") for case in suite.iter("testcase")]


def test_junit_of_a_failed_verify_carries_the_numbers(samples, invoke):
    report = samples.dir / "reports" / "verify.xml"

    run = invoke("verify", samples.mlp, "--samples", "8", "--atol", "1e-7", "--rtol", "0", "--junit-xml", report)

    assert run.returncode == 1, run.describe()
    cases = _cases(report)
    assert [case.get("name") for case in cases] == ["0", "3", "<model>"]
    failures = [case.find("failure") for case in cases if case.find("failure") is not None]
    assert failures and all("atol 1e-07" in f.get("message") and "max |err|" in f.get("message") for f in failures)
    root = ET.parse(report).getroot()
    assert int(root.get("failures")) == len(failures) and int(root.get("tests")) == 3


def test_junit_of_collapse_and_export_passes_every_case(samples, invoke):
    collapse_xml, export_xml = samples.dir / "c.xml", samples.dir / "e.xml"

    collapsed = invoke("collapse", samples.mlp, "-o", samples.dir / "c.safetensors", "--junit-xml", collapse_xml)
    exported = invoke("export", samples.mlp, "--onnx", samples.dir / "m.onnx", "--samples", "8",
                      "--junit-xml", export_xml)

    assert collapsed.returncode == 0 and exported.returncode == 0, (collapsed.describe(), exported.describe())
    for path in (collapse_xml, export_xml):
        cases = _cases(path)
        assert len(cases) == 3 and not any(case.find("failure") is not None for case in cases)


def test_junit_of_an_error_is_one_errored_case(samples, invoke):
    report = samples.dir / "e.xml"

    run = invoke("verify", samples.dir / "missing.pt", "--junit-xml", report)

    assert run.returncode == 3
    (case,) = _cases(report)
    error = case.find("error")
    assert error is not None and error.get("type") == "CheckpointError" and "missing.pt" in error.get("message")


def test_junit_skips_a_model_that_was_not_compared(custom_model, invoke):
    report = custom_model.dir / "r.xml"

    assert invoke("verify", custom_model.path, "--samples", "8", "--junit-xml", report).returncode == 0

    skipped = [case for case in _cases(report) if case.find("skipped") is not None]
    assert [case.get("name") for case in skipped] == ["<model>"]


# ---- GitHub Actions -----------------------------------------------------------------------------------
def test_annotations_are_escaped_as_github_reads_them():
    line = annotation("error", "50% off\r\nnext", file="a,b:c.pt", title="epcli verify")
    assert line == "::error file=a%2Cb%3Ac.pt,title=epcli verify::50%25 off%0D%0Anext"


def test_github_actions_annotations_and_step_summary(samples, tmp_path, invoke):
    summary = tmp_path / "summary.md"
    summary.write_text("earlier step\n")
    env = {"GITHUB_ACTIONS": "true", "GITHUB_STEP_SUMMARY": str(summary)}

    failed = invoke("verify", samples.mlp, "--samples", "8", "--atol", "1e-7", "--rtol", "0", env=env)
    missing = invoke("verify", samples.dir / "missing.pt", env=env)

    assert failed.returncode == 1 and missing.returncode == 3
    errors = [line for line in failed.stderr.splitlines() if line.startswith("::error ")]
    assert errors and all(line.startswith(f"::error file={samples.mlp},title=epcli verify::") for line in errors)
    assert any("<model>" in line and "atol 1e-07" in line for line in errors)
    assert f"::error file={samples.dir / 'missing.pt'},title=epcli verify::" in missing.stderr
    text = summary.read_text()
    assert text.startswith("earlier step\n") and text.count("### epcli verify") == 2
    assert "| compared | candidate | max \\|err\\|" in text and "**failed** (exit code 1)" in text
    assert "| &lt;model&gt; |" in text and "<model>" not in text  # a bare <model> reads as an HTML tag, footer too
    assert "**failed** (exit code 3)" in text


# ---- logs that read well ------------------------------------------------------------------------------
def test_ci_logs_are_never_cut_or_wrapped(tmp_path, run_epcli):
    """Off a terminal (pipes, as in CI) long names are whole, the summary is one line, no line ends in spaces."""
    from torch import nn

    long_name = "bert_encoder_layer_11_attention_output_dense_projection_with_a_very_long_name"
    model = nn.Sequential(OrderedDict([(long_name, epcli.EPLinear(8, 8, depth=3)), ("act", nn.ReLU())]))
    checkpoint = epcli.save_checkpoint(model.eval(), tmp_path / "a_checkpoint_with_a_rather_long_file_name.safetensors",
                                       input_shape=(8,))

    run = run_epcli("verify", checkpoint, "--samples", "64", env={"COLUMNS": None, "FORCE_COLOR": "1"})

    assert run.returncode == 0, run.describe()
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line) for line in (run.stdout + run.stderr).splitlines()]
    assert any(long_name in line for line in lines), run.stdout
    assert not any("…" in line for line in lines)
    assert not [line for line in lines if line != line.rstrip()], "trailing spaces"
    assert any(re.search(r"all 2 comparisons passed \(.*64 samples, seed 0\)$", line) for line in lines), lines


# ---- conventions and hints ----------------------------------------------------------------------------
def test_short_help_and_version(invoke):
    assert invoke("-V").stdout.strip() == epcli.__version__
    assert invoke("verify", "-h").stdout.startswith("Usage: epcli verify [OPTIONS] CKPT [ARTIFACT]")


def test_onnx_is_pointed_to_export(samples, invoke, flat):
    by_format = invoke("collapse", samples.mlp, "--format", "onnx")
    by_suffix = invoke("collapse", samples.mlp, "-o", samples.dir / "m.onnx")

    assert by_format.returncode == 2 and "epcli export CKPT --onnx" in flat(by_format.stderr)
    assert by_suffix.returncode == 2 and "epcli export CKPT --onnx" in flat(by_suffix.stderr)


def test_verify_says_what_it_compared_and_names_the_file_a_directory_was_read_from(artifacts, tmp_path, invoke,
                                                                                  json_doc):
    source, onnx = artifacts.sources["digits_mlp"], artifacts.onnx["digits_mlp"]
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(artifacts.sources["digits_cnn"].read_bytes())
    (folder / "model_v2.safetensors").write_bytes(b"")

    compared = invoke("verify", source, onnx, "--samples", "8")
    from_folder = invoke("verify", folder, "--samples", "8", "--json")

    assert compared.returncode == 0 and f"expanded vs {onnx} in onnxruntime" in compared.stdout
    assert from_folder.returncode == 0, from_folder.describe()
    (warning,) = json_doc(from_folder.stdout)["warnings"]
    assert f"read {folder / 'model.safetensors'}" in warning and "model_v2.safetensors" in warning


def test_export_takes_verifys_device_dtype_and_timeout(samples, invoke):
    run = invoke("export", samples.mlp, "--onnx", samples.dir / "m.onnx", "--samples", "8", "--device", "cpu",
                 "--dtype", "float32", "--timeout", "30")
    float64 = invoke("export", samples.mlp, "--onnx", samples.dir / "n.onnx", "--dtype", "float64")

    assert run.returncode == 0, run.describe()
    assert float64.returncode == 2 and "float32" in float64.stderr


def test_titles_use_the_paths_as_given_where_base_names_collide(samples, tmp_path, invoke):
    artifact = tmp_path / "out" / "digits_mlp.pt"
    assert invoke("collapse", samples.mlp, "-o", artifact).returncode == 0

    run = invoke("verify", samples.mlp, artifact, "--samples", "8")

    assert run.returncode == 0, run.describe()
    assert run.stdout.splitlines()[0] == f"Verify {samples.mlp}: expanded vs {artifact}"


def test_progress_shows_no_count_before_the_total_is_known():
    from rich.progress import Progress

    from epcli.cli.render import _Count

    with Progress(disable=True) as bar:
        task = bar.add_task("", total=None)
        assert str(_Count().render(bar.tasks[0])) == ""
        bar.update(task, completed=2, total=5)
        assert str(_Count().render(bar.tasks[0])) == "2/5"

"""An interrupted command still gives ``--json`` readers one document: Ctrl-C exits 130, SIGTERM 143.

In-process (the job function is replaced by one that is interrupted); the real
SIGTERM of a running ``epcli collapse --json`` is in tests/storage/test_interrupted_writes.py.
"""

from __future__ import annotations

import pytest

from epcli.cli.terminate import Terminated

COMMANDS = {
    "collapse": ("epcli.jobs.collapse", "collapse_file"),
    "verify": ("epcli.jobs.verify", "verify_files"),
    "export": ("epcli.jobs.export", "export_file"),
    "inspect": ("epcli.jobs.inspect", "inspect_file"),
}


@pytest.mark.parametrize(
    ("command", "signal_error", "error_type", "code"),
    [
        ("collapse", KeyboardInterrupt, "Interrupted", 130),
        ("verify", Terminated, "Terminated", 143),
        ("export", KeyboardInterrupt, "Interrupted", 130),
        ("inspect", Terminated, "Terminated", 143),
    ],
)
def test_an_interrupt_is_one_json_document(
    command, signal_error, error_type, code, samples, invoke, json_doc, monkeypatch
):
    module, function = COMMANDS[command]

    def interrupted(*args, **kwargs):
        raise signal_error

    monkeypatch.setattr(f"{module}.{function}", interrupted)
    extra = ["--onnx", str(samples.mlp.with_suffix(".onnx"))] if command == "export" else []

    run = invoke(command, samples.mlp, *extra, "--json")

    assert run.returncode == code, run.describe()
    document = json_doc(run.stdout)
    assert document["command"] == command and document["passed"] is False
    assert document["error"]["type"] == error_type
    assert error_type.lower() in run.stderr


def test_without_json_an_interrupt_writes_nothing_to_stdout(samples, invoke, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("epcli.jobs.verify.verify_files", interrupted)

    run = invoke("verify", samples.mlp)

    assert run.returncode == 130 and run.stdout == "", run.describe()
    assert "interrupted" in run.stderr

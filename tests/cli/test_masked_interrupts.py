"""An interrupt that library code catches and re-raises as another error is still reported as an interrupt.

Seen for real: Ctrl-C while torch imports ``torch._dynamo`` surfaces as an ``AttributeError``
from torch's own error handling, which the ONNX exporter reports as an export failure.
"""

from __future__ import annotations

import signal

import pytest
import typer

from epcli.cli import guard
from epcli.cli.terminate import EXIT_TERMINATED
from epcli.errors import ExportError


def _masking_command(json_output: bool = False, quiet: bool = False) -> None:
    raise ExportError("torch.onnx.export failed: module 'torch._dynamo' has no attribute 'exc'")


@pytest.mark.parametrize(("signum", "code", "word"), [(signal.SIGINT, 130, "interrupted"),
                                                      (signal.SIGTERM, EXIT_TERMINATED, "terminated")])
def test_a_masked_signal_is_reported_as_what_it_was(monkeypatch, capsys, signum, code, word):
    monkeypatch.setattr(guard, "signal_received", lambda: signum)

    with pytest.raises(typer.Exit) as exited:
        guard.guarded(_masking_command)()

    assert exited.value.exit_code == code
    err = capsys.readouterr().err
    assert word in err and "torch.onnx" not in err


def test_without_a_signal_the_error_is_the_error(monkeypatch, capsys):
    monkeypatch.setattr(guard, "signal_received", lambda: None)

    with pytest.raises(typer.Exit) as exited:
        guard.guarded(_masking_command)()

    assert exited.value.exit_code == guard.EXIT_INPUT
    assert "torch.onnx.export failed" in capsys.readouterr().err

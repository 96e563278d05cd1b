"""``--model module:function`` runs user code that prints and exits: stdout stays one JSON document, exit codes stay
honest (real ``epcli`` subprocesses; the export's tracing in-process)."""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import pytest

_MODULE = textwrap.dedent(
    """
    import os
    import sys
    import torch
    from torch import nn
    from epcli import EPLinear

    print("imported: hello from the module")

    class GPTish(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = EPLinear(6, 6, depth=3, residual=True)
            self.head = nn.Linear(6, 2)
            print("number of parameters: 0.03M")
            os.write(1, b"written to file descriptor 1\\n")

        def forward(self, x):
            print("forward on", tuple(x.shape))
            return self.head(torch.relu(self.body(x)) + x), None

    def build():
        return GPTish()

    def leaves():
        sys.exit(0)
    """
)


@pytest.fixture
def chatty(tmp_path: Path) -> tuple[Path, dict[str, str | None]]:
    """A checkpoint of the chatty model, and the environment that finds its module."""
    import importlib
    import sys

    import epcli

    (tmp_path / "chatty_models.py").write_text(_MODULE)
    sys.path.insert(0, str(tmp_path))
    try:
        model = importlib.import_module("chatty_models").build()
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("chatty_models", None)
    path = epcli.save_checkpoint(model.eval(), tmp_path / "chatty.safetensors", input_shape=(6,))
    pythonpath = os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p)
    return path, {"PYTHONPATH": pythonpath}


def test_what_user_code_prints_goes_to_stderr_and_exit_is_an_error(chatty, run_epcli_many, invoke, json_doc, flat, capfd,
                                                                    monkeypatch):
    path, env = chatty
    printing, exiting = run_epcli_many(
        [
            ("verify", path, "--model", "chatty_models:build", "--samples", "8", "--json"),
            ("verify", path, "--model", "chatty_models:leaves", "--json"),
        ],
        envs=[env, env],
    )
    # the export also traces the forward for ONNX. It runs in-process: what it adds is that the tracing goes through
    # the door whose streams the real process above shows (and a cold export alone costs a process ~6 CPU-s); file
    # descriptor 1 is then this process's own, seen through capfd
    monkeypatch.syspath_prepend(str(path.parent))
    try:
        exporting = invoke("export", path, "--model", "chatty_models:build", "--onnx", path.with_suffix(".onnx"), "--json")
    finally:
        sys.modules.pop("chatty_models", None)
    descriptors = capfd.readouterr()

    for run in (printing, exporting):
        assert run.returncode == 0, run.describe()
        json_doc(run.stdout)  # exactly one document: nothing the model printed
        for text in ("imported: hello", "number of parameters: 0.03M", "forward on"):
            assert text in run.stderr, run.describe()
    assert "file descriptor 1" in printing.stderr, printing.describe()
    assert "file descriptor 1" in descriptors.err and "file descriptor 1" not in descriptors.out, descriptors
    document = json_doc(printing.stdout)
    assert document["passed"] and "<model>[0]" in [c["name"] for c in document["comparisons"]]

    assert exiting.returncode == 3, exiting.describe()
    error = json_doc(exiting.stdout)["error"]
    assert "model factory 'chatty_models:leaves' called sys.exit(0) while building the model" in error["message"]
    assert "called sys.exit(0)" in flat(exiting.stderr)

"""Every command opens its checkpoint (and its artifact) once and hands the opened file down.

For a checkpoint epcli did not write, opening calls the user's ``--model`` factory (and runs its forward to
learn each EP layer's input shape); the factory here appends a line to a counter file each time it is called.
For epcli's own files, the runs count how often a file's bytes are opened
(:func:`epcli.storage.source.open_source`). Every run is in-process: what is counted is the command's work, not
the process around it (exit codes and streams of real processes are tests/cli/test_cli_behaviour.py's).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

MODULE = '''
import os

import torch
from torch import nn

from epcli import EPLinear


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = EPLinear(6, 5, depth=3)
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        return self.head(torch.relu(self.a(x)))


def build():
    with open(os.environ["EPCLI_TEST_BUILDS"], "a") as counter:
        counter.write("build\\n")
    torch.manual_seed(0)
    return Net()
'''


@pytest.fixture(scope="module")
def foreign(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A plain ``torch.save(state_dict)`` of an EP model, and a factory module that counts its calls."""
    root = tmp_path_factory.mktemp("open_once")
    name = f"epcli_open_once_{abs(hash(str(root))) % 10**8}"
    (root / f"{name}.py").write_text(MODULE)
    namespace: dict[str, Any] = {}
    exec(compile(MODULE, name, "exec"), namespace)  # the same class, built here without touching a counter
    torch.manual_seed(1)
    torch.save(namespace["Net"]().state_dict(), root / "plain.pt")
    return SimpleNamespace(root=root, factory=f"{name}:build")


def _builds(counter: Path) -> int:
    return len(counter.read_text().splitlines()) if counter.exists() else 0


def test_each_command_calls_the_factory_once(
    foreign: SimpleNamespace, invoke: Callable[..., Any], monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
):
    """One build per command: opening needs the model once (its EP configs, and its forward for each layer's input
    shape), and that same model, filled with the file's tensors, is the one checked, exported or verified.

    ``export --onnx --safetensors`` needs two: the ONNX export collapses its model in place, and the safetensors
    output's whole-model check then needs the expanded model again (rather than two copies held at once).

    In-process: the factory module is imported once and stays in ``sys.modules``, but every command calls
    ``build`` itself, so each counter file still sees exactly that command's builds."""
    root = foreign.root
    source = ("--model", foreign.factory, "--input-shape", "6")
    monkeypatch.syspath_prepend(str(root))
    request.addfinalizer(lambda: sys.modules.pop(foreign.factory.split(":")[0], None))

    def env(label: str) -> dict[str, str | None]:
        return {"EPCLI_TEST_BUILDS": str(root / f"{label}.count")}

    first = {"collapse": ["collapse", root / "plain.pt", "-o", root / "collapsed.safetensors", *source]}
    after = {  # verify with an artifact needs the collapsed file
        "verify": ["verify", root / "plain.pt", *source],
        "verify-artifact": ["verify", root / "plain.pt", root / "collapsed.safetensors", *source],
        "export-safetensors": ["export", root / "plain.pt", "--safetensors", root / "exported.safetensors", *source],
        "export-onnx": ["export", root / "plain.pt", "--onnx", root / "exported.onnx", *source],
        "inspect": ["inspect", root / "plain.pt", *source],
        "export-both": [
            "export", root / "plain.pt", "--onnx", root / "both.onnx", "--safetensors", root / "both.safetensors",
            *source,
        ],
    }
    for commands in (first, after):
        for label, argv in commands.items():
            run = invoke(*argv, env=env(label))
            assert run.returncode == 0, run.describe()
    counts = {label: _builds(root / f"{label}.count") for label in (*first, *after)}
    assert counts == {**dict.fromkeys(counts, 1), "export-both": 2}


@pytest.fixture
def opens(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every path whose bytes a command opens (in-process, so the count is seen)."""
    import epcli.checkpoint.load as load
    from epcli.storage.source import open_source

    seen: list[Path] = []

    def counting(path: Path, **kwargs: Any) -> Any:
        seen.append(Path(path))
        return open_source(path, **kwargs)

    monkeypatch.setattr(load, "open_source", counting)
    return seen


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (["collapse", "{ckpt}", "-o", "{out}.safetensors"], ["{ckpt}"]),
        (["verify", "{ckpt}"], ["{ckpt}"]),
        (["verify", "{ckpt}", "{collapsed}"], ["{ckpt}", "{collapsed}"]),
        (["export", "{ckpt}", "--safetensors", "{out}.safetensors"], ["{ckpt}"]),
        (["export", "{ckpt}", "--onnx", "{out}.onnx"], ["{ckpt}"]),
        (["export", "{ckpt}", "--onnx", "{out}.onnx", "--safetensors", "{out}.safetensors"], ["{ckpt}"]),
        (["inspect", "{ckpt}"], ["{ckpt}"]),
    ],
    ids=["collapse", "verify", "verify-artifact", "export-safetensors", "export-onnx", "export-both", "inspect"],
)
def test_each_file_is_opened_once(
    command: list[str],
    expected: list[str],
    tmp_path: Path,
    samples: SimpleNamespace,
    invoke: Callable[..., Any],
    opens: list[Path],
):
    names = {"ckpt": samples.mlp, "out": tmp_path / "out", "collapsed": tmp_path / "collapsed.safetensors"}
    if "{collapsed}" in command:
        made = invoke("collapse", samples.mlp, "-o", names["collapsed"])
        assert made.returncode == 0, made.describe()
        opens.clear()
    run = invoke(*(part.format(**names) for part in command))
    assert run.returncode == 0, run.describe()
    assert opens == [Path(part.format(**names)) for part in expected]

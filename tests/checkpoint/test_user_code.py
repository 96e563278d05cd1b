"""User code runs through one door: what it writes to stdout lands on stderr, and its sys.exit is an error."""

from __future__ import annotations

import ctypes
import os
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from epcli import InputSpec, save_checkpoint
from epcli.checkpoint.factory import build_from_factory
from epcli.checkpoint.load import load_checkpoint
from epcli.checkpoint.user_code import run_forward, user_code
from epcli.errors import CheckpointError


def test_print_fd_writes_and_c_stdio_go_to_stderr(capfd: pytest.CaptureFixture[str]):
    with user_code("model factory 'zoo:gpt'", "building the model"):
        print("from print")
        os.write(1, b"from fd 1\n")
        ctypes.CDLL(None).printf(b"from C printf\n")  # buffered by libc until the door flushes it
    print("epcli's own output")
    sys.stdout.flush()
    out, err = capfd.readouterr()
    assert out == "epcli's own output\n"
    assert "from print" in err and "from fd 1" in err and "from C printf" in err


def test_sys_exit_becomes_an_error_naming_who_and_stdout_is_restored(capfd: pytest.CaptureFixture[str]):
    with pytest.raises(CheckpointError) as caught:
        with user_code("model factory 'zoo:gpt'", "building the model"):
            sys.exit(0)
    message = str(caught.value)
    assert "model factory 'zoo:gpt' called sys.exit(0) while building the model" in message
    assert isinstance(caught.value.__cause__, SystemExit)
    os.write(1, b"after\n")
    assert capfd.readouterr().out == "after\n"


def test_ctrl_c_stays_an_interrupt(capfd: pytest.CaptureFixture[str]):
    def forward(x: torch.Tensor) -> torch.Tensor:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_forward(forward, torch.zeros(1))
    os.write(1, b"after\n")
    assert capfd.readouterr().out == "after\n"


_MODULE = textwrap.dedent(
    """
    import sys
    import torch
    from torch import nn
    from epcli import EPLinear

    print("module imported")

    class Chatty(nn.Module):
        def __init__(self):
            super().__init__()
            print("number of parameters: 0.03M")
            self.body = EPLinear(4, 4, depth=2)

        def forward(self, x):
            print("forward called")
            return self.body(x)

    def build():
        return Chatty()

    def leaves():
        sys.exit(0)

    def leaves_in_forward():
        model = Chatty()
        model.forward = lambda x: sys.exit(3)
        return model
    """
)


@pytest.fixture
def chatty(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    name = f"epcli_chatty_{abs(hash(str(tmp_path))) % 10**8}"
    (tmp_path / f"{name}.py").write_text(_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def test_a_factory_that_exits_is_named(chatty: str):
    with pytest.raises(CheckpointError, match=rf"model factory '{chatty}:leaves' called sys.exit\(0\) while building"):
        build_from_factory(f"{chatty}:leaves")


def test_loading_with_a_chatty_factory_keeps_stdout_clean(chatty: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]):
    model = build_from_factory(f"{chatty}:build")
    path = save_checkpoint(model, tmp_path / "chatty.safetensors", input_shape=(4,))
    capfd.readouterr()
    loaded = load_checkpoint(path, model_factory=f"{chatty}:build")
    assert isinstance(loaded.model, nn.Module)
    out, err = capfd.readouterr()
    assert out == "" and "number of parameters" in err


def test_a_forward_that_exits_is_an_error_not_an_exit(chatty: str, tmp_path: Path):
    from safetensors.torch import save_file

    path = tmp_path / "plain.safetensors"  # a foreign file: opening it runs the forward to see each layer's input
    save_file(build_from_factory(f"{chatty}:build").state_dict(), path)
    with pytest.raises(CheckpointError, match=r"the model's forward called sys.exit\(3\) while recording"):
        load_checkpoint(path, model_factory=f"{chatty}:leaves_in_forward", inputs=[InputSpec((4,))])

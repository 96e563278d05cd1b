"""Under a torch older than 2.10 no ``.pt`` file is unpickled: its weights-only loader could run code.

The running torch is newer (pyproject requires it), so its version string is replaced for the test.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import epcli
from epcli import UnsafeCheckpointError

SAMPLES_DIR = Path(__file__).resolve().parents[2] / "sample_checkpoints"


@pytest.mark.parametrize("version", ["2.9.1+cpu", "2.6.0", "1.13.1"])
def test_pt_is_refused_under_an_old_torch(monkeypatch: pytest.MonkeyPatch, version: str):
    path = SAMPLES_DIR / "digits_mlp.pt"
    monkeypatch.setattr(torch, "__version__", version)
    monkeypatch.setattr(torch, "load", _must_not_be_called)
    with pytest.raises(UnsafeCheckpointError) as info:
        epcli.load_checkpoint(path)
    message = str(info.value)
    for phrase in (str(path), f"torch {version} is older than 2.10", "nothing was read", "torch>=2.10", ".safetensors"):
        assert phrase in message, f"{phrase!r} not in {message!r}"


@pytest.mark.parametrize("version", ["2.10.0", "2.10.0a0+git1234", "2.13.0+cpu", "3.0.0"])
def test_pt_loads_under_torch_2_10_and_later(monkeypatch: pytest.MonkeyPatch, version: str):
    monkeypatch.setattr(torch, "__version__", version)
    assert epcli.load_checkpoint(SAMPLES_DIR / "digits_mlp.pt").ep_layers


def test_safetensors_needs_no_unpickling_so_loads_under_an_old_torch(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(torch, "__version__", "2.9.1")
    assert epcli.load_checkpoint(SAMPLES_DIR / "digits_cnn.safetensors").ep_layers


def _must_not_be_called(*args: object, **kwargs: object) -> None:
    raise AssertionError("torch.load was called under a refused torch version")

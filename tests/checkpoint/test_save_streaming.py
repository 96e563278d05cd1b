"""``save_checkpoint`` writes the model's own tensors one at a time, and probes input shapes on the model itself."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from torch import nn

import epcli
from epcli import EPLinear


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        EPLinear(6, 8, depth=3, batch_norm=True, residual=True, residual_mode="learn"),
        nn.ReLU(),
        nn.BatchNorm1d(8),
        EPLinear(8, 4, depth=2, batch_norm=True, collapse_on_eval=False),
    )
    with torch.no_grad():
        for norm in model.modules():
            if isinstance(norm, nn.modules.batchnorm._BatchNorm):
                norm.running_mean.normal_(0.0, 0.5)
                norm.running_var.uniform_(0.5, 2.0)
    return model


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_the_shape_probe_changes_nothing_in_the_model(tmp_path: Path, suffix: str):
    """Training flags (mixed here), collapse settings, every parameter and buffer (batch-norm statistics and
    their batch counters) are as they were; the file holds exactly those tensors."""
    model = _model().train()
    model[2].eval()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    modes = [module.training for module in model.modules()]

    path = epcli.save_checkpoint(model, tmp_path / f"m{suffix}", input_shape=(6,))

    assert [module.training for module in model.modules()] == modes
    assert (model[0].collapse_on_eval, model[3].collapse_on_eval) == (True, False)
    after = model.state_dict()
    assert list(after) == list(before)
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    loaded = epcli.load_checkpoint(path)
    assert loaded.layer_input_shapes == {"0": (6,), "3": (8,)}
    for key, value in before.items():
        assert torch.equal(loaded.state_dict[key], value), key


def test_a_model_that_cannot_be_deep_copied_is_saved(tmp_path: Path):
    """No copy of the model is made (a lock cannot be deep-copied, so a copy would fail)."""
    model = _model().eval()
    model.lock = threading.Lock()

    path = epcli.save_checkpoint(model, tmp_path / "m.safetensors", input_shape=(6,))

    assert epcli.load_checkpoint(path).layer_input_shapes["3"] == (8,)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_tied_and_strided_tensors_are_written_as_their_own_values(tmp_path: Path, suffix: str):
    """Tensors are handed to the writer as they are: one storage under two keys (tied weights) and a
    transposed (non-contiguous) weight are each written as their own dense tensor, and read back equal."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 5), EPLinear(5, 5, depth=2), nn.Linear(5, 5)).eval()
    model[2].weight = model[0].weight  # tied
    with torch.no_grad():
        model[1].layer_dict["0"][0].weight = nn.Parameter(torch.randn(5, 5).T)  # strided
    state = model.state_dict()
    assert state["0.weight"].data_ptr() == state["2.weight"].data_ptr()
    assert not state["1.layer_dict.0.0.weight"].is_contiguous()

    loaded = epcli.load_checkpoint(epcli.save_checkpoint(model, tmp_path / f"m{suffix}", input_shape=(5,)))

    for key, value in state.items():
        assert torch.equal(loaded.state_dict[key], value), key
    x = torch.randn(3, 5)
    torch.testing.assert_close(loaded.model(x), model(x), rtol=1e-6, atol=1e-6)

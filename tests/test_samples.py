"""The shipped sample checkpoints: real models trained on scikit-learn's digits, collapsed without changing a class.

These tests read the files in ``sample_checkpoints/`` as shipped (not regenerated
ones). Logits of the collapsed model must match the expanded model's at the
float32 tolerance of ``tests/conftest.py``: rtol 1e-5 and atol 1e-5 x max |logit|
(observed: about 1e-5 absolute on logits up to ~37); predicted classes must be identical.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import epcli
from epcli.convert import expanded_eval

SAMPLES_DIR = Path(__file__).resolve().parent.parent / "sample_checkpoints"
RECORD: dict[str, Any] = json.loads((SAMPLES_DIR / "samples.json").read_text())
SAMPLES = {sample["file"]: sample for sample in RECORD["samples"]}
MIN_ACCURACY = 0.9


@pytest.fixture(scope="module")
def digits_test() -> tuple[Tensor, Tensor]:
    """The recorded test split of the 8x8 digits, scaled as recorded (x: float32 [N, 64] in [0, 1])."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    split = RECORD["split"]
    assert split["stratify"] is True and RECORD["preprocessing"].startswith("pixels / 16")
    data = load_digits()
    _, x_test, _, y_test = train_test_split(
        data.data, data.target, test_size=split["test_size"], random_state=split["random_state"], stratify=data.target
    )
    return torch.tensor(x_test / 16.0, dtype=torch.float32), torch.tensor(y_test)


def _expanded_logits(model: nn.Module, x: Tensor) -> Tensor:
    with expanded_eval(model), torch.no_grad():
        return model(x)


def test_the_record_covers_both_files_and_the_split():
    assert set(SAMPLES) == {"digits_mlp.pt", "digits_cnn.safetensors"}
    assert RECORD["split"]["random_state"] == RECORD["seed"] == 0


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_shipped_file_is_the_recorded_one_and_small(name: str):
    path = SAMPLES_DIR / name
    data = path.read_bytes()
    assert len(data) < 1_000_000
    assert hashlib.sha256(data).hexdigest() == SAMPLES[name]["sha256"]
    assert SAMPLES[name]["test_accuracy"] >= MIN_ACCURACY


def test_samples_use_batch_norm_identity_and_learnable_skips_and_stride():
    configs = [c for name in SAMPLES for c in epcli.load_checkpoint(SAMPLES_DIR / name).ep_layers.values()]
    assert any(c.batch_norm for c in configs)
    assert any(c.residual and c.residual_mode == "none" for c in configs)
    assert any(c.residual and c.residual_mode == "learn" for c in configs)
    assert any(isinstance(c, epcli.EPConv2dConfig) and c.stride > 1 for c in configs)
    assert {type(c) for c in configs} == {epcli.EPLinearConfig, epcli.EPConv2dConfig}


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_recorded_accuracy_and_collapse_keeps_every_prediction(name: str, digits_test, assert_scaled_close):
    x, y = digits_test
    checkpoint = epcli.load_checkpoint(SAMPLES_DIR / name)
    inputs = x.reshape(-1, *checkpoint.input_shape)  # [N, 64] -> [N, *input_shape]
    assert list(checkpoint.input_shape) == SAMPLES[name]["input_shape"]
    collapsed = epcli.collapse_model(checkpoint.model)

    expanded = _expanded_logits(checkpoint.model, inputs)
    with torch.no_grad():
        plain = collapsed(inputs)

    accuracy = float((expanded.argmax(1) == y).float().mean())
    assert accuracy == pytest.approx(SAMPLES[name]["test_accuracy"], abs=1e-6)
    assert accuracy >= MIN_ACCURACY
    assert torch.equal(plain.argmax(1), expanded.argmax(1))
    assert_scaled_close(plain, expanded)


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_collapsed_sample_files_predict_the_same_classes(name: str, tmp_path: Path, digits_test):
    x, _ = digits_test
    source = epcli.load_checkpoint(SAMPLES_DIR / name)
    collapsed = epcli.load_checkpoint(epcli.save_collapsed_checkpoint(source, tmp_path / f"collapsed-{name}"))
    assert not any(isinstance(m, epcli.EPLayer) for m in collapsed.model.modules())
    inputs = x.reshape(-1, *source.input_shape)
    with torch.no_grad():
        assert torch.equal(collapsed.model(inputs).argmax(1), _expanded_logits(source.model, inputs).argmax(1))


def test_the_script_reproduces_the_samples(tmp_path: Path):
    """About 10 s on 2 cores. Same torch version: byte-identical files; otherwise the same accuracy (+-2 %)."""
    result = subprocess.run(
        [sys.executable, str(SAMPLES_DIR / "make_samples.py"), "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    fresh = {s["file"]: s for s in json.loads((tmp_path / "samples.json").read_text())["samples"]}
    assert set(fresh) == set(SAMPLES)
    for name, sample in SAMPLES.items():
        if RECORD["torch_version"] == str(torch.__version__):
            assert fresh[name]["sha256"] == sample["sha256"], name
        else:
            assert fresh[name]["test_accuracy"] == pytest.approx(sample["test_accuracy"], abs=0.02), name

"""Default tolerances follow the model's stored precision: bfloat16 / float16 models verify and export.

A collapsed weight stored in bfloat16 is rounded once, so its outputs differ from
the expanded chain's by bfloat16's rounding, far above float32's 1e-4; the
defaults allow 8 epsilons of the stored dtype (``STORAGE_TOLERANCES``), and the
measured errors here must stay below that while exceeding the float32 default
(otherwise this test would not show that the looser default is needed).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from epcli import collapse_model, load_checkpoint, overparameterize, save_checkpoint
from epcli.jobs.collapse import collapse_file
from epcli.jobs.verify import verify_files
from epcli.verification.compare import DEFAULT_TOLERANCES, STORAGE_TOLERANCES, Tolerance, VerifySettings
from epcli.verification.model_check import verify_checkpoint


def test_model_dtype_loosens_only_the_defaults():
    bf16, fp32 = torch.zeros(1, dtype=torch.bfloat16), torch.zeros(1)
    assert VerifySettings().for_model([fp32]).tolerance == DEFAULT_TOLERANCES["float32"]
    assert VerifySettings().for_model([fp32, bf16]).tolerance == STORAGE_TOLERANCES["bfloat16"]
    assert VerifySettings(dtype="float64").for_model([torch.zeros(1, dtype=torch.float16)]).tolerance == (
        STORAGE_TOLERANCES["float16"]
    )
    assert VerifySettings(atol=1e-3).for_model([bf16]).tolerance == Tolerance(1e-3, STORAGE_TOLERANCES["bfloat16"].rtol)
    for name, tolerance in STORAGE_TOLERANCES.items():  # 8 epsilons of the dtype
        assert tolerance.atol == tolerance.rtol == 8 * torch.finfo(getattr(torch, name)).eps


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_checkpoint_verifies_at_default_tolerances(dtype: str, tmp_path: Path):
    torch.manual_seed(0)
    plain = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 32), nn.ReLU(), nn.Linear(32, 10)
    )
    model = overparameterize(plain, depth=3, batch_norm=True, residual=True, residual_mode="learn")
    with torch.no_grad():
        model(torch.randn(16, 3, 6, 6))  # running statistics
    source = save_checkpoint(model.to(getattr(torch, dtype)).eval(), tmp_path / "m.safetensors", input_shape=(3, 6, 6))
    collapsed = collapse_file(source, tmp_path / "m.collapsed.safetensors").output
    settings = VerifySettings(samples=16, batch_size=16)

    for artifact in (None, collapsed):
        report = verify_files(source, artifact, settings).report
        assert report.passed, [(c.name, c.max_abs_error) for c in report.failures]
        assert report.tolerance == STORAGE_TOLERANCES[dtype]
    stored = verify_files(source, collapsed, replace(settings, model_dtype="float32")).report
    assert not stored.passed  # the stored rounding is real: float32's default would fail it
    # what `export --onnx` validates: the float32 ONNX graph of the model collapsed in its own dtype, against the
    # expanded model (the graph's numbers are those of this float32 torch model; exporting costs ~4 s, so not here)
    checkpoint = load_checkpoint(source)
    assert checkpoint.model is not None
    deployed = collapse_model(checkpoint.model).float()
    report = verify_checkpoint(checkpoint, settings, onnx_session=deployed)  # type: ignore[arg-type]
    assert report.passed and report.tolerance == STORAGE_TOLERANCES[dtype]
    assert report.comparisons[-1].max_abs_error > DEFAULT_TOLERANCES["float32"].atol

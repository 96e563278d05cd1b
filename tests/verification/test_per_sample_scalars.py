"""Models that take one number per sample (a diffusion timestep of shape ``[batch]``) are verified like any other."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from epcli import InputSpec, overparameterize, save_checkpoint
from epcli.checkpoint.inputs import random_inputs
from epcli.checkpoint.load import open_checkpoint
from epcli.jobs.export import export_file
from epcli.jobs.verify import verify_files
from epcli.verification.compare import VerifySettings

INPUTS = [InputSpec((4, 8, 8)), InputSpec((), torch.int64, 0, 1000), InputSpec((5, 32))]
SETTINGS = VerifySettings(samples=4, batch_size=2)


def test_random_scalar_inputs_are_one_number_per_sample():
    sample, timestep, _ = next(random_inputs(INPUTS, 6, 6, 0, dtype=torch.float32))
    assert sample.shape == (6, 4, 8, 8) and timestep.shape == (6,) and timestep.dtype == torch.int64
    assert 0 <= int(timestep.min()) and int(timestep.max()) < 1000


def _unet() -> nn.Module:
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )
    return overparameterize(unet, depth=2, include=["conv_in", "time_embedding.*", "down_blocks.0.*"])


@pytest.fixture
def unet_checkpoint(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = save_checkpoint(_unet().eval(), tmp_path / "unet.safetensors", inputs=INPUTS)
    assert open_checkpoint(path).inputs == tuple(INPUTS)  # the scalar spec survives the file's metadata
    return path


@pytest.mark.slow
def test_a_diffusers_unet_with_a_timestep_verifies(unet_checkpoint: Path):
    report = verify_files(unet_checkpoint, None, SETTINGS, model_factory=_unet).report
    assert report.passed, report
    assert report.model_check_skipped is None
    assert [c.name for c in report.comparisons if c.scope == "model"] == ["<model>.sample"]
    assert len([c for c in report.comparisons if c.scope == "layer"]) >= 5


@pytest.mark.slow
def test_a_diffusers_unet_with_a_timestep_exports_to_onnx_and_verifies(unet_checkpoint: Path, tmp_path: Path):
    onnx_path = tmp_path / "unet.onnx"
    exported = export_file(unet_checkpoint, onnx_path=onnx_path, safetensors_path=None, settings=SETTINGS,
                           model_factory=_unet)
    assert exported.passed, exported
    report = verify_files(unet_checkpoint, onnx_path, SETTINGS, model_factory=_unet).report
    assert report.passed and [c.name for c in report.comparisons if c.scope == "model"] == ["<model>.sample"]

"""--device: CPU by default, CUDA only when asked for and present, a clear error otherwise."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

import epcli
from epcli.cli.app import app
from epcli.devices import resolve_device
from epcli.errors import UsageError
from epcli.verification.compare import VerifySettings

NO_CUDA = not torch.cuda.is_available()


def test_cpu_is_the_cpu() -> None:
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("name", ["tpu", "gpu", "", "cpu0"])
def test_unknown_devices_are_refused_by_name(name: str) -> None:
    with pytest.raises(UsageError, match="unknown device"):
        resolve_device(name)


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
@pytest.mark.parametrize("name", ["cuda", "cuda:0"])
def test_cuda_without_a_gpu_says_so_and_how_to_fix_it(name: str) -> None:
    with pytest.raises(UsageError, match=r"CUDA is not available.*--device cpu"):
        resolve_device(name)
    with pytest.raises(UsageError):
        VerifySettings(device=name)


@pytest.mark.skipif(NO_CUDA, reason="needs a CUDA device")
def test_cuda_collapse_matches_the_cpu_collapse() -> None:
    layer = epcli.EPLinear(6, 6, depth=4, batch_norm=True, residual=True).double().eval()
    state = {f"0.{key}": value for key, value in layer.state_dict().items()}
    configs = {"0": layer.config}
    on_cpu = epcli.collapse_state_dict(state, configs)
    on_gpu = epcli.collapse_state_dict(state, configs, device="cuda")
    assert on_gpu["0.weight"].device.type == "cpu"
    torch.testing.assert_close(on_gpu["0.weight"], on_cpu["0.weight"], rtol=1e-12, atol=1e-12)


def test_explicit_cpu_collapse_equals_the_default() -> None:
    layer = epcli.EPConv2d(2, 3, [3, 1, 3], 2, stride=2, batch_norm=True, residual=True, residual_mode="learn")
    state = {f"c.{key}": value for key, value in layer.state_dict().items()}
    default = epcli.collapse_state_dict(state, {"c": layer.config})
    explicit = epcli.collapse_state_dict(state, {"c": layer.config}, device="cpu")
    assert default.keys() == explicit.keys()
    for key in default:
        assert torch.equal(default[key], explicit[key])


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
@pytest.mark.parametrize("command", ["collapse", "verify"])
def test_cli_device_cuda_without_a_gpu_exits_2(command: str, tmp_path) -> None:
    model = torch.nn.Sequential(epcli.EPLinear(4, 4, depth=2))
    path = epcli.save_checkpoint(model, tmp_path / "m.safetensors", input_shape=(4,))
    result = CliRunner().invoke(app, [command, str(path), "--device", "cuda"])
    assert result.exit_code == 2
    assert "CUDA is not available" in result.stderr
    assert not (tmp_path / "m.collapsed.safetensors").exists()

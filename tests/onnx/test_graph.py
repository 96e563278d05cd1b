"""Direct ONNX emission of plain module trees: each module family, run in onnxruntime against torch.

The reference is the torch forward of the same float32 module (independent of the emitter);
outputs must agree within 1e-5 of the output's scale. Models are small and seeded.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
import torch
from torch import Tensor, nn

from epcli.onnx.export import export_onnx_bytes, onnx_op_types
from epcli.onnx.graph import emit_onnx


def _randomised(model: nn.Module) -> nn.Module:
    """Non-trivial batch-norm statistics (fresh ones are the identity and would hide a mistake)."""
    with torch.no_grad():
        for norm in model.modules():
            if isinstance(norm, nn.modules.batchnorm._BatchNorm) and norm.running_var is not None:
                norm.running_mean.normal_(0.0, 0.5)
                norm.running_var.uniform_(0.5, 2.0)
                if norm.affine:
                    norm.weight.uniform_(0.5, 1.5)
                    norm.bias.normal_(0.0, 0.5)
    return model.eval()


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "mlp": (lambda: nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 4, bias=False),
                                  nn.Softmax(dim=1)), (6,)),
    "tokens": (lambda: nn.Sequential(nn.Linear(6, 5), nn.GELU(), nn.Linear(5, 3), nn.LogSoftmax(dim=-1)), (4, 6)),
    "conv2d": (lambda: nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, stride=2), nn.BatchNorm2d(8), nn.SiLU(),
        nn.Conv2d(8, 8, 3, groups=4, dilation=2, padding="same"), nn.MaxPool2d(2, ceil_mode=True),
        nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False), nn.AdaptiveAvgPool2d((2, 1)),
        nn.Flatten(), nn.Linear(16, 3)), (3, 13, 12)),
    "conv1d": (lambda: nn.Sequential(
        nn.Conv1d(2, 4, 5, padding=2), nn.BatchNorm1d(4), nn.LeakyReLU(0.1), nn.MaxPool1d(2),
        nn.Conv1d(4, 4, 3, dilation=2, padding="valid", bias=False), nn.ELU(0.7), nn.AdaptiveAvgPool1d(1),
        nn.Flatten(), nn.Linear(4, 2)), (2, 16)),
    "conv3d": (lambda: nn.Sequential(
        nn.Conv3d(1, 2, (3, 1, 3), stride=(1, 2, 1), padding=(1, 0, 1)), nn.BatchNorm3d(2, affine=False),
        nn.Tanh(), nn.AvgPool3d(2), nn.Flatten(1), nn.Unflatten(1, (2, 16)), nn.Sigmoid(),
        nn.Softmax(dim=None)), (1, 4, 8, 8)),
    "gelu_tanh": (lambda: nn.Sequential(nn.Linear(5, 5), nn.GELU(approximate="tanh")), (5,)),
    "nested": (lambda: nn.Sequential(nn.Sequential(nn.Linear(3, 3), nn.ReLU()), nn.Sequential(nn.Identity())), (3,)),
    "identity": (lambda: nn.Sequential(nn.Identity(), nn.Dropout()), (3,)),
    "root_linear": (lambda: nn.Linear(4, 2), (4,)),
}


def _run(data: bytes, x: Tensor) -> Tensor:
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"input": x.numpy()})[0])


@pytest.mark.filterwarnings("ignore:Implicit dimension choice")  # Softmax(dim=None) is covered on purpose
@pytest.mark.parametrize("dynamic", [True, False], ids=["dynamic", "static"])
@pytest.mark.parametrize("opset", [13, 18, 20])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_emitted_graph_computes_the_module(name: str, opset: int, dynamic: bool):
    torch.manual_seed(sum(map(ord, name)) + opset)
    build, shape = MODELS[name]
    model = _randomised(build())
    proto = emit_onnx(model, shape, opset=opset, dynamic_batch=dynamic)
    assert proto is not None, f"{name} should be emitted directly"
    onnx.checker.check_model(proto, full_check=True)
    batch = 3 if dynamic else 1  # 3: not the probe's batch of 2
    x = torch.randn(batch, *shape)
    with torch.no_grad():
        expected = model(x)
    actual = _run(proto.SerializeToString(), x)
    scale = float(expected.abs().max())
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * max(scale, 1.0))
    declared = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert declared == ["batch" if dynamic else 1, *shape]


def test_ops_are_one_per_module():
    torch.manual_seed(0)
    build, shape = MODELS["mlp"]
    data = export_onnx_bytes(_randomised(build()), shape)
    assert onnx_op_types(data) == ["Gemm", "Relu", "Gemm", "Softmax"]  # dropout is gone in eval mode


def test_gelu_is_one_op_from_opset_20():
    build, shape = MODELS["gelu_tanh"]
    proto = emit_onnx(build().eval(), shape, opset=20, dynamic_batch=True)
    assert proto is not None and [n.op_type for n in proto.graph.node] == ["Gemm", "Gelu"]


def test_emission_is_deterministic():
    torch.manual_seed(1)
    build, shape = MODELS["conv2d"]
    model = _randomised(build())
    assert export_onnx_bytes(model, shape) == export_onnx_bytes(model, shape)


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 3)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.linear(x)


class _SubclassedReLU(nn.ReLU):
    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) * 2


shared = nn.Linear(3, 3)
NOT_EMITTED: dict[str, tuple[nn.Module, tuple[int, ...], int]] = {
    "custom forward": (nn.Sequential(_Residual()), (3,), 18),
    "subclass of a known type": (nn.Sequential(_SubclassedReLU()), (3,), 18),
    "opset below 13": (nn.Sequential(nn.Linear(3, 3)), (3,), 12),
    "reflect padding": (nn.Sequential(nn.Conv2d(1, 1, 3, padding=1, padding_mode="reflect")), (1, 5, 5), 18),
    "batch statistics in eval": (nn.Sequential(nn.BatchNorm1d(3, track_running_stats=False)), (3,), 18),
    "uneven adaptive bins": (nn.Sequential(nn.AdaptiveAvgPool2d(3)), (1, 5, 5), 18),
    "divisor override": (nn.Sequential(nn.AvgPool2d(2, divisor_override=3)), (1, 4, 4), 18),
    "module used twice": (nn.Sequential(shared, nn.ReLU(), shared), (3,), 18),
}


@pytest.mark.parametrize("case", sorted(NOT_EMITTED))
def test_what_has_no_direct_form_is_left_to_the_tracer(case: str):
    model, shape, opset = NOT_EMITTED[case]
    assert emit_onnx(model.eval(), shape, opset=opset, dynamic_batch=True) is None


class _Branching(nn.Module):
    """A Python branch on a tensor's value: torch.export cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.linear(x)
        if h.sum() > 0:
            return h
        return -h


def test_an_untraceable_forward_is_one_line_naming_the_user_code():
    from epcli.errors import ExportError

    with pytest.raises(ExportError) as caught:
        export_onnx_bytes(_Branching().eval(), (3,))
    message = str(caught.value)
    assert "\n" not in message and "\x1b" not in message
    assert f"{Path(__file__).name}:" in message and "if h.sum() > 0" in message and "--safetensors" in message

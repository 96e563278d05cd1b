"""A zoo of realistic architectures, written here, taken through the whole life of an EP model.

Each model has a custom ``forward`` (so checkpoints need a factory) and is small
enough that the zoo runs in a few seconds. For each: ``overparameterize`` ->
train a few steps (the loss goes down) -> ``collapse_model`` equals the expanded
eval forward (float64: 1e-9 of the output's scale; float32: 1e-4, since deep
chains accumulate float32 rounding) -> ``save_checkpoint`` / ``load_checkpoint``
with a factory gives the same outputs.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from epcli import EPLayer, InputSpec, collapse_model, load_checkpoint, overparameterize, save_checkpoint
from epcli.convert import expanded_eval, plan_overparameterize
from epcli.verification.compare import VerifySettings
from epcli.verification.model_check import verify_checkpoint

TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4}
"""dtype -> rtol, and atol as a fraction of the largest |expected| output."""


# ---- the models ------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs with batch-norm, a strided 1x1 downsample when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else None
        )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.layer1 = BasicBlock(8, 8, 1)
        self.layer2 = BasicBlock(8, 16, 2)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer2(self.layer1(F.relu(self.bn1(self.conv1(x)))))
        return self.fc(x.mean(dim=(2, 3)))


class InvertedResidual(nn.Module):
    """MobileNetV2: 1x1 expand, 3x3 depthwise, 1x1 linear projection, identity skip."""

    def __init__(self, channels: int, expand: int) -> None:
        super().__init__()
        hidden = channels * expand
        self.expand = nn.Sequential(nn.Conv2d(channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6())
        self.depthwise = nn.Sequential(
            nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()
        )
        self.project = nn.Sequential(nn.Conv2d(hidden, channels, 1, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.project(self.depthwise(self.expand(x)))


class MobileNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.blocks = nn.Sequential(InvertedResidual(8, 4), InvertedResidual(8, 2))
        self.head = nn.Linear(8, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(F.relu6(self.stem(x))).mean(dim=(2, 3)))


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    n, c, h, w = x.shape
    # [n, c, h, w] -> [n, groups, c / groups, h, w] -> swap -> [n, c, h, w]
    return x.reshape(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleUnit(nn.Module):
    """ShuffleNet unit: grouped 1x1, channel shuffle, depthwise 3x3, grouped 1x1, identity skip."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.groups = groups
        self.reduce = nn.Conv2d(channels, channels, 1, groups=groups, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.depthwise = nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.expand = nn.Conv2d(channels, channels, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        out = channel_shuffle(F.relu(self.bn1(self.reduce(x))), self.groups)
        out = self.bn3(self.expand(self.bn2(self.depthwise(out))))
        return F.relu(x + out)


class ShuffleNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.units = nn.Sequential(ShuffleUnit(8, 2), ShuffleUnit(8, 4))
        self.fc = nn.Linear(8, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.units(F.relu(self.stem(x))).mean(dim=(2, 3)))


class AudioNet(nn.Module):
    """WaveNet-style 1-D stack: dilated convs (1, 2, 4) with gated activations and residuals."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Conv1d(2, 8, 1)
        self.filters = nn.ModuleList(nn.Conv1d(8, 8, 3, padding=d, dilation=d) for d in (1, 2, 4))
        self.gates = nn.ModuleList(nn.Conv1d(8, 8, 3, padding=d, dilation=d) for d in (1, 2, 4))
        self.out = nn.Conv1d(8, 4, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.inp(x)
        for conv_filter, gate in zip(self.filters, self.gates, strict=True):
            x = x + torch.tanh(conv_filter(x)) * torch.sigmoid(gate(x))
        return self.out(x).mean(dim=2)


class VideoNet(nn.Module):
    """A small 3-D conv net: a 3x3x3 conv, a (1, 3, 3) spatially strided conv, pooling, a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(2, 6, 3, padding=1)
        self.bn = nn.BatchNorm3d(6)
        self.conv2 = nn.Conv3d(6, 6, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))
        self.fc = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.conv2(F.relu(self.bn(self.conv1(x)))))
        return self.fc(x.mean(dim=(2, 3, 4)))


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention and an MLP, both with residuals."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        # [b, t, 3c] -> 3 x [b, heads, t, c / heads]
        q, k, v = (z.reshape(b, t, self.heads, c // self.heads).transpose(1, 2) for z in self.qkv(self.ln1(x)).split(c, 2))
        attention = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attention.transpose(1, 2).reshape(b, t, c))  # [b, heads, t, c / heads] -> [b, t, c]
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """GPT-2 style decoder with the output projection tied to the token embedding."""

    def __init__(self, vocab: int = 17, dim: int = 16, context: int = 8) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.wpe = nn.Embedding(context, dim)
        self.blocks = nn.Sequential(Block(dim, 2), Block(dim, 2))
        self.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, ids: Tensor) -> Tensor:
        x = self.wte(ids) + self.wpe(torch.arange(ids.shape[1], device=ids.device))
        return self.lm_head(self.ln_f(self.blocks(x)))


# ---- the cases -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    options: dict[str, Any] = field(default_factory=dict)
    ep_layers: int = 0  # how many modules overparameterize replaces
    integer_input: int = 0  # > 0: token ids below this (the GPT)

    def batch(self, size: int, dtype: torch.dtype = torch.float32) -> Tensor:
        if self.integer_input:
            return torch.randint(0, self.integer_input, (size, *self.input_shape))
        return torch.randn(size, *self.input_shape, dtype=dtype)

    def expand(self, model: nn.Module) -> nn.Module:
        return overparameterize(model, depth=3, **self.options)


CASES: dict[str, Case] = {
    # the stem and classifier stay plain, as people commonly keep them; their convs are bias-free, so the
    # collapse gains a bias (batch-norm's shift): the zoo rebuilds them from its own factory, which allows it
    "resnet": Case(ResNet, (3, 6, 6), dict(exclude=["conv1", "fc"], batch_norm=True, residual=True,
                                           residual_mode="learn", allow_new_bias=True), ep_layers=5),
    "mobilenet": Case(MobileNet, (3, 6, 6), dict(include=["blocks"], batch_norm=True, allow_new_bias=True), ep_layers=6),
    "shufflenet": Case(ShuffleNet, (3, 6, 6), dict(include=["units"], residual=True, residual_intervals=-1),
                       ep_layers=6),
    "audio": Case(AudioNet, (2, 32), dict(batch_norm=True), ep_layers=8),
    "video": Case(VideoNet, (2, 4, 6, 6), dict(batch_norm=True), ep_layers=3),
    "gpt": Case(GPT, (8,), dict(include=["blocks"], batch_norm=False), ep_layers=8, integer_input=17),
}


def _trained(case: Case) -> nn.Module:
    """The EP model after a few Adam steps on a fixed batch; the loss must go down."""
    torch.manual_seed(0)
    model = case.expand(case.build())
    x = case.batch(4)
    target = torch.randn_like(model(x))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(3):
        optimizer.zero_grad()
        loss = F.mse_loss(model(x), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    return model.eval()


def _assert_close(actual: Tensor, expected: Tensor) -> None:
    tolerance = TOLERANCE[expected.dtype]
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=tolerance, atol=tolerance * scale)


@pytest.fixture(scope="module", params=list(CASES))
def trained(request: pytest.FixtureRequest) -> tuple[Case, nn.Module]:
    case = CASES[request.param]
    return case, _trained(case)


def test_overparameterize_replaces_what_was_selected(trained: tuple[Case, nn.Module]):
    case, model = trained
    plan = plan_overparameterize(case.build(), depth=3, **case.options)
    layers = [m for m in model.modules() if isinstance(m, EPLayer)]
    assert len(plan.replaced) == len(layers) == case.ep_layers
    assert plan.params_after > plan.params_before


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_collapse_matches_the_expanded_eval_forward(trained: tuple[Case, nn.Module], dtype: torch.dtype):
    case, model = trained
    model = copy.deepcopy(model).to(dtype)
    x = case.batch(4, dtype)
    collapsed = collapse_model(model)
    assert not any(isinstance(m, EPLayer) for m in collapsed.modules())
    with torch.no_grad(), expanded_eval(model):
        expected = model(x)
    with torch.no_grad():
        _assert_close(collapsed(x), expected)
        _assert_close(model(x), expected)  # the eval forward runs the cached collapse


def test_save_and_load_round_trip_with_a_factory(trained: tuple[Case, nn.Module], tmp_path: Path):
    case, model = trained
    x = case.batch(4)
    with torch.no_grad():
        expected = model(x)
    if case.integer_input:  # token ids in [0, vocab): the probe and every check draw them from the spec
        spec = InputSpec(case.input_shape, torch.int64, 0, case.integer_input)
        path = save_checkpoint(model, tmp_path / "model.safetensors", inputs=[spec])
        assert model.lm_head.weight is model.wte.weight  # type: ignore[union-attr]  # still tied after training
    else:
        path = save_checkpoint(model, tmp_path / "model.safetensors", input_shape=case.input_shape)
    loaded = load_checkpoint(path, model_factory=lambda: case.expand(case.build()))
    assert loaded.model is not None and set(loaded.ep_layers) == {
        p for p, m in model.named_modules() if isinstance(m, EPLayer)
    }
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), expected, rtol=0, atol=0)
    report = verify_checkpoint(loaded, VerifySettings(samples=8, batch_size=4, dtype="float64"))
    assert report.passed and report.comparisons[-1].name == "<model>", report


def test_gpt_tied_head_is_kept_and_reported():
    plan = plan_overparameterize(GPT(), depth=3)
    kept = {c.path: c.reason for c in plan.kept}
    assert "lm_head" in kept and "shared with 'wte'" in (kept["lm_head"] or "")
    assert math.prod(GPT().lm_head.weight.shape) == 17 * 16

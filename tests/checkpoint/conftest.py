"""Fixtures for checkpoint tests: small models of every kind, and a way to rewrite a file's contents.

Helpers are fixtures (not imports) because ``tests`` is not a package.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from epcli import EPConv2d, EPLinear
from epcli.convert import expanded_eval

ModelMaker = Callable[[str, torch.dtype], tuple[nn.Module, tuple[int, ...]]]
Rewrite = Callable[..., None]
ExpandedForward = Callable[[nn.Module, Tensor], Tensor]


def _mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        EPLinear(12, 12, depth=4, batch_norm=True, residual=True),  # identity skips
        nn.ReLU(),
        nn.Dropout(0.2),
        EPLinear(12, 7, depth=3, width=1.5, bias=False, batch_norm=True, residual=True, residual_mode="learn"),
        nn.Sequential(nn.GELU(), nn.Linear(7, 5), nn.BatchNorm1d(5)),
        nn.LeakyReLU(0.1),
        EPLinear(5, 3, depth=1),
    )


def _cnn() -> nn.Module:
    return nn.Sequential(
        EPConv2d(2, 4, [3, 1, 3], padding=2, batch_norm=True, residual=True, residual_mode="learn"),
        nn.SiLU(),
        EPConv2d(4, 4, 3, depth=3, padding=1, stride=2, residual=True, residual_intervals=[1, 3]),  # identity
        nn.Sequential(nn.Conv2d(4, 6, 1), nn.BatchNorm2d(6), nn.Tanh()),
        nn.MaxPool2d(2, ceil_mode=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 3),
    )


def _single() -> nn.Module:
    """The model is one EP layer (its path is the empty string)."""
    return EPConv2d(3, 5, [2, 2], stride=2, batch_norm=True)  # even kernels, no skips


class Custom(nn.Module):
    """A custom forward: no architecture spec can describe it."""

    def __init__(self) -> None:
        super().__init__()
        self.body = EPLinear(6, 6, depth=3, residual=True, batch_norm=True)
        self.head = nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.relu(self.body(x)) + x)


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "mlp": (_mlp, (3, 4)),
    "cnn": (_cnn, (2, 9, 9)),
    "single": (_single, (3, 8, 8)),
    "custom": (Custom, (6,)),
}


@pytest.fixture
def make_model(randomise_batch_norm) -> ModelMaker:
    """``make_model(name, dtype)`` -> (model in eval mode with non-trivial batch-norms, per-sample input shape)."""

    def make(name: str, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, tuple[int, ...]]:
        build, shape = MODELS[name]
        model = build().to(dtype)
        randomise_batch_norm(model)
        return model.eval(), shape

    return make


@pytest.fixture
def expanded_forward() -> ExpandedForward:
    """Eval-mode output with every EP layer running its expanded chain: an independent reference for collapses."""

    def run(model: nn.Module, x: Tensor) -> Tensor:
        with expanded_eval(model), torch.no_grad():
            return model(x)

    return run


def _rewrite(
    path: Path,
    metadata: Callable[[dict[str, Any]], None] | None = None,
    state: Callable[[dict[str, Tensor]], None] | None = None,
) -> None:
    """Change a checkpoint in place: ``metadata(document)`` and ``state(tensors)`` mutate what they get."""
    if path.suffix == ".safetensors":
        with safe_open(str(path), "pt") as f:
            text = f.metadata()["epcli"]
        tensors = load_file(str(path))
    else:
        content = torch.load(path, weights_only=True)
        if "epcli_metadata" in content:
            text, tensors = content["epcli_metadata"], content["state_dict"]
        else:  # a collapsed .pt is a plain state dict carrying its metadata as an attribute
            text, tensors = content.epcli_metadata, dict(content)
    document = json.loads(text)
    if metadata is not None:
        metadata(document)
    if state is not None:
        state(tensors)
    text = json.dumps(document)
    if path.suffix == ".safetensors":
        save_file(tensors, str(path), metadata={"epcli": text})
    else:
        torch.save({"epcli_metadata": text, "state_dict": tensors}, path)


@pytest.fixture
def rewrite() -> Rewrite:
    return _rewrite

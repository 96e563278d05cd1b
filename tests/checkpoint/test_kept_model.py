"""The model an open builds (the user's factory's) is the one the first read fills: the factory runs once per open.

A later read builds it again (the first reader owns the filled model); ``drop_model`` frees it for a caller that
will not read the model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from epcli import EPLinear, InputSpec
from epcli.checkpoint.load import load_checkpoint, open_checkpoint, read_checkpoint, read_model


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = EPLinear(6, 5, depth=3)
        self.head = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.a(x)))


def _foreign(tmp_path: Path) -> tuple[Path, nn.Module, list[nn.Module]]:
    torch.manual_seed(0)
    saved = _Net().eval()
    torch.save(saved.state_dict(), tmp_path / "plain.pt")
    return tmp_path / "plain.pt", saved, []


def test_the_first_read_fills_the_model_the_open_built(tmp_path: Path):
    path, saved, built = _foreign(tmp_path)

    def factory() -> nn.Module:
        built.append(_Net())
        return built[-1]

    opened = open_checkpoint(path, model_factory=factory, inputs=[InputSpec((6,))])
    assert len(built) == 1
    model = read_model(opened)
    assert model is built[0] and len(built) == 1
    x = torch.randn(4, 6)
    torch.testing.assert_close(model(x), saved(x))

    again = read_checkpoint(opened)  # the first reader owns that model: a second one is built
    assert len(built) == 2 and again.model is built[1]
    torch.testing.assert_close(again.model(x), saved(x))


def test_a_dropped_model_is_built_again_when_read(tmp_path: Path):
    path, saved, built = _foreign(tmp_path)

    def factory() -> nn.Module:
        built.append(_Net())
        return built[-1]

    opened = open_checkpoint(path, model_factory=factory, inputs=[InputSpec((6,))])
    opened.drop_model()
    assert opened.take_model() is None
    model = read_model(opened)
    assert len(built) == 2 and model is built[1]


def test_load_checkpoint_calls_the_factory_once(tmp_path: Path):
    path, saved, built = _foreign(tmp_path)

    def factory() -> nn.Module:
        built.append(_Net())
        return built[-1]

    checkpoint = load_checkpoint(path, model_factory=factory, inputs=[InputSpec((6,))])
    assert len(built) == 1 and checkpoint.model is built[0]

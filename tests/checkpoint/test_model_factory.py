"""Models with a custom forward are built by a factory the user names (``module:function``), never by the file."""

from __future__ import annotations

import importlib
import textwrap
from pathlib import Path

import pytest
import torch

import epcli
from epcli import CheckpointError, UsageError
from epcli.checkpoint.load import open_checkpoint, read_model

_MODULE = textwrap.dedent(
    """
    import torch
    from torch import nn
    from epcli import EPLinear

    class Custom(nn.Module):
        def __init__(self, depth=3):
            super().__init__()
            self.body = EPLinear(6, 6, depth=depth, residual=True, batch_norm=True)
            self.head = nn.Linear(6, 2)

        def forward(self, x):
            return self.head(torch.relu(self.body(x)) + x)

    def build():
        return Custom()

    def build_other_depth():
        return Custom(depth=2)

    def build_plain():
        return nn.Sequential(nn.Linear(6, 6))

    def build_collapsed():
        model = Custom()
        model.body = nn.Linear(6, 6)
        return model

    def broken():
        raise RuntimeError("no GPU here")

    def not_a_model():
        return 42

    NOT_CALLABLE = 3

    class Namespace:
        @staticmethod
        def build():
            return Custom()
    """
)


@pytest.fixture
def factory_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A user module on sys.path; returns its name (unique per test, so imports never leak between tests)."""
    name = f"user_models_{abs(hash(str(tmp_path))) % 10**8}"
    (tmp_path / f"{name}.py").write_text(_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


@pytest.fixture
def custom_checkpoint(tmp_path: Path, factory_module: str, make_model) -> tuple[Path, torch.nn.Module]:
    model, shape = make_model("custom")
    return epcli.save_checkpoint(model, tmp_path / "custom.safetensors", input_shape=shape), model


def test_factory_rebuilds_a_custom_model(custom_checkpoint, factory_module: str):
    path, model = custom_checkpoint
    assert epcli.load_checkpoint(path).model is None

    checkpoint = epcli.load_checkpoint(path, model_factory=f"{factory_module}:build")

    assert checkpoint.model is not None and not checkpoint.model.training
    x = torch.randn(4, 6)
    with torch.no_grad():
        torch.testing.assert_close(checkpoint.model(x), model(x), rtol=0, atol=0)


def test_factory_attribute_path_and_callable(custom_checkpoint, factory_module: str):
    path, model = custom_checkpoint
    by_name = epcli.load_checkpoint(path, model_factory=f"{factory_module}:Namespace.build")
    by_callable = epcli.load_checkpoint(path, model_factory=type(model))
    x = torch.randn(2, 6)
    with torch.no_grad():
        torch.testing.assert_close(by_name.model(x), by_callable.model(x), rtol=0, atol=0)


def test_factory_for_a_collapsed_file_may_build_either_form(tmp_path: Path, custom_checkpoint, factory_module: str,
                                                           expanded_forward):
    path, model = custom_checkpoint
    collapsed_path = epcli.save_collapsed_checkpoint(epcli.load_checkpoint(path), tmp_path / "c.pt")
    x = torch.randn(4, 6)
    reference = expanded_forward(model, x)
    for factory in ("build", "build_collapsed"):  # the EP model (collapsed on load) or the plain one
        loaded = epcli.load_checkpoint(collapsed_path, model_factory=f"{factory_module}:{factory}")
        assert type(loaded.model.body) is torch.nn.Linear
        torch.testing.assert_close(loaded.model(x).detach(), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("factory", "phrases"),
    [
        ("no_colon", ["must be 'module:function'", "mypkg.models:build"]),
        ("a:b:c", ["must be 'module:function'"]),
        ("{module}:", ["must be 'module:function'"]),
        ("surely_not_a_module_xyz:build", ["cannot import module 'surely_not_a_module_xyz'", "ModuleNotFoundError"]),
        ("{module}:missing", ["has no attribute 'missing'"]),
        ("{module}:NOT_CALLABLE", ["'NOT_CALLABLE' is not callable (type int)"]),
        ("{module}:broken", ["raised RuntimeError: no GPU here"]),
        ("{module}:not_a_model", ["returned an object of type int, not a torch.nn.Module"]),
        ("{module}:build_plain", ["has EP layers at []", "metadata lists ['body']", "after epcli.overparameterize"]),
        ("{module}:build_other_depth", ["layer 'body' disagrees with the metadata", "'depth': (3, 2)"]),
    ],
)
def test_bad_factories(custom_checkpoint, factory_module: str, factory: str, phrases: list[str]):
    """A malformed spelling is a usage error (exit 2); a factory that cannot build the model, an input error."""
    path, _ = custom_checkpoint
    malformed = "must be 'module:function'" in phrases[0]
    with pytest.raises(UsageError if malformed else CheckpointError) as info:
        epcli.load_checkpoint(path, model_factory=factory.format(module=factory_module))
    message = str(info.value)
    assert str(path) in message
    for phrase in phrases:
        assert phrase in message, message


def test_factory_whose_model_does_not_fit_the_tensors_names_the_keys(tmp_path: Path, factory_module: str):
    from torch import nn

    path = epcli.save_checkpoint(nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2)), tmp_path / "p.pt",
                                 input_shape=(6,))
    with pytest.raises(CheckpointError) as info:
        epcli.load_checkpoint(path, model_factory=f"{factory_module}:build_plain")
    message = str(info.value)
    assert "does not match the file's tensors" in message and "unexpected keys ['2.weight', '2.bias']" in message


def test_a_file_never_names_code_to_import(tmp_path: Path, rewrite, factory_module: str, make_model):
    """Metadata cannot smuggle in a factory: an unknown module type is an error, nothing is imported."""
    model, shape = make_model("mlp")
    path = epcli.save_checkpoint(model, tmp_path / "m.pt", input_shape=shape)
    rewrite(path, metadata=lambda m: m["architecture"]["children"][2]["module"].update(type=f"{factory_module}:build"))
    import sys

    with pytest.raises(CheckpointError, match="unknown module type"):
        epcli.load_checkpoint(path)
    assert factory_module not in sys.modules


def test_the_file_is_read_into_the_factorys_own_tensors(custom_checkpoint, factory_module: str):
    """A factory's model holds its initial values; ``read_model`` copies the file's tensors into those very tensors
    (their storage kept), so the initial values are never held beside the file's: one copy of the model."""
    path, model = custom_checkpoint
    pointers: dict[str, int] = {}

    def build() -> torch.nn.Module:
        made = importlib.import_module(factory_module).build()
        pointers.update({key: tensor.data_ptr() for key, tensor in made.state_dict().items()})
        return made

    loaded = read_model(open_checkpoint(path, model_factory=build))

    assert loaded is not None
    state = loaded.state_dict()
    assert {key: tensor.data_ptr() for key, tensor in state.items()} == pointers
    for key, value in model.state_dict().items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0)


def test_a_weight_the_factory_ties_takes_each_of_the_files_tensors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A factory that ties two layers' weights, for a file that stores two different tensors under their names: each
    key gets its own tensor (the tie is not copied into twice, the last one winning)."""
    (tmp_path / "tied_models.py").write_text(textwrap.dedent(
        """
        from torch import nn
        from epcli import EPLinear

        def build():
            model = nn.Sequential(EPLinear(4, 4, depth=2), nn.Linear(4, 4), nn.Linear(4, 4))
            model[2].weight = model[1].weight
            return model
        """
    ))
    monkeypatch.syspath_prepend(str(tmp_path))
    untied = torch.nn.Sequential(epcli.EPLinear(4, 4, depth=2), torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    path = epcli.save_checkpoint(untied, tmp_path / "untied.safetensors", input_shape=(4,))

    loaded = read_model(open_checkpoint(path, model_factory="tied_models:build"))

    assert loaded is not None
    for key, value in untied.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)

"""Module tree <-> JSON spec: every supported type round-trips; anything else has no spec; bad specs name the node."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import epcli
from epcli import (
    CheckpointError,
    ConfigError,
    EPConv1d,
    EPConv2d,
    EPConv3d,
    EPLinear,
    InputSpec,
    LowRankConv1d,
    LowRankConv2d,
    LowRankConv3d,
    LowRankLinear,
)
from epcli.checkpoint.architecture import (
    SUPPORTED_TYPES,
    build_architecture,
    collapsed_architecture,
    describe_architecture,
    ep_nodes,
)
from epcli.checkpoint.forward import check_forward
from epcli.limits import MAX_NESTING


def _every_type() -> nn.Module:
    """One of each supported module type, wired so that a forward pass runs: input [N, 2, 8, 8]."""
    return nn.Sequential(
        EPConv2d(2, 4, [3, 1], padding=1, batch_norm=True, residual=True, residual_mode="learn", bn_eps=1e-3),
        nn.Conv2d(4, 4, 3, padding="same", dilation=1, groups=2, padding_mode="reflect", bias=False),
        LowRankConv2d(4, 1, 4, 3, padding=1, groups=2, padding_mode="reflect"),
        nn.BatchNorm2d(4, eps=1e-4, momentum=None),
        nn.ReLU(inplace=True),
        nn.Dropout2d(0.1),
        nn.MaxPool2d(2, stride=1, padding=1, dilation=1, ceil_mode=True),
        nn.AvgPool2d(2, stride=2, padding=1, ceil_mode=False, count_include_pad=False, divisor_override=3),
        nn.AdaptiveAvgPool2d((3, None)),
        nn.ELU(alpha=0.5),
        nn.Flatten(),
        nn.Sequential(
            nn.Linear(60, 8),  # 4 channels x 3 x 5
            LowRankLinear(8, 3, 8),
            nn.BatchNorm1d(8, affine=False),
            nn.LayerNorm(8, eps=1e-3),
            nn.LayerNorm([8], elementwise_affine=True, bias=False),
            nn.GELU(approximate="tanh"),
            EPLinear(8, 8, depth=3, residual=True, residual_intervals=[1, -1], batch_norm=True),
            nn.SiLU(),
            nn.Unflatten(1, (2, 4)),
            nn.Flatten(),
            nn.LeakyReLU(0.2),
            nn.Tanh(),
            nn.Sigmoid(),
            nn.Dropout(0.3),
            nn.Identity(),
        ),
        nn.Linear(8, 5, bias=False),
        nn.Softmax(dim=1),
        nn.LogSoftmax(dim=-1),
        nn.Unflatten(1, (1, 5)),  # [N, 1, 5]: the 1-D and 3-D families
        EPConv1d(1, 4, [(3,), 1], padding=1, groups=1, dilation=1, residual=True, residual_mode="learn"),
        nn.Conv1d(4, 4, 3, padding=2, dilation=2, groups=4, padding_mode="circular"),
        LowRankConv1d(4, 2, 4, 1, bias=False),
        nn.MaxPool1d(2, stride=1),
        nn.AvgPool1d(2, stride=1, padding=1, count_include_pad=False),
        nn.AdaptiveAvgPool1d(4),
        nn.Unflatten(2, (1, 2, 2)),  # [N, 4, 1, 2, 2]
        EPConv3d(4, 4, [(1, 3, 3), 1], padding=(0, 1, 1), groups=2, batch_norm=True),
        nn.Conv3d(4, 2, (1, 3, 1), padding=(0, 1, 0), padding_mode="replicate"),
        LowRankConv3d(2, 1, 2, (1, 3, 1), padding=(0, 1, 0)),
        nn.BatchNorm3d(2),
        nn.MaxPool3d(1),
        nn.AvgPool3d((1, 2, 1), stride=1, divisor_override=2),
        nn.AdaptiveAvgPool3d((1, None, 2)),
    )


def test_every_supported_type_passes_the_forward_check_and_a_wrong_shape_does_not():
    """The check runs an empty batch (no activations), which every supported module must accept."""
    model = build_architecture(describe_architecture(_every_type().eval()))
    check_forward(model, [InputSpec((2, 8, 8))], "the model")
    with pytest.raises(CheckpointError, match=r"the model fails on its own input_shape \[3, 8, 8\]: .*RuntimeError"):
        check_forward(model, [InputSpec((3, 8, 8))], "the model")


def test_every_supported_type_round_trips():
    model = _every_type().eval()
    spec = describe_architecture(model)
    assert spec is not None
    json.dumps(spec, allow_nan=False)  # plain JSON
    seen = {spec_type for spec_type in _types(spec)}
    assert seen == set(SUPPORTED_TYPES)

    rebuilt = build_architecture(spec)

    assert describe_architecture(rebuilt) == spec
    assert [type(m) for m in rebuilt.modules()] == [type(m) for m in model.modules()]
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    rebuilt.eval()
    x = torch.randn(3, 2, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x), rtol=0, atol=0)


def _types(node: dict[str, Any]) -> list[str]:
    found = [node["type"]]
    for child in node.get("children", []):
        found += _types(child["module"])
    return found


def test_named_children_keep_their_names():
    from collections import OrderedDict

    model = nn.Sequential(OrderedDict(stem=nn.Linear(3, 4), act=nn.ReLU(), head=EPLinear(4, 2)))
    rebuilt = build_architecture(describe_architecture(model))
    assert list(rebuilt.state_dict()) == list(model.state_dict())
    assert ep_nodes(describe_architecture(model)) == {"head": ("EPLinear", model.head.config.to_dict())}


def test_a_bare_layer_is_a_spec():
    assert describe_architecture(nn.Linear(3, 2)) == {
        "type": "Linear", "args": {"in_features": 3, "out_features": 2, "bias": True}
    }
    spec = describe_architecture(EPLinear(3, 2, depth=3))
    assert spec == {"type": "EPLinear", "config": EPLinear(3, 2, depth=3).config.to_dict()}
    assert ep_nodes(spec) == {"": ("EPLinear", spec["config"])}


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(3, 3)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.inner(x)


class _MySequential(nn.Sequential):
    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) * 2


class _MyLinear(nn.Linear):
    pass


def _with_extra_parameter() -> nn.Module:
    model = nn.Sequential(nn.Linear(3, 3))
    model.register_parameter("scale", nn.Parameter(torch.ones(3)))
    return model


@pytest.mark.parametrize(
    "model",
    [
        nn.Sequential(nn.Linear(3, 3), _Residual()),
        _MySequential(nn.Linear(3, 3)),
        nn.Sequential(_MyLinear(3, 3)),
        nn.ModuleList([nn.Linear(3, 3)]),
        nn.Sequential(nn.MaxPool2d(2, return_indices=True)),
        nn.Sequential(nn.GroupNorm(1, 3)),
        _with_extra_parameter(),
        nn.Sequential(EPLinear(3, 4, weight_layout="in_out")),  # collapses to transformers' Conv1D
    ],
    ids=["custom-forward", "sequential-subclass", "linear-subclass", "module-list", "return-indices", "group-norm",
         "extra-parameter", "collapses-to-conv1d"],
)
def test_unsupported_models_have_no_spec(model: nn.Module):
    assert describe_architecture(model) is None


def test_deep_nesting_has_no_spec():
    model: nn.Module = nn.Linear(2, 2)
    for _ in range(MAX_NESTING + 2):
        model = nn.Sequential(model)
    assert describe_architecture(model) is None


def _linear(**args: Any) -> dict[str, Any]:
    return {"type": "Linear", "args": {"in_features": 3, "out_features": 2, "bias": True, **args}}


def _seq(*children: Any, names: list[Any] | None = None) -> dict[str, Any]:
    names = names or [str(i) for i in range(len(children))]
    return {"type": "Sequential", "children": [{"name": n, "module": c} for n, c in zip(names, children, strict=True)]}


@pytest.mark.parametrize(
    ("spec", "phrase"),
    [
        (_seq(_linear(), {"type": "Teleport"}), "architecture node '1': unknown module type 'Teleport'; supported"),
        (_seq(_linear(in_features="ten")),
         "architecture node '0': in_features must be an int in [1, 1048576], got 'ten'"),
        (_seq(_linear(in_features=0)), "in_features must be an int in [1, 1048576], got 0"),
        (_seq(_linear(bias=1)), "bias must be true or false, got 1"),
        (_seq(_linear(colour="red")), "architecture node '0': unknown args ['colour']"),
        (_seq({"type": "Linear", "args": {"in_features": 3}}), "missing args ['out_features', 'bias']"),
        (_seq({"type": "Linear"}), "has keys ['type'], expected exactly ['args', 'type']"),
        (_seq({"type": "Conv2d", "args": {"in_channels": 3, "out_channels": 4, "kernel_size": [3], "stride": 1,
                                           "padding": 0, "dilation": 1, "groups": 1, "bias": True,
                                           "padding_mode": "zeros"}}),
         "kernel_size must be an int in [1, 256] or a list of two such ints"),
        (_seq({"type": "Conv2d", "args": {"in_channels": 3, "out_channels": 4, "kernel_size": 3, "stride": 1,
                                           "padding": 0, "dilation": 1, "groups": 2, "bias": True,
                                           "padding_mode": "zeros"}}),
         "architecture node '0': invalid arguments"),
        (_seq({"type": "Dropout", "args": {"p": 1.5, "inplace": False}}), "p must be a finite number in [0.0, 1.0]"),
        (_seq({"type": "GELU", "args": {"approximate": "fast"}}), "approximate must be one of ['none', 'tanh']"),
        (_seq(_linear(), _linear(), names=["a", "a"]), "child 1 repeats the name 'a'"),
        (_seq(_linear(), names=["a.b"]), "child 0 has an invalid name 'a.b'"),
        ({"type": "Sequential", "children": [_linear()]}, "child 0 must be an object with exactly 'name' and 'module'"),
        ({"type": "Sequential", "children": {}}, "'children' must be a list"),
        (_seq(_seq([1, 2])), "architecture node '0.0': must be an object, got list"),
        ("Sequential", "architecture node '<model>': must be an object, got str"),
    ],
)
def test_bad_specs_name_the_node(spec: Any, phrase: str):
    with pytest.raises(CheckpointError) as info:
        build_architecture(spec)
    assert phrase in str(info.value)


@pytest.mark.parametrize(("value", "phrase"), [("four", "depth must be an int >= 1, got 'four'"), (-3, "got -3")])
def test_bad_ep_config_in_a_spec_is_a_config_error_naming_the_node(value: Any, phrase: str):
    spec = _seq(_linear(), {"type": "EPLinear", "config": {**EPLinear(2, 2).config.to_dict(), "depth": value}})
    with pytest.raises(ConfigError) as info:
        build_architecture(spec)
    assert "architecture node '1'" in str(info.value) and phrase in str(info.value)


def test_hostile_nesting_is_refused():
    spec: dict[str, Any] = _linear()
    for _ in range(MAX_NESTING + 5):
        spec = _seq(spec)
    with pytest.raises(CheckpointError, match=f"nested deeper than {MAX_NESTING} levels"):
        build_architecture(spec)


def test_building_on_meta_allocates_nothing():
    spec = _seq(_linear(in_features=10**6, out_features=10**6))
    model = build_architecture(spec, device="meta")
    assert model[0].weight.is_meta and model[0].weight.shape == (10**6, 10**6)


def test_collapsed_architecture_replaces_ep_layers_by_their_plain_layers():
    model = nn.Sequential(
        EPLinear(4, 4, bias=False, batch_norm=True),  # batch-norm shift: the collapse has a bias
        EPLinear(4, 3, bias=False),  # no bias anywhere
        nn.Unflatten(1, (3, 1, 1)),
        EPConv2d(3, 2, [3, 1, 3], padding=2, stride=2),
    )
    spec = collapsed_architecture(describe_architecture(model))
    rebuilt = build_architecture(spec)
    assert [type(m) for m in rebuilt] == [nn.Linear, nn.Linear, nn.Unflatten, nn.Conv2d]
    assert rebuilt[0].bias is not None and rebuilt[1].bias is None
    conv = rebuilt[3]
    assert (conv.kernel_size, conv.stride, conv.padding) == ((5, 5), (2, 2), (2, 2))
    assert ep_nodes(spec) == {}


def test_a_file_whose_collapse_has_no_spec_collapses_layer_by_layer(tmp_path: Path):
    """A layer that collapses to transformers' Conv1D: no architecture is embedded, and the collapse from the
    file still writes every layer (in Conv1D's [in, out] layout) and says the whole model was not compared."""
    pytest.importorskip("transformers")
    from epcli.jobs.collapse import collapse_file

    model = nn.Sequential(EPLinear(3, 4, weight_layout="in_out", batch_norm=True)).eval()
    path = epcli.save_checkpoint(model, tmp_path / "m.safetensors", input_shape=(3,))
    assert epcli.open_checkpoint(path).architecture is None
    result = collapse_file(path, tmp_path / "c.safetensors")
    assert result.model_check_skipped
    state = epcli.open_checkpoint(tmp_path / "c.safetensors").read(["0.weight"])
    assert state["0.weight"].shape == (3, 4)

"""collapse_model / collapse_state_dict / collapse_layer / overparameterize: structure and numbers.

Numbers are compared with the EP layers' *expanded* forward (an independent
reference), at a tolerance per dtype relative to the output's magnitude:
float64 1e-10, float32 1e-5.
"""

from __future__ import annotations

import itertools
import re
from collections import OrderedDict
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from epcli import (
    CheckpointError,
    ConfigError,
    EPConv2d,
    EPLayer,
    EPLinear,
    ShapeMismatchError,
    collapse_layer,
    collapse_model,
    collapse_state_dict,
    load_checkpoint,
    overparameterize,
    save_checkpoint,
)
from epcli.convert import expanded_eval, plain_model, plan_overparameterize, unwrap_model

DTYPES = [torch.float32, torch.float64]


def _expanded(model: nn.Module, x: Tensor) -> Tensor:
    """Eval-mode output with every EP layer running its expanded chain."""
    with expanded_eval(model), torch.no_grad():
        return model(x)


def _snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {key: value.clone() for key, value in model.state_dict().items()}


def _assert_same(before: dict[str, Tensor], after: dict[str, Tensor]) -> None:
    assert list(before) == list(after)
    for key in before:
        assert before[key].dtype == after[key].dtype and torch.equal(before[key], after[key]), key


# ---- collapse_model ---------------------------------------------------------------------------------
LINEAR_CONFIGS: list[dict[str, Any]] = [
    dict(depth=1),
    dict(depth=3, width=2, bias=False),
    dict(depth=4, batch_norm=True, residual=True),
    dict(depth=4, width=1.5, batch_norm=True, residual=True, residual_mode="learn", residual_intervals=[1, 3]),
    dict(depth=3, bias=False, batch_norm=True, residual=True, residual_intervals=-1),
]
CONV_CONFIGS: list[dict[str, Any]] = [
    dict(kernel_sizes=[3, 1], padding=1),
    dict(kernel_sizes=[2, 2], stride=2, bias=False),  # even kernels
    dict(kernel_sizes=[3, 1, 3], padding=2, batch_norm=True, residual=True),
    dict(kernel_sizes=[3, 3, 1], padding=1, stride=2, batch_norm=True, residual=True, residual_mode="learn"),
    dict(kernel_sizes=[1, 5], stride=3, width=2, residual=True, residual_mode="learn", residual_intervals=[1]),
]


def _mlp(config: dict[str, Any], dtype: torch.dtype) -> nn.Module:
    features = 6
    return nn.Sequential(
        nn.Linear(5, features),
        nn.ReLU(),
        EPLinear(features, features if config.get("residual") and config.get("residual_mode") != "learn" else 4,
                 **config),
        nn.Sequential(nn.Tanh()),
    ).to(dtype)


def _cnn(config: dict[str, Any], dtype: torch.dtype) -> nn.Module:
    identity = config.get("residual") and config.get("residual_mode") != "learn"
    return nn.Sequential(
        EPConv2d(3, 3, **config),
        nn.ReLU(),
        nn.Sequential(OrderedDict(inner=EPConv2d(3, 3 if identity else 2, **config))),
        nn.Flatten(),
    ).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("kind", "config"), [("mlp", c) for c in LINEAR_CONFIGS] + [("cnn", c) for c in CONV_CONFIGS])
def test_collapse_model_numbers(kind: str, config: dict[str, Any], dtype: torch.dtype, randomise_batch_norm,
                                assert_scaled_close):
    model = (_mlp if kind == "mlp" else _cnn)(config, dtype)
    randomise_batch_norm(model)
    model.eval()
    x = torch.randn(4, 5, dtype=dtype) if kind == "mlp" else torch.randn(2, 3, 20, 19, dtype=dtype)

    collapsed = collapse_model(model)

    with torch.no_grad():
        assert_scaled_close(collapsed(x), _expanded(model, x))


def test_collapse_model_structure_and_input_untouched(randomise_batch_norm):
    model = _cnn(CONV_CONFIGS[3], torch.float32)
    randomise_batch_norm(model)
    model.train()
    before = _snapshot(model)

    collapsed = collapse_model(model)

    _assert_same(before, _snapshot(model))
    assert model.training and isinstance(model[0], EPConv2d) and isinstance(model[2].inner, EPConv2d)
    assert not collapsed.training and not any(m.training for m in collapsed.modules())
    assert [type(m) for m in collapsed] == [nn.Conv2d, nn.ReLU, nn.Sequential, nn.Flatten]
    assert type(collapsed[2].inner) is nn.Conv2d
    assert not any(isinstance(m, EPLayer) for m in collapsed.modules())
    conv = collapsed[0]
    geometry = (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding)
    assert geometry == (3, 3, (5, 5), (2, 2), (1, 1))
    assert collapsed[1] is not model[1]  # a copy, not shared
    for name, parameter in collapsed.named_parameters():
        assert all(parameter is not p for p in model.parameters()), name


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_collapse_model_keeps_dtype_and_the_bias_rule(dtype: torch.dtype):
    model = nn.Sequential(
        EPLinear(4, 4, bias=False, batch_norm=True),  # a batch-norm shift gives the collapse a bias
        EPLinear(4, 3, bias=False, depth=3),  # no bias anywhere
    ).to(dtype)
    collapsed = collapse_model(model)
    assert collapsed[0].bias is not None and collapsed[1].bias is None
    assert all(p.dtype == dtype for p in collapsed.parameters())


def test_expanded_eval_restores_modes_and_flags():
    model = nn.Sequential(EPLinear(3, 3), nn.Dropout(0.5), EPLinear(3, 2, collapse_on_eval=False))
    model.train()
    model[1].eval()
    with expanded_eval(model) as inside:
        assert inside is model and not any(m.training for m in model.modules())
        assert not model[0].collapse_on_eval and not model[2].collapse_on_eval
    assert model.training and model[0].training and not model[1].training
    assert model[0].collapse_on_eval and not model[2].collapse_on_eval


def test_collapse_model_of_a_bare_layer_and_of_a_shared_layer():
    layer = EPLinear(3, 3, depth=3, residual=True)
    assert type(collapse_model(layer)) is nn.Linear
    shared = nn.Sequential(layer, nn.ReLU(), layer)
    collapsed = collapse_model(shared)
    assert type(collapsed[0]) is nn.Linear and collapsed[0] is collapsed[2]


def test_collapse_model_refuses_unregistered_subclasses():
    class Mine(EPLinear):
        pass

    with pytest.raises(ConfigError, match="module '1': Mine is not a registered EP layer"):
        collapse_model(nn.Sequential(nn.ReLU(), Mine(2, 2)))


# ---- collapse_state_dict / collapse_layer ---------------------------------------------------------
def test_collapsed_state_dict_loads_strictly_into_a_hand_written_plain_model(randomise_batch_norm,
                                                                              assert_scaled_close):
    model = nn.Sequential(
        nn.Flatten(),
        EPLinear(12, 8, depth=3, width=2, batch_norm=True, residual=True, residual_mode="learn"),
        nn.BatchNorm1d(8),
        nn.ReLU(),
        EPLinear(8, 8, depth=4, bias=False, residual=True),
        nn.Linear(8, 3),
    ).to(torch.float64)
    randomise_batch_norm(model)
    model.eval()
    configs = {"1": model[1].config, "4": model[4].config}
    by_hand = nn.Sequential(
        nn.Flatten(), nn.Linear(12, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8, bias=False), nn.Linear(8, 3)
    ).to(torch.float64)

    state = collapse_state_dict(model.state_dict(), configs)

    by_hand.load_state_dict(state, strict=True)
    by_hand.eval()
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    with torch.no_grad():
        assert_scaled_close(by_hand(x), _expanded(model, x))
    assert list(state) == list(by_hand.state_dict())  # module order kept


def test_collapsed_state_dict_tensors_are_contiguous_and_unshared():
    model = nn.Sequential(EPConv2d(2, 3, [3, 1]), nn.Linear(3, 3), nn.BatchNorm1d(3))
    source = model.state_dict()
    source["1.weight"] = source["1.weight"].t().contiguous().t()  # a strided view of another storage
    state = collapse_state_dict(source, {"0": model[0].config})
    assert set(state) == {"0.weight", "0.bias", "1.weight", "1.bias", "2.weight", "2.bias", "2.running_mean",
                          "2.running_var", "2.num_batches_tracked"}
    pointers = [t.untyped_storage().data_ptr() for t in state.values()]
    assert len(set(pointers)) == len(pointers)
    assert not set(pointers) & {t.untyped_storage().data_ptr() for t in source.values()}
    assert all(t.is_contiguous() for t in state.values())
    assert torch.equal(state["1.weight"], source["1.weight"])


def test_collapsed_tensors_never_alias_the_input():
    layer = EPLinear(3, 2, depth=1).to(torch.float64)  # the collapse of one layer is its own weight and bias
    source = layer.state_dict()
    state = collapse_state_dict(source, {"": layer.config})
    weight, bias = collapse_layer(layer.config, source)
    inputs = {t.untyped_storage().data_ptr() for t in source.values()}
    assert not inputs & {t.untyped_storage().data_ptr() for t in (*state.values(), weight, bias)}
    torch.testing.assert_close(state["bias"], source["layer_dict.0.0.bias"], rtol=0, atol=0)


def test_collapse_state_dict_of_a_bare_layer_and_stale_keys():
    layer = EPLinear(3, 2, depth=3, batch_norm=True)
    layer.eval()
    source = {**layer.state_dict(), "weight": torch.zeros(2, 3), "bias": torch.zeros(2)}  # as the original saved
    state = collapse_state_dict(source, {"": layer.config})
    assert set(state) == {"weight", "bias"}
    torch.testing.assert_close(state["weight"], layer.weight, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES + [torch.bfloat16], ids=str)
def test_collapse_layer_matches_the_layer(dtype: torch.dtype, randomise_batch_norm):
    layer = EPConv2d(2, 3, [3, 1, 3], stride=2, batch_norm=True, residual=True, residual_mode="learn").to(dtype)
    randomise_batch_norm(layer)
    state = layer.state_dict()

    weight, bias = collapse_layer(layer.config, state)

    reference = layer.collapse()
    assert weight.dtype == dtype and bias.dtype == dtype and weight.is_contiguous()
    torch.testing.assert_close(weight, reference.weight.to(dtype), rtol=0, atol=0)
    torch.testing.assert_close(bias, reference.bias.to(dtype), rtol=0, atol=0)
    _assert_same(state, layer.state_dict())


def test_collapse_layer_and_state_dict_refuse_tensors_that_do_not_fit():
    layer = EPLinear(3, 2, depth=2)
    state = layer.state_dict()
    with pytest.raises(ShapeMismatchError, match=r"layer_dict.0.0.weight has shape \[2, 3\], expected \[3, 3\]"):
        collapse_layer(EPLinear(3, 2, depth=2, width=1.5).config, state)
    with pytest.raises(CheckpointError, match=r"missing keys \['enc.layer_dict.1.0.bias'\]"):
        collapse_state_dict({f"enc.{k}": v for k, v in state.items() if k != "layer_dict.1.0.bias"},
                            {"enc": layer.config})
    with pytest.raises(CheckpointError, match=r"missing keys \['dec.layer_dict.0.0.weight'"):
        collapse_state_dict({}, {"dec": layer.config})


# ---- overparameterize -----------------------------------------------------------------------------
def _plain(even: bool = True) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 4, padding=2, bias=False) if even else nn.Conv2d(4, 4, 5, padding=2, bias=False),
        nn.Conv2d(4, 4, 3, padding="same"),
        nn.Conv2d(4, 2, 1, padding="valid"),
        nn.AdaptiveAvgPool2d(5),
        nn.Flatten(),
        nn.Sequential(nn.Linear(2 * 5 * 5, 6, bias=False), nn.GELU(), nn.Linear(6, 3)),
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_overparameterize_structure(dtype: torch.dtype):
    model = _plain().to(dtype)
    before = _snapshot(model)

    ep = overparameterize(model, depth=3, width=2, batch_norm=True, allow_new_bias=True)  # bias-free layers gain one

    _assert_same(before, _snapshot(model))
    assert all(type(m) in (nn.Conv2d, nn.Linear) for m in (model[0], model[2], model[7][0]))
    first, even, same, valid = ep[0], ep[2], ep[3], ep[4]
    assert isinstance(first, EPConv2d) and isinstance(ep[7][0], EPLinear) and isinstance(ep[7][2], EPLinear)
    geometry = (first.in_channels, first.out_channels, first.kernel_sizes, first.stride, first.padding)
    assert geometry == (3, 4, [3, 1, 1], (2, 2), (1, 1))
    assert (even.kernel_sizes, even.padding, even.config.bias) == ([4, 1, 1], (2, 2), False)
    assert (same.padding, valid.padding, valid.kernel_sizes) == ((1, 1), (0, 0), [1, 1, 1])
    assert ep[7][0].config.bias is False and ep[7][2].config.bias is True
    assert all(layer.depth == 3 and layer.width == 2 and layer.config.batch_norm
               for layer in ep.modules() if isinstance(layer, EPLayer))
    assert all(p.dtype == dtype for p in ep.parameters())
    assert type(ep[1]) is nn.ReLU and ep[1] is not model[1]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    ("even", "options"),
    [(True, dict(batch_norm=True)), (False, dict(batch_norm=True, residual=True, residual_mode="learn"))],
)
def test_overparameterize_then_collapse_equals_the_ep_forward(even: bool, options: dict[str, Any], dtype: torch.dtype,
                                                              randomise_batch_norm, assert_scaled_close):
    model = _plain(even).to(dtype)
    ep = overparameterize(model, depth=3, **options)
    randomise_batch_norm(ep)
    ep.eval()
    x = torch.randn(2, 3, 9, 9, dtype=dtype)

    collapsed = collapse_model(ep)

    for index in (0, 2, 3, 4):
        assert type(collapsed[index]) is nn.Conv2d
        assert collapsed[index].weight.shape == model[index].weight.shape  # same kernel, channels
        assert collapsed[index].stride == model[index].stride
    with torch.no_grad():
        assert collapsed(x).shape == model(x).shape
        assert_scaled_close(collapsed(x), _expanded(ep, x))


def test_overparameterize_leaves_ep_layers_and_keeps_training_mode():
    existing = EPLinear(3, 3, depth=4)
    model = nn.Sequential(existing, nn.Linear(3, 2)).eval()
    ep = overparameterize(model)
    assert ep[0].depth == 4 and ep[0].config == existing.config
    assert isinstance(ep[1], EPLinear) and not ep[1].training


@pytest.mark.parametrize(
    ("conv", "phrase"),
    [
        (nn.Conv2d(2, 2, 4, padding="same"), "padding='same' with kernel_size (4, 4)"),
        (nn.Conv2d(2, 2, (3, 2), dilation=(1, 3), padding="same"), "pads one side more than the other"),
    ],
)
def test_overparameterize_refuses_convolutions_it_cannot_express(conv: nn.Conv2d, phrase: str):
    model = nn.Sequential(nn.ReLU(), nn.Sequential(OrderedDict(block=conv)))
    with pytest.raises(ConfigError) as info:
        overparameterize(model)
    assert "Conv2d at '1.block'" in str(info.value) and phrase in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "phrase"),
    [
        (dict(depth=0), "depth must be an int >= 1"),
        (dict(depth="four"), "depth must be an int >= 1"),
        (dict(width=-1), "width must be a finite number > 0"),
        (dict(bias=False), "unknown options ['bias']"),
        (dict(stride=2), "unknown options ['stride']"),
        (dict(residual=True, width=2, residual_intervals=1), "identity skip"),
    ],
)
def test_overparameterize_refuses_bad_options(kwargs: dict[str, Any], phrase: str):
    for model in (nn.Sequential(nn.Linear(3, 3)), nn.Sequential(nn.Conv2d(3, 3, 3))):
        with pytest.raises(ConfigError) as info:
            overparameterize(model, **kwargs)
        assert phrase in str(info.value)
        if "unknown" not in phrase:
            assert "at '0'" in str(info.value)


def test_overparameterize_a_bare_layer():
    layer = overparameterize(nn.Linear(4, 2, bias=False), depth=4)
    assert isinstance(layer, EPLinear) and (layer.in_features, layer.out_features, layer.depth) == (4, 2, 4)


def test_grid_of_shapes_collapses_to_the_plain_shapes():
    """A plain conv and its overparameterized, collapsed copy have the same output shape for every input size."""
    for kernel, stride, padding, size in itertools.product([1, 2, 3, 4], [1, 2, 3], [0, 1, 2], [7, 8]):
        plain = nn.Conv2d(2, 3, kernel, stride=stride, padding=padding)
        collapsed = collapse_model(overparameterize(plain, depth=2).eval())
        x = torch.randn(1, 2, size, size)
        assert collapsed(x).shape == plain(x).shape, (kernel, stride, padding, size)


def test_plain_model_holds_the_given_collapsed_tensors_without_collapsing() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        EPLinear(6, 6, depth=3, batch_norm=True, residual=True), nn.ReLU(), EPLinear(6, 2, residual=True, residual_mode="learn")
    ).eval()
    ep_layers = {"0": model[0].config, "2": model[2].config}
    state = collapse_state_dict(model.state_dict(), ep_layers)
    plain = plain_model(model, state)
    assert [type(m) for m in plain] == [nn.Linear, nn.ReLU, nn.Linear]
    for key, tensor in plain.state_dict().items():
        assert torch.equal(tensor, state[key]), key
    x = torch.randn(5, 6)
    torch.testing.assert_close(plain(x), collapse_model(model)(x), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="Missing key"):
        plain_model(model, {k: v for k, v in state.items() if k != "2.bias"})


# ---- overparameterize: what is converted, and the report -----------------------------------------
class _Net(nn.Module):
    """A stem, two stages with a downsample branch, a classifier: the paths people select by."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.layer1 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1))
        self.layer2 = nn.ModuleDict({"conv": nn.Conv2d(8, 16, 3, padding=1), "downsample": nn.Conv2d(8, 16, 1)})
        self.fc = nn.Linear(16, 10)


def _kinds(model: nn.Module) -> dict[str, str]:
    return {path: type(m).__name__ for path, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d, EPLayer))}


@pytest.mark.parametrize(
    ("options", "converted"),
    [
        ({}, {"conv1", "layer1.0", "layer1.1", "layer2.conv", "layer2.downsample", "fc"}),
        (dict(include=["layer*"]), {"layer1.0", "layer1.1", "layer2.conv", "layer2.downsample"}),
        (dict(include=["layer2"], exclude=["*.downsample"]), {"layer2.conv"}),
        (dict(exclude=["fc", "conv1"], types=[nn.Conv2d]), {"layer1.0", "layer1.1", "layer2.conv", "layer2.downsample"}),
        (dict(types=nn.Linear), {"fc"}),
        (dict(min_params=8 * 8 * 9 + 8), {"layer1.0", "layer2.conv"}),  # 1x1 convs, the stem and fc are smaller
    ],
)
def test_overparameterize_selects_by_path_type_and_size(options: dict[str, Any], converted: set[str]):
    model = _Net()
    ep = overparameterize(model, depth=2, **options)
    kinds = _kinds(ep)
    assert {path for path, kind in kinds.items() if kind.startswith("EP")} == converted
    assert all(kind in ("Conv2d", "Linear") for path, kind in kinds.items() if path not in converted)
    plan = plan_overparameterize(model, depth=2, **options)
    plain = list(_kinds(model))
    assert [c.path for c in plan.replaced] == [p for p in plain if p in converted]
    assert [c.path for c in plan.kept] == [p for p in plain if p not in converted]
    assert all(c.reason for c in plan.kept)


def test_plan_counts_parameters_before_and_after():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Conv2d(2, 3, 3, bias=False))
    plan = plan_overparameterize(model, depth=3, width=2, batch_norm=True, allow_new_bias=True)
    linear, conv = plan.replaced
    assert plan.changed == (conv,) and "adds a bias" in conv.changes[0]  # batch-norm's shift on a bias-free conv
    assert (linear.path, linear.kind, linear.params_before) == ("0", "Linear", 4 * 6 + 6)
    # hidden width 12: 4->12->12->6 with biases, and a batch-norm (gamma, beta) after each layer
    assert linear.params_after == (4 * 12 + 12) + (12 * 12 + 12) + (12 * 6 + 6) + 2 * (12 + 12 + 6)
    assert (conv.kind, conv.params_before) == ("Conv2d", 2 * 3 * 9)
    # kernels [3, 1, 1], hidden 6 channels, no bias
    assert conv.params_after == 2 * 6 * 9 + 6 * 6 + 6 * 3 + 2 * (6 + 6 + 3)
    assert plan.params_before == linear.params_before + conv.params_before
    assert plan.params_after == linear.params_after + conv.params_after
    assert not plan.kept


def test_tied_weights_are_kept_and_reported():
    class Decoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.wte = nn.Embedding(11, 8)
            self.mlp = nn.Linear(8, 8)
            self.lm_head = nn.Linear(8, 11, bias=False)
            self.lm_head.weight = self.wte.weight  # tied

    model = Decoder()
    ep = overparameterize(model, depth=2)
    assert type(ep.lm_head) is nn.Linear and ep.lm_head.weight is ep.wte.weight  # still tied in the copy
    assert isinstance(ep.mlp, EPLinear)
    embedding, kept = plan_overparameterize(model).kept
    assert (embedding.path, embedding.reason) == ("wte", "Embedding is not a linear or convolution layer")
    assert kept.path == "lm_head" and "shared with 'wte'" in (kept.reason or "")


def test_a_module_used_twice_is_converted_once():
    shared = nn.Linear(4, 4)
    ep = overparameterize(nn.Sequential(shared, nn.ReLU(), shared))
    assert isinstance(ep[0], EPLinear) and ep[0] is ep[2]


@pytest.mark.parametrize(
    ("options", "phrase"),
    [
        (dict(types=[nn.Embedding]), "types ['Embedding'] cannot be converted"),
        (dict(min_params=-1), "min_params must be an int >= 0"),
        (dict(include=[3]), "include must be glob patterns"),
        (dict(allow_new_bias=1), "allow_new_bias must be True or False"),
        (dict(weight_layout="in_out"), "unknown options ['weight_layout']"),  # set from the replaced module only
    ],
)
def test_overparameterize_refuses_bad_selections(options: dict[str, Any], phrase: str):
    with pytest.raises(ConfigError, match=re.escape(phrase)):
        overparameterize(_Net(), **options)


# ---- wrapped models ------------------------------------------------------------------------------
def _ep_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(EPLinear(4, 6, depth=3, batch_norm=True), nn.ReLU(), EPLinear(6, 2)).eval()


def test_compiled_and_data_parallel_models_are_unwrapped(tmp_path):
    model = _ep_model()
    x = torch.randn(3, 4)
    reference = collapse_model(model)(x)
    for wrapped in (torch.compile(model), nn.DataParallel(model), torch.compile(nn.DataParallel(model))):
        assert unwrap_model(wrapped) is model
        torch.testing.assert_close(collapse_model(wrapped)(x), reference, rtol=0, atol=0)
    ep = overparameterize(torch.compile(nn.Sequential(nn.Linear(4, 2))))
    assert isinstance(ep[0], EPLinear)
    saved = load_checkpoint(save_checkpoint(torch.compile(model), tmp_path / "m.safetensors", input_shape=(4,)))
    assert set(saved.state_dict) == set(model.state_dict())  # no _orig_mod. prefix


@pytest.fixture
def process_group(tmp_path):
    """A single-process gloo group (CPU), destroyed after the test."""
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"file://{tmp_path / 'rendezvous'}")
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_ddp_fsdp1_and_fsdp2_models_collapse_and_save_unwrapped(process_group, tmp_path):
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    x = torch.randn(3, 4)
    reference = collapse_model(_ep_model())(x)
    keys = set(_ep_model().state_dict())

    ddp = nn.parallel.DistributedDataParallel(_ep_model())
    fsdp2 = _ep_model()
    fully_shard(fsdp2[0])
    fully_shard(fsdp2)
    assert type(fsdp2[0]).__name__ == "FSDPEPLinear"
    fsdp1 = FullyShardedDataParallel(_ep_model(), device_id=torch.device("cpu"), auto_wrap_policy=ModuleWrapPolicy({EPLinear}))
    assert isinstance(fsdp1.module[0], FullyShardedDataParallel)  # nested: each EP layer its own flat parameter
    for name, wrapped in (("ddp", ddp), ("fsdp2", fsdp2), ("fsdp1", fsdp1)):
        plain = unwrap_model(wrapped)
        assert [type(m) for m in plain] == [EPLinear, nn.ReLU, EPLinear]
        assert all(type(p) is nn.Parameter for p in plain.parameters())
        collapsed = collapse_model(wrapped)
        assert [type(m) for m in collapsed] == [nn.Linear, nn.ReLU, nn.Linear]
        torch.testing.assert_close(collapsed(x), reference, rtol=0, atol=0)
        loaded = load_checkpoint(save_checkpoint(wrapped, tmp_path / f"{name}.safetensors", input_shape=(4,)))
        assert set(loaded.state_dict) == keys and loaded.model is not None
        torch.testing.assert_close(collapse_model(loaded.model)(x), reference, rtol=0, atol=0)
    assert type(fsdp2[0]).__name__ == "FSDPEPLinear"  # the sharded model itself is left alone

    ep = overparameterize(nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(4, 2))))
    assert isinstance(ep[0], EPLinear)

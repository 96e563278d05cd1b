"""Round trips through both file formats: what is saved is what comes back, in this process and a fresh one."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import epcli
from epcli import (
    CheckpointError,
    ConfigError,
    EPConv2dConfig,
    EPLinearConfig,
    ModelInputError,
    OutputError,
    ShapeMismatchError,
)
from epcli.checkpoint.architecture import describe_architecture
from epcli.checkpoint.load import open_checkpoint
from epcli.storage.atomic import atomic_write

FORMATS = [".pt", ".safetensors"]
DTYPES = [torch.float32, torch.float64]


def _assert_same_state(loaded: dict[str, torch.Tensor], original: dict[str, torch.Tensor]) -> None:
    assert list(sorted(loaded)) == list(sorted(original))
    for key, value in original.items():
        assert loaded[key].dtype == value.dtype, key
        assert torch.equal(loaded[key], value), key


@pytest.mark.parametrize("suffix", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ["mlp", "cnn", "single"])
def test_round_trip_rebuilds_an_equal_model(tmp_path: Path, make_model, name: str, dtype: torch.dtype, suffix: str):
    model, shape = make_model(name, dtype)
    path = epcli.save_checkpoint(model, tmp_path / f"model{suffix}", input_shape=shape)

    checkpoint = epcli.load_checkpoint(path)

    assert checkpoint.path == path and checkpoint.kind == "expanded"
    assert checkpoint.input_shape == shape
    assert checkpoint.model is not None and not checkpoint.model.training
    assert type(checkpoint.model) is type(model)
    _assert_same_state(checkpoint.state_dict, model.state_dict())
    _assert_same_state(checkpoint.model.state_dict(), model.state_dict())
    assert checkpoint.architecture == describe_architecture(model)
    configs = {p: m.config for p, m in model.named_modules() if isinstance(m, epcli.EPLayer)}
    assert checkpoint.ep_layers == configs
    x = torch.randn(4, *shape, dtype=dtype)
    with torch.no_grad():
        torch.testing.assert_close(checkpoint.model(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("suffix", FORMATS)
def test_the_loaded_model_owns_its_tensors(tmp_path: Path, make_model, suffix: str):
    model, shape = make_model("mlp")
    checkpoint = epcli.load_checkpoint(epcli.save_checkpoint(model, tmp_path / f"m{suffix}", input_shape=shape))
    before = {k: v.clone() for k, v in checkpoint.state_dict.items()}
    with torch.no_grad():
        for parameter in checkpoint.model.parameters():
            parameter.add_(1.0)
    _assert_same_state(checkpoint.state_dict, before)


def test_layer_input_shapes_are_recorded_per_sample(tmp_path: Path, make_model):
    model, shape = make_model("cnn")
    checkpoint = epcli.load_checkpoint(epcli.save_checkpoint(model, tmp_path / "cnn.pt", input_shape=shape))
    # 9x9 -> first EP layer keeps 9x9 (collapsed kernel 5, padding 2)
    assert checkpoint.layer_input_shapes == {"0": (2, 9, 9), "2": (4, 9, 9)}
    layer = checkpoint.metadata["ep_layers"]["2"]
    assert layer["class"] == "EPConv2d" and layer["input_shape"] == [4, 9, 9]
    assert EPConv2dConfig.from_dict(layer["config"]) == checkpoint.ep_layers["2"]


@pytest.mark.parametrize("suffix", FORMATS)
def test_metadata_schema(tmp_path: Path, make_model, suffix: str):
    model, shape = make_model("mlp")
    checkpoint = epcli.load_checkpoint(epcli.save_checkpoint(model, tmp_path / f"m{suffix}", input_shape=shape))
    meta = checkpoint.metadata
    assert set(meta) == {
        "format", "format_version", "config_version", "kind", "epcli_version", "torch_version", "input_shape",
        "ep_layers", "architecture", "provenance",
    }
    assert meta["format"] == "epcli-checkpoint" and meta["format_version"] == 1 and meta["kind"] == "expanded"
    assert meta["epcli_version"] == epcli.__version__ and meta["torch_version"] == str(torch.__version__)
    assert meta["input_shape"] == [3, 4] and meta["provenance"] == {}
    assert list(meta["ep_layers"]) == ["1", "4", "7"]
    assert meta["ep_layers"]["4"]["config"] == model[4].config.to_dict()
    assert meta["ep_layers"]["4"]["config"]["bn_eps"] == 1e-5 and meta["ep_layers"]["4"]["config"]["bn_momentum"] == 0.1
    assert meta["architecture"]["type"] == "Sequential"


@pytest.mark.parametrize("suffix", FORMATS)
def test_two_saves_are_byte_identical(tmp_path: Path, make_model, suffix: str):
    model, shape = make_model("cnn")
    first = epcli.save_checkpoint(model, tmp_path / f"a{suffix}", input_shape=shape).read_bytes()
    second = epcli.save_checkpoint(model, tmp_path / f"b{suffix}", input_shape=shape).read_bytes()
    assert hashlib.sha256(first).digest() == hashlib.sha256(second).digest()


def test_pt_files_load_with_plain_weights_only_torch_load(tmp_path: Path, make_model):
    model, shape = make_model("mlp")
    path = epcli.save_checkpoint(model, tmp_path / "m.pt", input_shape=shape)
    content = torch.load(path, weights_only=True)
    assert set(content) == {"epcli_metadata", "state_dict"}
    assert json.loads(content["epcli_metadata"])["format"] == "epcli-checkpoint"


def test_custom_forward_has_no_architecture_but_keeps_layers(tmp_path: Path, make_model):
    model, shape = make_model("custom")
    checkpoint = epcli.load_checkpoint(epcli.save_checkpoint(model, tmp_path / "c.safetensors", input_shape=shape))
    assert checkpoint.model is None and checkpoint.architecture is None
    assert checkpoint.ep_layers == {"body": model.body.config}
    assert isinstance(checkpoint.ep_layers["body"], EPLinearConfig)
    _assert_same_state(checkpoint.state_dict, model.state_dict())


@pytest.mark.parametrize("suffix", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_collapsed_checkpoint_round_trip(tmp_path: Path, make_model, expanded_forward, dtype, suffix: str):
    model, shape = make_model("cnn", dtype)
    source = epcli.load_checkpoint(epcli.save_checkpoint(model, tmp_path / f"x{suffix}", input_shape=shape))
    provenance = {"source_sha256": "ab" * 32, "max_error": {"0": 1e-7}}
    path = epcli.save_collapsed_checkpoint(source, tmp_path / f"c{suffix}", provenance=provenance)

    collapsed = epcli.load_checkpoint(path)

    assert collapsed.kind == "collapsed" and collapsed.metadata["provenance"] == provenance
    assert collapsed.ep_layers == source.ep_layers and collapsed.layer_input_shapes == source.layer_input_shapes
    assert type(collapsed.model[0]) is nn.Conv2d and type(collapsed.model[2]) is nn.Conv2d
    assert collapsed.architecture == describe_architecture(epcli.collapse_model(model))
    assert set(collapsed.state_dict) >= {"0.weight", "0.bias", "2.weight", "2.bias"}
    x = torch.randn(3, *shape, dtype=dtype)
    tolerance = {torch.float64: 1e-10, torch.float32: 1e-5}[dtype]
    reference = expanded_forward(model, x)
    torch.testing.assert_close(collapsed.model(x).detach(), reference, rtol=tolerance, atol=tolerance)


def test_a_precomputed_collapsed_state_is_checked_and_used(tmp_path: Path, make_model):
    model, shape = make_model("mlp", torch.float64)
    source = epcli.load_checkpoint(epcli.save_checkpoint(model, tmp_path / "x.pt", input_shape=shape))
    state = epcli.collapse_state_dict(source.state_dict, source.ep_layers)
    given = epcli.save_collapsed_checkpoint(source, tmp_path / "given.pt", collapsed_state=state)
    computed = epcli.save_collapsed_checkpoint(source, tmp_path / "computed.pt")
    assert given.read_bytes() == computed.read_bytes()

    bad = {**state, "4.weight": state["4.weight"][:, :-1]}
    with pytest.raises(ShapeMismatchError, match=r"collapsed_state does not fit .*x\.pt: 4\.weight has shape \[7, 11"):
        epcli.save_collapsed_checkpoint(source, tmp_path / "bad.pt", collapsed_state=bad)
    with pytest.raises(CheckpointError, match=r"missing keys \['4.bias'\]"):
        epcli.save_collapsed_checkpoint(source, tmp_path / "bad.pt", collapsed_state={
            k: v for k, v in state.items() if k != "4.bias"
        })
    with pytest.raises(CheckpointError, match=r"'7.weight' in collapsed_state has non-finite values"):
        epcli.save_collapsed_checkpoint(source, tmp_path / "bad.pt", collapsed_state={
            **state, "7.weight": torch.full_like(state["7.weight"], float("nan"))
        })
    assert not (tmp_path / "bad.pt").exists()


def test_collapsing_a_collapsed_checkpoint_is_refused(tmp_path: Path, make_model):
    model, shape = make_model("mlp")
    source = epcli.load_checkpoint(epcli.save_checkpoint(model, tmp_path / "x.pt", input_shape=shape))
    once = epcli.load_checkpoint(epcli.save_collapsed_checkpoint(source, tmp_path / "c.pt"))
    with pytest.raises(CheckpointError, match="already collapsed") as info:
        epcli.save_collapsed_checkpoint(once, tmp_path / "cc.pt")
    assert "c.pt" in str(info.value)
    assert not (tmp_path / "cc.pt").exists()


def test_collapsed_custom_model_has_layers_but_no_model(tmp_path: Path, make_model):
    model, shape = make_model("custom")
    source = epcli.load_checkpoint(epcli.save_checkpoint(model, tmp_path / "x.pt", input_shape=shape))
    collapsed = epcli.load_checkpoint(epcli.save_collapsed_checkpoint(source, tmp_path / "c.pt"))
    assert collapsed.model is None and collapsed.architecture is None
    assert set(collapsed.state_dict) == {"body.weight", "body.bias", "head.weight", "head.bias"}


def test_save_overwrites_atomically_and_leaves_no_temp_files(tmp_path: Path, make_model):
    model, shape = make_model("mlp")
    path = tmp_path / "m.pt"
    path.write_bytes(b"old contents")
    epcli.save_checkpoint(model, path, input_shape=shape)
    assert epcli.load_checkpoint(path).kind == "expanded"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


def test_a_write_that_fails_midway_leaves_the_old_file_and_no_temp_file(tmp_path: Path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"old contents")

    def write_then_fail(f) -> None:
        f.write(b"half a file")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        atomic_write(path, write_then_fail)
    assert path.read_bytes() == b"old contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


@pytest.mark.parametrize("shape", [(), (0,), (4, -1), ("4",), "64", 2.5, None])
def test_bad_input_shape_is_refused_before_writing(tmp_path: Path, make_model, shape):
    model, _ = make_model("mlp")
    with pytest.raises(ConfigError, match="input_shape"):
        epcli.save_checkpoint(model, tmp_path / "m.pt", input_shape=shape)
    assert not list(tmp_path.iterdir())


def test_a_forward_that_fails_on_the_input_shape_names_the_shape(tmp_path: Path, make_model):
    model, _ = make_model("mlp")
    with pytest.raises(ModelInputError, match=r"m\.pt: not written: .*batch of shape \[2, 5\].*input_shape=\[5\]") as e:
        epcli.save_checkpoint(model, tmp_path / "m.pt", input_shape=(5,))
    assert e.value.file == str(tmp_path / "m.pt")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("name", ["model.ckpt", "model", "model.onnx"])
def test_unsupported_suffix_on_save(tmp_path: Path, make_model, name: str):
    model, shape = make_model("single")
    with pytest.raises(CheckpointError, match=r"unsupported file suffix .*\.pt, \.pth, \.safetensors") as info:
        epcli.save_checkpoint(model, tmp_path / name, input_shape=shape)
    assert name in str(info.value)


def test_save_into_a_missing_directory(tmp_path: Path, make_model):
    model, shape = make_model("single")
    with pytest.raises(OutputError, match="does not exist"):
        epcli.save_checkpoint(model, tmp_path / "nowhere" / "m.pt", input_shape=shape)


_CHILD = textwrap.dedent(
    """
    import importlib.util, json, sys
    import epcli, torch

    test_dir, input_path, *pairs = sys.argv[1:]  # then (checkpoint, output) pairs
    x = torch.load(input_path, weights_only=True)
    types = []
    for checkpoint_path, output_path in zip(pairs[::2], pairs[1::2]):
        checkpoint = epcli.load_checkpoint(checkpoint_path)
        with torch.no_grad():
            torch.save(checkpoint.model(x), output_path)
        types.append(type(checkpoint.model).__name__)
    importable = [name for name in ("conftest", "test_roundtrip", "tests") if importlib.util.find_spec(name)]
    from_tests = sorted(
        name for name, module in list(sys.modules.items())
        if (getattr(module, "__file__", None) or "").startswith(test_dir)
    )
    print(json.dumps({"importable": importable, "from_tests": from_tests, "types": types}))
    """
)


def test_fresh_process_that_imports_only_epcli_rebuilds_the_model(tmp_path: Path, make_model):
    """One child process (it pays for ``import torch`` once) rebuilds the model from each format in turn."""
    model, shape = make_model("cnn", torch.float64)
    paths = [epcli.save_checkpoint(model, tmp_path / f"m{suffix}", input_shape=shape) for suffix in FORMATS]
    outputs = [tmp_path / f"y{suffix}.pt" for suffix in FORMATS]
    x = torch.randn(5, *shape, dtype=torch.float64)
    torch.save(x, tmp_path / "x.pt")
    test_dir = str(Path(__file__).resolve().parent.parent)

    # -I: no PYTHONPATH, no user site, no script directory; cwd is tmp_path, so the test tree is out of reach
    pairs = [str(p) for pair in zip(paths, outputs) for p in pair]
    result = subprocess.run(
        [sys.executable, "-I", "-c", _CHILD, test_dir, str(tmp_path / "x.pt"), *pairs],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )

    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"importable": [], "from_tests": [], "types": ["Sequential"] * len(FORMATS)}
    with torch.no_grad():
        expected = model(x)
    for output in outputs:
        torch.testing.assert_close(torch.load(output, weights_only=True), expected, rtol=0, atol=0, msg=str(output))


def test_a_checkpoints_repr_is_a_summary_not_its_tensors(tmp_path: Path):
    model = nn.Sequential(epcli.EPLinear(300, 200, depth=3), nn.ReLU(), nn.Linear(200, 4)).eval()
    checkpoint = epcli.load_checkpoint(epcli.save_checkpoint(model, tmp_path / "m.safetensors", input_shape=(300,)))
    text = repr(checkpoint)
    size = sum(t.numel() * t.element_size() for t in checkpoint.state_dict.values())
    assert text.startswith("Checkpoint(") and "m.safetensors" in text and "kind='expanded'" in text
    assert f"tensors={len(checkpoint.state_dict)} ({size:,} bytes)" in text and "ep_layers=['0']" in text
    assert "tensor(" not in text and len(text) < 300
    opened = repr(open_checkpoint(checkpoint.path))
    assert opened.startswith("CheckpointFile(") and "foreign=False" in opened and len(opened) < 300

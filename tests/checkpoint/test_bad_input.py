"""Every bad input raises a typed EpcliError naming the file and what is wrong, and never runs code from it."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

import epcli
from epcli import CheckpointError, ConfigError, EpcliError, ShapeMismatchError, UnsafeCheckpointError

FORMATS = [".pt", ".safetensors"]


def _expect(error: type[EpcliError], path: Path, *phrases: str, **kwargs: Any) -> EpcliError:
    """Load ``path`` and check the error type, that it names the file, and that it says each phrase."""
    with pytest.raises(error) as info:
        epcli.load_checkpoint(path, **kwargs)
    message = str(info.value)
    assert isinstance(info.value, EpcliError)
    assert str(path) in message, message
    for phrase in phrases:
        assert phrase in message, f"{phrase!r} not in {message!r}"
    return info.value


def _save_mlp(directory: Path, make_model, suffix: str) -> Path:
    """A valid expanded checkpoint of the MLP (EP layers at '1', '4', '7')."""
    model, shape = make_model("mlp")
    return epcli.save_checkpoint(model, directory / f"model{suffix}", input_shape=shape)


@pytest.fixture(params=FORMATS)
def saved(request: pytest.FixtureRequest, tmp_path: Path, make_model) -> Path:
    return _save_mlp(tmp_path, make_model, request.param)


@pytest.fixture
def saved_pt(tmp_path: Path, make_model) -> Path:
    return _save_mlp(tmp_path, make_model, ".pt")


@pytest.fixture
def saved_safetensors(tmp_path: Path, make_model) -> Path:
    return _save_mlp(tmp_path, make_model, ".safetensors")


# ---- the file itself ---------------------------------------------------------------------------
def test_missing_path(tmp_path: Path):
    _expect(CheckpointError, tmp_path / "absent.pt", "no such file")


def test_directory(tmp_path: Path):
    (tmp_path / "folder.pt").mkdir()
    _expect(CheckpointError, tmp_path / "folder.pt", "is a directory")


@pytest.mark.parametrize("suffix", FORMATS)
def test_empty_file(tmp_path: Path, suffix: str):
    path = tmp_path / f"empty{suffix}"
    path.touch()
    _expect(CheckpointError, path, "is empty (0 bytes)")


def test_unsupported_suffix(tmp_path: Path):
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"anything")
    _expect(CheckpointError, path, "unsupported file suffix '.ckpt'", ".pt, .pth, .safetensors")


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.999])
def test_truncated_pt(saved_pt: Path, keep: float):
    saved = saved_pt
    data = saved.read_bytes()
    saved.write_bytes(data[: int(len(data) * keep)])
    _expect(CheckpointError, saved, "truncated or corrupt")


@pytest.mark.parametrize("missing", ["half of the tensor data", "the last byte"])
def test_truncated_safetensors_data(saved_safetensors: Path, missing: str):
    saved = saved_safetensors
    data = saved.read_bytes()
    data_start = 8 + int.from_bytes(data[:8], "little")
    end = data_start + (len(data) - data_start) // 2 if missing.startswith("half") else len(data) - 1
    saved.write_bytes(data[:end])
    _expect(CheckpointError, saved, "is truncated", f"describes {len(data) - data_start} bytes of tensor data")


def test_safetensors_truncated_inside_the_header(saved_safetensors: Path):
    saved = saved_safetensors
    saved.write_bytes(saved.read_bytes()[:100])
    _expect(CheckpointError, saved, "safetensors header claims", "truncated")


@pytest.mark.parametrize("suffix", FORMATS)
def test_random_bytes(tmp_path: Path, suffix: str):
    path = tmp_path / f"noise{suffix}"
    path.write_bytes(random.Random(7).randbytes(4096))
    phrase = "is not a torch zip checkpoint" if suffix == ".pt" else "safetensors header claims"
    _expect(CheckpointError, path, phrase)


def test_too_short_for_a_safetensors_header(tmp_path: Path):
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"\x01\x02\x03")
    _expect(CheckpointError, path, "too short (3 bytes)")


def test_safetensors_header_longer_than_the_file(saved_safetensors: Path):
    saved = saved_safetensors
    data = bytearray(saved.read_bytes())
    data[:8] = (len(data) * 10).to_bytes(8, "little")
    saved.write_bytes(bytes(data))
    _expect(CheckpointError, saved, f"header claims {len(data) * 10} bytes", f"{len(data) - 8} bytes follow")


def test_safetensors_header_shorter_than_it_is(saved_safetensors: Path):
    saved = saved_safetensors
    data = bytearray(saved.read_bytes())
    true_length = int.from_bytes(data[:8], "little")
    data[:8] = (true_length - 20).to_bytes(8, "little")
    saved.write_bytes(bytes(data))
    _expect(CheckpointError, saved, "header", "is not valid JSON", "header length is wrong")


# ---- readable, but not an epcli checkpoint ---------------------------------------------------
def test_plain_state_dict_pt(tmp_path: Path, make_model):
    model, _ = make_model("mlp")
    path = tmp_path / "plain.pt"
    torch.save(model.state_dict(), path)
    hint = "epcli.save_checkpoint(model, path, input_shape=...)"
    _expect(CheckpointError, path, "no epcli metadata", "plain state_dict", hint)


def test_plain_safetensors(tmp_path: Path, make_model):
    model, _ = make_model("mlp")
    path = tmp_path / "plain.safetensors"
    save_file(model.state_dict(), str(path), metadata={"format": "pt"})
    _expect(CheckpointError, path, "no epcli metadata", "epcli.save_checkpoint(model, path, input_shape=...)")


def test_training_checkpoint_dict_without_metadata(tmp_path: Path, make_model):
    model, _ = make_model("single")
    path = tmp_path / "train.pt"
    torch.save({"epoch": 3, "state_dict": model.state_dict()}, path)
    _expect(CheckpointError, path, "no epcli metadata", "'epoch'", "epcli.save_checkpoint")


# ---- a real malicious pickle ---------------------------------------------------------------------
class _Payload:
    """Unpickling this runs a shell command (``os.system``): the classic pickle attack."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (self.command,))


@pytest.mark.parametrize("where", ["state_dict", "top level"])
def test_malicious_pickle_is_refused_and_does_not_run(tmp_path: Path, where: str):
    marker = tmp_path / "pwned"
    payload = _Payload(f"touch {marker}")
    content: Any = {"epcli_metadata": "{}", "state_dict": payload} if where == "state_dict" else payload
    path = tmp_path / "evil.pt"
    torch.save(content, path)  # the torch zip format, like a real checkpoint

    _expect(UnsafeCheckpointError, path, "refused to load", "system", "nothing was executed")
    assert not marker.exists()


def test_the_malicious_pickle_is_real(tmp_path: Path):
    """Control: the same file does run its payload when loaded without weights_only (never done by epcli)."""
    marker = tmp_path / "control"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": _Payload(f"touch {marker}")}, path)
    torch.load(path, weights_only=False)
    assert marker.exists()


# ---- metadata: version, classes, configs, schema --------------------------------------------------
def test_unknown_format_version(saved: Path, rewrite):
    rewrite(saved, metadata=lambda m: m.update(format_version=99))
    _expect(CheckpointError, saved, "format_version 99 is not supported", "reads format_version 1", "upgrade epcli")


def test_not_epcli_format_name(saved: Path, rewrite):
    rewrite(saved, metadata=lambda m: m.update(format="other-tool"))
    _expect(CheckpointError, saved, "'other-tool'", "expected 'epcli-checkpoint'")


def test_unknown_layer_class(saved: Path, rewrite):
    rewrite(saved, metadata=lambda m: m["ep_layers"]["4"].update({"class": "EPMystery"}))
    _expect(ConfigError, saved, "layer '4'", "unknown EP layer class 'EPMystery'", "EPLinear, EPConv2d")


@pytest.mark.parametrize(
    ("field", "value", "phrase"),
    [
        ("depth", "four", "depth must be an int >= 1, got 'four' (str)"),
        ("depth", -3, "depth must be an int >= 1, got -3 (int)"),
        ("depth", 2.5, "depth must be an int >= 1"),
        ("width", -1, "width must be a finite number > 0"),
        ("bias", "yes", "bias must be True or False"),
        ("residual_mode", "sideways", "residual_mode must be"),
        ("bn_momentum", 7, "bn_momentum must be None or a number in [0, 1]"),
        ("in_features", None, "in_features must be an int >= 1"),
    ],
)
def test_bad_config_values(saved: Path, rewrite, field: str, value: Any, phrase: str):
    rewrite(saved, metadata=lambda m: m["ep_layers"]["4"]["config"].update({field: value}))
    _expect(ConfigError, saved, "layer '4'", "EPLinear", phrase)


def test_unknown_config_key(saved: Path, rewrite):
    rewrite(saved, metadata=lambda m: m["ep_layers"]["1"]["config"].update(colour="blue"))
    _expect(ConfigError, saved, "layer '1'", "unknown keys ['colour']")


def _set(key: str, value: Any):
    return lambda m: m.update({key: value})


@pytest.mark.parametrize(
    ("mutate", "phrase"),
    [
        (_set("kind", "squashed"), "kind must be one of ['expanded', 'collapsed'], got 'squashed'"),
        (_set("input_shape", [0, 4]), "input_shape must be"),
        (_set("input_shape", "3x4"), "input_shape must be"),
        (_set("ep_layers", ["1", "4"]), "ep_layers must be an object"),
        (_set("architecture", 5), "architecture must be an object or null"),
        (_set("provenance", "me"), "provenance must be an object"),
        (_set("epcli_version", 1), "epcli_version must be a string"),
        (_set("config_version", 2), "config_version 2 is not supported"),
        (_set("format_version", "1"), "format_version '1' is not supported"),
        (_set("when", "today"), "unknown keys ['when']"),
        (lambda m: m.pop("torch_version"), "missing keys ['torch_version']"),
        (lambda m: m["ep_layers"]["4"].pop("input_shape"), "layer '4': entry must be an object with exactly"),
        (lambda m: m["ep_layers"]["4"].update(input_shape=[-2]), "layer '4': input_shape must be"),
        (lambda m: m["ep_layers"]["4"].update(input_shape=[5]), "input_shape [5] does not fit EPLinear(12 -> 7)"),
        (lambda m: m["ep_layers"].update({"a..b": m["ep_layers"]["4"]}), "not a valid dotted module path"),
    ],
)
def test_metadata_of_the_wrong_type_or_out_of_range(saved: Path, rewrite, mutate, phrase: str):
    rewrite(saved, metadata=mutate)
    _expect(EpcliError, saved, phrase)


def test_metadata_that_is_not_json(tmp_path: Path):
    path = tmp_path / "m.pt"
    torch.save({"epcli_metadata": "{not json", "state_dict": {}}, path)
    _expect(CheckpointError, path, "epcli metadata is not valid JSON")


def test_metadata_that_is_not_a_string(tmp_path: Path):
    path = tmp_path / "m.pt"
    torch.save({"epcli_metadata": {"format": "epcli-checkpoint"}, "state_dict": {}}, path)
    _expect(CheckpointError, path, "'epcli_metadata' must be a JSON string, got dict")


def test_architecture_disagreeing_with_the_layer_list(saved: Path, rewrite):
    def mutate(m: dict[str, Any]) -> None:
        m["architecture"]["children"][4]["module"]["config"]["bn_eps"] = 0.5

    rewrite(saved, metadata=mutate)
    _expect(CheckpointError, saved, "embedded architecture: layer '4' disagrees with the metadata", "bn_eps")


def test_unknown_module_type_in_the_architecture(saved: Path, rewrite):
    rewrite(saved, metadata=lambda m: m["architecture"]["children"][2]["module"].update(type="Teleport"))
    _expect(CheckpointError, saved, "architecture node '2'", "unknown module type 'Teleport'")


@pytest.mark.parametrize(
    ("depth", "error", "phrase"),
    [
        (1000, CheckpointError, "needs at least 1000 weight tensors"),  # within the limits: counted before building
        (10**9, ConfigError, "config depth is 1000000000, over epcli's limit of 1024"),
    ],
)
def test_huge_depth_is_refused_before_building_anything(saved: Path, rewrite, depth: int, error: type, phrase: str):
    def mutate(m: dict[str, Any]) -> None:
        m["ep_layers"]["4"]["config"]["depth"] = depth
        m["architecture"]["children"][4]["module"]["config"]["depth"] = depth

    rewrite(saved, metadata=mutate)
    _expect(error, saved, "layer '4'", phrase)


# ---- tensors ------------------------------------------------------------------------------------
def test_tensor_shape_disagrees_with_the_config(saved: Path, rewrite):
    rewrite(saved, state=lambda s: s.update({"4.layer_dict.1.0.weight": torch.zeros(10, 9)}))
    _expect(ShapeMismatchError, saved, "layer '4'", "4.layer_dict.1.0.weight", "shape [10, 9]", "expected [10, 10]")


def test_config_disagrees_with_the_tensors(saved: Path, rewrite):
    def mutate(m: dict[str, Any]) -> None:
        m["ep_layers"]["7"]["config"]["out_features"] = 4
        m["architecture"]["children"][7]["module"]["config"]["out_features"] = 4

    rewrite(saved, metadata=mutate)
    _expect(ShapeMismatchError, saved, "layer '7'", "7.layer_dict.0.0.weight has shape [3, 5], expected [4, 5]")


def test_missing_layer_tensor(saved: Path, rewrite):
    rewrite(saved, state=lambda s: s.pop("7.layer_dict.0.0.bias"))
    _expect(CheckpointError, saved, "layer '7'", "missing keys ['7.layer_dict.0.0.bias']")


def test_unexpected_tensor(saved: Path, rewrite):
    rewrite(saved, state=lambda s: s.update({"5.extra": torch.zeros(2)}))
    _expect(CheckpointError, saved, "embedded architecture does not match", "unexpected keys ['5.extra']")


def test_integer_weights(saved: Path, rewrite):
    rewrite(saved, state=lambda s: s.update({"7.layer_dict.0.0.weight": torch.zeros(3, 5, dtype=torch.int64)}))
    _expect(ShapeMismatchError, saved, "7.layer_dict.0.0.weight has dtype torch.int64")


@pytest.mark.parametrize(("value", "phrase"), [(float("nan"), "1 NaN, 0 Inf"), (float("inf"), "0 NaN, 1 Inf"),
                                               (float("-inf"), "0 NaN, 1 Inf")])
def test_non_finite_weights(saved: Path, rewrite, value: float, phrase: str):
    def poison(state: dict[str, torch.Tensor]) -> None:
        state["4.layer_dict.0.0.weight"][2, 3] = value

    rewrite(saved, state=poison)
    _expect(CheckpointError, saved, "'4.layer_dict.0.0.weight'", "non-finite values", phrase)


def test_non_finite_model_is_refused_on_save(tmp_path: Path, make_model):
    model, shape = make_model("single")
    with torch.no_grad():
        model.layer_dict["1"][1].running_var[0] = float("nan")
    with pytest.raises(CheckpointError, match=r"'layer_dict.1.1.running_var'.*non-finite"):
        epcli.save_checkpoint(model, tmp_path / "m.pt", input_shape=shape)
    assert not list(tmp_path.iterdir())


def test_collapsed_file_with_a_wrong_bias_shape(tmp_path: Path, make_model, rewrite):
    model, shape = make_model("mlp")
    source = epcli.load_checkpoint(epcli.save_checkpoint(model, tmp_path / "x.pt", input_shape=shape))
    path = epcli.save_collapsed_checkpoint(source, tmp_path / "c.safetensors")
    rewrite(path, state=lambda s: s.update({"4.bias": torch.zeros(8)}))
    _expect(ShapeMismatchError, path, "layer '4'", "4.bias has shape [8], expected [7]")


def test_collapsed_file_whose_architecture_still_has_ep_layers(tmp_path: Path, make_model, rewrite):
    model, shape = make_model("mlp")
    source = epcli.load_checkpoint(epcli.save_checkpoint(model, tmp_path / "x.pt", input_shape=shape))
    path = epcli.save_collapsed_checkpoint(source, tmp_path / "c.pt")
    rewrite(path, metadata=lambda m: m.update(architecture=source.architecture))
    _expect(CheckpointError, path, "embedded architecture has EP layers at ['1', '4', '7']", "metadata lists []")


def test_unsupported_suffix_names_the_file_once(tmp_path: Path) -> None:
    path = tmp_path / "notes.md"
    path.write_text("not a checkpoint")
    with pytest.raises(CheckpointError) as caught:
        epcli.load_checkpoint(path)
    assert str(caught.value).count(str(path)) == 1
    assert "unsupported file suffix '.md'" in str(caught.value)

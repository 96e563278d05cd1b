"""A generated corpus of hostile files: each is refused fast, in bounded memory, by a typed error naming file and field.

One test per case found by an adversarial campaign against the readers. The files are made
here (no stored binaries); cases that could blow up (minutes, gigabytes) run in one
child process with a timeout and report their time and peak memory.
"""

from __future__ import annotations

import io
import json
import pickle
import re
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

import epcli
from epcli import CheckpointError, ConfigError, EpcliError, limits
from epcli.checkpoint import architecture
from epcli.jobs.collapse import collapse_file
from epcli.storage import safetensors_io

ESC = "\x1b[2J\x1b]0;owned\x07"


# ---- helpers ------------------------------------------------------------------------------------
def _expect(error: type[EpcliError], path: Path, *phrases: str) -> str:
    """Loading ``path`` raises ``error`` naming the file and saying each phrase; returns the message."""
    with pytest.raises(error) as info:
        epcli.load_checkpoint(path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    for phrase in phrases:
        assert phrase in message, f"{phrase!r} not in {message!r}"
    assert "\x1b" not in message and "\x07" not in message
    return message


_SAVED: dict[tuple[str, str], bytes] = {}
"""Valid checkpoints by (model, suffix), saved once per session: each test gets its own copy to spoil."""


def _save(tmp_path: Path, make_model, name: str, suffix: str = ".safetensors") -> Path:
    path = tmp_path / f"{name}{suffix}"
    if (name, suffix) not in _SAVED:
        model, shape = make_model(name)
        _SAVED[name, suffix] = epcli.save_checkpoint(model, path, input_shape=shape).read_bytes()
    path.write_bytes(_SAVED[name, suffix])
    return path


def _metadata(path: Path) -> dict[str, Any]:
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["epcli"])


def _write_pt(path: Path, metadata: str, state: dict[str, Tensor]) -> Path:
    torch.save({"epcli_metadata": metadata, "state_dict": state}, path)
    return path


def _rezip(path: Path, change: dict[str, bytes]) -> None:
    """Rewrite a torch zip archive with the records whose names end in a key of ``change`` replaced."""
    source = zipfile.ZipFile(io.BytesIO(path.read_bytes()))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as target:
        for info in source.infolist():
            data = next((new for end, new in change.items() if info.filename.endswith(end)), None)
            target.writestr(info, source.read(info) if data is None else data)
    path.write_bytes(out.getvalue())


def _nested_tuple_pickle(depth: int, *, as_key: bool) -> bytes:
    """A pickle of ``{"epcli_metadata": "{}", "state_dict": {...}}`` with a tuple nested ``depth`` deep, shared.

    Hand-made: Python could not build the dict itself (hashing the key takes 2**depth steps).
    """
    nest = b")q\x000"  # EMPTY_TUPLE, BINPUT 0, POP
    for level in range(depth):
        nest += b"h" + bytes([level]) + b"h" + bytes([level]) + b"\x86q" + bytes([level + 1]) + b"0"  # (t, t)
    nest += b"h" + bytes([depth])
    key, value = (nest, b"X\x01\x00\x00\x00x") if as_key else (b"X\x01\x00\x00\x00k", nest)
    return (
        b"\x80\x02}(X\x0e\x00\x00\x00epcli_metadataX\x02\x00\x00\x00{}X\x0a\x00\x00\x00state_dict}"
        + key + value + b"su."
    )


# ---- .pt: storages, strides, pickles ------------------------------------------------------------
def test_pt_storage_record_shorter_than_its_tensor_is_refused(tmp_path: Path, make_model):
    path = _save(tmp_path, make_model, "mlp", ".pt")
    records = zipfile.ZipFile(path).infolist()
    largest = max((r for r in records if "/data/" in r.filename), key=lambda r: r.file_size)
    _rezip(path, {largest.filename: zipfile.ZipFile(path).read(largest)[:16]})
    key = largest.filename.rsplit("/", 1)[1]
    message = _expect(CheckpointError, path, f"storage record '{key}' (holding '", "') holds 16 bytes",
                      f"claim {largest.file_size}")
    holder = message.split("(holding '")[1].split("'")[0]
    # torch itself (mmap) builds that tensor from the 16 bytes and whatever follows them: the bug refused here
    assert torch.load(path, weights_only=True, mmap=True)["state_dict"][holder].nbytes == largest.file_size
    with pytest.raises(CheckpointError, match="read past the record"):
        epcli.open_checkpoint(path)


def test_pt_stride_zero_expansion_bomb_is_refused(tmp_path: Path):
    path = _write_pt(tmp_path / "bomb.pt", "{}", {"w": torch.zeros(1).expand(8192, 8192)})  # 256 MB of one float
    assert path.stat().st_size < 4096
    _expect(CheckpointError, path, "'state_dict' entry 'w' is a strided view", "strides [0, 0]")


def test_pt_overlapping_views_are_refused_and_exact_ties_bounded(tmp_path: Path):
    base = torch.arange(8.0)
    path = _write_pt(tmp_path / "overlap.pt", "{}", {"a": base[0:6], "b": base[2:8]})
    _expect(CheckpointError, path, "'a' and 'b' overlap in one storage")
    tied = {f"t{i}": base for i in range(5)}  # five keys, one storage: more than MAX_TIED_EXPANSION
    _expect(CheckpointError, _write_pt(tmp_path / "tied.pt", "{}", tied), "more than 4 times over")


def test_pt_empty_tensor_name_is_refused(tmp_path: Path):
    _expect(CheckpointError, _write_pt(tmp_path / "e.pt", "{}", {"": torch.zeros(2)}), "non-empty string")


def test_pt_nested_tuple_value_is_refused(tmp_path: Path):
    path = _write_pt(tmp_path / "t.pt", "{}", {"w": torch.zeros(2)})
    _rezip(path, {"data.pkl": _nested_tuple_pickle(13, as_key=False)})
    _expect(CheckpointError, path, "a tuple of more than 4096 nested items")


# ---- safetensors headers --------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [[0, 2**63], [0, 2**70], [2**41]])
def test_shapes_beyond_the_limits_are_refused(tmp_path: Path, shape: list[int]):
    header = {"__metadata__": {"epcli": "{}"}, "w": {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}}
    text = json.dumps(header).encode()
    path = tmp_path / "shape.safetensors"
    path.write_bytes(len(text).to_bytes(8, "little") + text)
    _expect(CheckpointError, path, "safetensors header entry 'w'", "over epcli's limit")


def test_tensor_count_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(safetensors_io, "MAX_TENSORS", 50)
    tensors = {f"t{i}": torch.zeros(0) for i in range(51)}
    path = tmp_path / "many.safetensors"
    save_file(tensors, str(path), metadata={"epcli": "{}"})
    _expect(CheckpointError, path, "the number of tensors in the safetensors header is 51, over epcli's limit of 50")


def test_duplicate_key_in_epcli_metadata_is_refused(tmp_path: Path, make_model):
    path = _save(tmp_path, make_model, "mlp")
    text = json.dumps(_metadata(path))
    with safe_open(str(path), "pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    save_file(tensors, str(path), metadata={"epcli": text[:-1] + ', "kind": "collapsed"}'})
    _expect(CheckpointError, path, "epcli metadata repeats the key 'kind'")


def test_file_content_in_messages_is_bounded_and_escaped(tmp_path: Path, make_model):
    path = _save(tmp_path, make_model, "mlp")
    document = _metadata(path)
    document["format"] = ESC + "x" * 10**6
    save_file({"w": torch.zeros(1)}, str(path), metadata={"epcli": json.dumps(document)})
    message = _expect(
        CheckpointError, path, "metadata format is '\\x1b[2J\\x1b]0;owned\\x07xxx", f"({len(ESC) + 10**6} characters)"
    )
    assert len(message) < len(str(path)) + 400


def test_control_characters_in_a_shard_name_never_reach_a_message(tmp_path: Path, make_model):
    path = _save(tmp_path, make_model, "mlp")
    index = tmp_path / "model.safetensors.index.json"
    weight_map = {key: f"{ESC}.safetensors" for key in _metadata_keys(path)}
    index.write_text(json.dumps({"metadata": {"epcli": "{}"}, "weight_map": weight_map}))
    _expect(CheckpointError, index, "shard '\\x1b[2J\\x1b]0;owned\\x07.safetensors'", "is missing beside the index")


def _metadata_keys(path: Path) -> list[str]:
    with safe_open(str(path), "pt") as f:
        return list(f.keys())


# ---- metadata: config numbers, shapes, layer paths ----------------------------------------------------
@pytest.mark.parametrize(
    ("model", "layer", "field", "value", "phrase"),
    [
        ("mlp", "1", "depth", 10**9, "config depth is 1000000000, over epcli's limit of 1024"),
        ("mlp", "1", "in_features", 2**40, "config in_features is 1099511627776, over epcli's limit of 1048576"),
        ("mlp", "1", "in_features", 10**30, "config in_features is 1000000000000000000000000000000, over"),
        ("mlp", "1", "out_features", 2**62, "config out_features is 4611686018427387904, over"),
        ("mlp", "1", "width", 1e300, "config width is 1e+300, over epcli's limit of 1048576"),
        ("mlp", "4", "width", 2.0**19, "its nodes are up to 3670016 features wide"),  # hidden = int(7 * width)
        ("mlp", "1", "residual_intervals", [2] * 2000, "config residual_intervals: the list length is 2000"),
        ("cnn", "0", "padding", 500, "config padding is 500, over epcli's limit of 256"),
        ("cnn", "0", "padding", 10**9, "config padding is 1000000000"),
        ("cnn", "0", "stride", 10**30, "config stride is 1000000000000000000000000000000"),
        ("cnn", "0", "kernel_sizes", [3, 1, 2**20], "config kernel_sizes is 1048576, over epcli's limit of 256"),
        ("cnn", "0", "dilation", [1, 10**9], "config dilation is 1000000000, over epcli's limit of 256"),
        ("cnn", "0", "groups", 2**62, "config groups is 4611686018427387904, over epcli's limit of 1048576"),
        ("cnn", "0", "future_field", [[1, 2], [3, 2**40]], "config future_field is 1099511627776"),  # any new field
    ],
)
def test_config_numbers_beyond_the_limits(tmp_path: Path, make_model, rewrite, model, layer, field, value, phrase):
    path = _save(tmp_path, make_model, model)
    rewrite(path, metadata=lambda m: m["ep_layers"][layer]["config"].update({field: value}))
    _expect(ConfigError, path, f"layer '{layer}': {phrase}")


def test_the_same_bounds_hold_for_configs_in_the_architecture(tmp_path: Path, make_model, rewrite):
    path = _save(tmp_path, make_model, "cnn")
    rewrite(path, metadata=lambda m: m["architecture"]["children"][0]["module"]["config"].update({"stride": 10**30}))
    _expect(ConfigError, path, "architecture node '0': config stride is 10000000000")


@pytest.mark.parametrize("where", ["input_shape", "layer"])
def test_input_shapes_beyond_the_limits(tmp_path: Path, make_model, rewrite, where: str):
    path = _save(tmp_path, make_model, "cnn")

    def mutate(m: dict[str, Any]) -> None:
        target = m if where == "input_shape" else m["ep_layers"]["0"]
        target["input_shape"] = [2, 2**70, 9]

    rewrite(path, metadata=mutate)
    _expect(CheckpointError, path, "[2, 1180591620717411303424, 9] has more than 67108864 elements per sample")


def test_a_root_ep_layer_has_path_empty_and_is_not_refused(tmp_path: Path, make_model):
    path = _save(tmp_path, make_model, "single")
    assert list(epcli.load_checkpoint(path).ep_layers) == [""]


def test_an_empty_layer_path_beside_others_is_a_typed_error(tmp_path: Path, make_model, rewrite):
    path = _save(tmp_path, make_model, "mlp")
    rewrite(path, metadata=lambda m: m["ep_layers"].update({"": m["ep_layers"]["7"]}))
    _expect(CheckpointError, path, "layer '1' (EPLinear): its config (depth 4) needs at least 4 weight tensors")


def test_kind_collapsed_on_expanded_tensors_is_a_typed_error(tmp_path: Path, make_model, rewrite):
    path = _save(tmp_path, make_model, "mlp")
    rewrite(path, metadata=lambda m: m.update({"kind": "collapsed"}))
    _expect(CheckpointError, path, "layer '1' (EPLinear): missing keys ['1.weight', '1.bias']")


# ---- the embedded architecture --------------------------------------------------------------------
@pytest.mark.parametrize("name", ["__class__", "training", "forward", "_modules", f"a{ESC}"])
def test_child_names_that_are_not_module_names(tmp_path: Path, make_model, rewrite, name: str):
    path = _save(tmp_path, make_model, "mlp")
    rewrite(path, metadata=lambda m: m["architecture"]["children"][2].update({"name": name}))
    _expect(CheckpointError, path, "architecture node '<model>': child 2 has an invalid name")


@pytest.mark.parametrize(
    ("index", "node", "phrase"),
    [
        (2, {"type": "Softmax", "args": {"dim": 10**30}}, "dim must be an int in [-16, 16]"),
        (2, {"type": "Flatten", "args": {"start_dim": 2**62, "end_dim": -1}}, "start_dim must be an int in [-16, 16]"),
        (2, {"type": "Linear", "args": {"in_features": 2**40, "out_features": 1, "bias": True}}, "in_features must be"),
        (0, {"type": "Unflatten", "args": {"dim": 1, "unflattened_size": [3, 5]}},
         "fails on its own input_shape [3, 4]"),
        (2, {"type": "MaxPool2d", "args": {"kernel_size": 2, "stride": 10**9, "padding": 0, "dilation": 1,
                                           "ceil_mode": False, "return_indices": False}}, "stride must be an int in"),
    ],
)
def test_module_arguments_and_forward(tmp_path: Path, make_model, rewrite, index: int, node: dict[str, Any], phrase):
    path = _save(tmp_path, make_model, "mlp")
    rewrite(path, metadata=lambda m: m["architecture"]["children"].insert(index, {"name": "x", "module": node}))
    _expect(CheckpointError, path, phrase)


def test_node_count_limit(tmp_path: Path, make_model, rewrite, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(architecture, "MAX_ARCHITECTURE_NODES", 20)
    path = _save(tmp_path, make_model, "mlp")
    extra = [{"name": f"i{k}", "module": {"type": "Identity", "args": {}}} for k in range(20)]
    rewrite(path, metadata=lambda m: m["architecture"]["children"].extend(extra))
    _expect(CheckpointError, path, "over epcli's limit of 20")


# ---- numbers from files ------------------------------------------------------------------------------
def test_a_batch_norm_fold_that_overflows_names_the_layer_and_writes_nothing(tmp_path: Path, make_model, rewrite):
    path = _save(tmp_path, make_model, "mlp")

    def zero_variance(state: dict[str, Tensor]) -> None:
        for key, value in state.items():
            if key.startswith("1.") and key.endswith("running_var"):
                value.zero_()

    def tiny_eps(m: dict[str, Any]) -> None:
        m["ep_layers"]["1"]["config"]["bn_eps"] = 1e-300
        m["architecture"]["children"][1]["module"]["config"]["bn_eps"] = 1e-300

    rewrite(path, metadata=tiny_eps, state=zero_variance)
    out = tmp_path / "out.safetensors"
    source = re.escape(str(path))
    with pytest.raises(CheckpointError, match=rf"^{source}: layer '1': the collapsed weight overflows torch\.float32"):
        collapse_file(path, out, model_check=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.safetensors"]
    with pytest.raises(CheckpointError, match=r"layer '1': the collapsed weight overflows .*running_var \+ eps"):
        epcli.collapse_state_dict(epcli.load_checkpoint(path).state_dict, epcli.load_checkpoint(path).ep_layers)


def test_float8_weights_are_checked_for_finiteness(tmp_path: Path, make_model, rewrite):
    path = _save(tmp_path, make_model, "mlp")
    key = "7.layer_dict.0.0.weight"
    rewrite(path, state=lambda s: s.update({key: s[key].to(torch.float8_e4m3fn)}))
    assert epcli.load_checkpoint(path).state_dict[key].dtype == torch.float8_e4m3fn  # readable, and checked

    def poison(state: dict[str, Tensor]) -> None:
        weight = state[key].float()
        weight[0, 0] = float("nan")
        state[key] = weight.to(torch.float8_e4m3fn)

    rewrite(path, state=poison)
    _expect(CheckpointError, path, f"tensor '{key}'", "(1 NaN, 0 Inf)")


# ---- blow-ups: bounded time and memory, in a child process --------------------------------------------
_CHILD = r"""
import json, resource, sys, time
import epcli
import epcli.checkpoint.load  # imports torch: not part of any case's time
for path in sys.argv[1:]:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    try:
        epcli.load_checkpoint(path)
        outcome = "accepted"
    except epcli.EpcliError as e:
        outcome = type(e).__name__ + ": " + str(e)
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
    print(json.dumps({"seconds": time.perf_counter() - start, "grown": grown, "outcome": outcome}), flush=True)
"""


def _bombs(tmp_path: Path, make_model, rewrite) -> dict[str, tuple[Path, str]]:
    """name -> (file, phrase of its error): the cases that took minutes and gigabytes before the limits."""
    bombs: dict[str, tuple[Path, str]] = {}

    tuples = _write_pt(tmp_path / "tuple-key.pt", "{}", {"w": torch.zeros(2)})
    _rezip(tuples, {"data.pkl": _nested_tuple_pickle(40, as_key=True)})  # 2**40 steps to hash or print
    bombs["nested shared tuple as a dict key"] = (tuples, "a tuple of more than 4096 nested items")

    entry = '{"dtype":"F32","shape":[0],"data_offsets":[0,0]}'
    entries = ",".join(f'"t{i}":{entry}' for i in range(limits.MAX_TENSORS + 1))
    text = ('{"__metadata__":{"epcli":"{}"},' + entries + "}").encode()
    many = tmp_path / "many.safetensors"
    many.write_bytes(len(text).to_bytes(8, "little") + text)
    bombs[f"{limits.MAX_TENSORS + 1} zero-size tensors"] = (many, "tensors in the safetensors header is 262145, over")

    huge = tmp_path / "huge-metadata.safetensors"
    save_file({"w": torch.zeros(1)}, str(huge), metadata={"epcli": json.dumps({"format": "x" * (17 * 2**20)})})
    bombs["a 17 MB metadata string"] = (huge, "over epcli's limit of 16777216")

    children = _save(tmp_path, make_model, "mlp")
    identity = {"type": "Identity", "args": {}}
    extra = [{"name": f"i{k}", "module": identity} for k in range(limits.MAX_ARCHITECTURE_NODES)]
    rewrite(children, metadata=lambda m: m["architecture"]["children"].extend(extra))
    bombs["65536 Identity children"] = (children, "the number of children is 65544, over epcli's limit of 65536")

    pool = _save(tmp_path, make_model, "cnn", ".pt")
    rewrite(pool, metadata=lambda m: m["architecture"]["children"][5]["module"]["args"].update(
        {"output_size": [10**6, 10**6]}))
    bombs["AdaptiveAvgPool2d(10**6, 10**6)"] = (pool, "AdaptiveAvgPool2d) [6, 1000000, 1000000] has more than")

    bomb = _write_pt(tmp_path / "stride0.pt", "{}", {"w": torch.zeros(1).expand(16384, 16384)})  # 1 GiB claimed
    bombs["stride-0 tensor of 1 GiB in 2 KB"] = (bomb, "is a strided view")
    return bombs


def test_former_blow_ups_fail_fast_in_bounded_memory(tmp_path: Path, make_model, rewrite):
    bombs = _bombs(tmp_path, make_model, rewrite)
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, *(str(path) for path, _ in bombs.values())],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr
    results = [json.loads(line) for line in done.stdout.splitlines()]
    for (name, (_, phrase)), result in zip(bombs.items(), results, strict=True):
        assert phrase in result["outcome"], (name, result["outcome"][:500])
        assert result["outcome"].startswith("CheckpointError"), name
        assert result["seconds"] < 30, (name, result)  # were 100 s to 600 s (killed); ~0.01-1 s now
        assert result["grown"] < 1.5 * 2**30, (name, result)  # the 17 MB and 20 MB files are parsed, nothing more


def test_the_pickle_scan_is_bounded_without_the_child(tmp_path: Path):
    """Tuple keys and big nested tuples are refused by the scan alone (unpickling would take 2**40 steps)."""
    from epcli.storage.pt_archive import scan_pickle

    with pytest.raises(CheckpointError, match="uses a tuple as a dict key"):
        scan_pickle(_nested_tuple_pickle(5, as_key=True))
    with pytest.raises(CheckpointError, match="a tuple of more than 4096 nested items"):
        scan_pickle(_nested_tuple_pickle(40, as_key=True))
    assert pickle.loads(_nested_tuple_pickle(3, as_key=True))["state_dict"]  # the hand-made pickle is valid

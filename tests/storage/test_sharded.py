"""Sharded safetensors output: file names, the index, loading, errors, and clean-up of an earlier output.

A sharded checkpoint is written with ``CheckpointWriter(..., max_shard_bytes=...)`` from
the tensors and metadata of an ordinary save of the same model, so the unsharded
file is the reference for what loading the shards must give.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

import epcli
from epcli import CheckpointError
from epcli.checkpoint.load import load_checkpoint, open_checkpoint
from epcli.storage.sharded import (
    SHARD_OF_KEY,
    index_path,
    is_index,
    listed_shards,
    plan_shards,
    read_index,
    shard_paths,
    sharded_base,
)
from epcli.storage.source import TensorInfo
from epcli.storage.writer import CheckpointWriter, output_files, stale_files

INPUT_SHAPE = (8,)


@pytest.fixture
def model() -> nn.Module:
    torch.manual_seed(1234)
    return nn.Sequential(epcli.EPLinear(8, 6, depth=3), nn.ReLU(), epcli.EPLinear(6, 4, depth=2)).eval()


@pytest.fixture
def reference(tmp_path: Path, model: nn.Module) -> Path:
    """The unsharded save of ``model``, in its own directory."""
    directory = tmp_path / "reference"
    directory.mkdir()
    return epcli.save_checkpoint(model, directory / "model.safetensors", input_shape=INPUT_SHAPE)


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "out"
    directory.mkdir()
    return directory


def _layout(model: nn.Module) -> dict[str, TensorInfo]:
    return {key: TensorInfo(tuple(value.shape), value.dtype) for key, value in model.state_dict().items()}


def _sizes(model: nn.Module) -> dict[str, int]:
    return {key: info.nbytes for key, info in _layout(model).items()}


def _write(
    reference: Path, model: nn.Module, output: Path, limit: int | None, *, remove_stale: bool = True
) -> tuple[Path, tuple[Path, ...]]:
    """Write ``reference``'s tensors and metadata to ``output`` in state-dict order (added in reverse)."""
    metadata = open_checkpoint(reference).source.metadata
    state = load_file(str(reference))
    with CheckpointWriter(output, _layout(model), max_shard_bytes=limit, remove_stale=remove_stale) as writer:
        for key in reversed(list(state)):
            writer.add(key, state[key])
        return writer.commit(metadata), writer.files


def _limit_for(model: nn.Module, shards: int) -> int:
    """The smallest shard limit that cuts ``model``'s tensors into exactly ``shards`` files."""
    sizes = _sizes(model)
    limit = next(n for n in range(1, sum(sizes.values()) + 2) if len(plan_shards(sizes, n)) == shards)
    return limit


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


def _edit_json(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    document = json.loads(path.read_text())
    edit(document)
    path.write_text(json.dumps(document))


# ---- names and planning ------------------------------------------------------------------------
def test_names():
    output = Path("dir/model.safetensors")
    assert [p.as_posix() for p in shard_paths(output, 3)] == [
        "dir/model-00001-of-00003.safetensors",
        "dir/model-00002-of-00003.safetensors",
        "dir/model-00003-of-00003.safetensors",
    ]
    assert index_path(output).as_posix() == "dir/model.safetensors.index.json"
    assert sharded_base(index_path(output)) == output
    assert is_index(Path("a/B.SAFETENSORS.INDEX.JSON")) and not is_index(output)


@pytest.mark.parametrize(
    ("sizes", "limit", "expected"),
    [
        ({"a": 4, "b": 4, "c": 4}, 8, [["a", "b"], ["c"]]),
        ({"a": 5, "b": 5, "c": 5}, 10, [["a", "b"], ["c"]]),  # an exact fit stays
        ({"a": 4, "b": 20, "c": 4}, 10, [["a"], ["b"], ["c"]]),  # bigger than the limit: alone
        ({"a": 20, "b": 4, "c": 4}, 10, [["a"], ["b", "c"]]),
        ({"a": 20}, 10, [["a"]]),
        ({"a": 0, "b": 10, "c": 0, "d": 1}, 10, [["a", "b", "c"], ["d"]]),  # empty tensors never start a shard
        ({"z": 1, "y": 1, "x": 1}, 1, [["z"], ["y"], ["x"]]),  # order kept, not sorted
        ({"a": 3, "b": 3}, 100, [["a", "b"]]),
    ],
)
def test_plan_shards_cuts(sizes: dict[str, int], limit: int, expected: list[list[str]]):
    assert plan_shards(sizes, limit) == expected


@pytest.mark.parametrize("seed", range(20))
def test_plan_shards_properties(seed: int):
    rng = random.Random(seed)
    sizes = {f"k{i}": rng.choice([0, 1, 7, 64, 300, 1000]) for i in range(rng.randint(1, 30))}
    limit = rng.choice([1, 50, 300, 1000, 5000])

    shards = plan_shards(sizes, limit)

    assert [key for shard in shards for key in shard] == list(sizes)  # every key once, in order
    assert all(shards), "an empty shard"
    for shard in shards:
        total = sum(sizes[key] for key in shard)
        assert total <= limit or len(shard) == 1 or sum(sizes[k] for k in shard[1:]) == 0, shard
    for before, after in pairwise(shards):  # greedy: a shard was closed only when the next key did not fit
        assert sum(sizes[key] for key in before) + sizes[after[0]] > limit


# ---- writing -----------------------------------------------------------------------------------
def test_writer_makes_named_shards_and_an_index(reference: Path, model: nn.Module, out_dir: Path):
    output = out_dir / "model.safetensors"
    limit = _limit_for(model, 3)

    written, files = _write(reference, model, output, limit)

    shards = [out_dir / f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
    index = out_dir / "model.safetensors.index.json"
    assert written == index
    assert files == (*shards, index) == output_files(output, _layout(model), limit)
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(p.name for p in files)
    planned = plan_shards(_sizes(model), limit)
    for shard, keys in zip(shards, planned):
        with safe_open(str(shard), "pt") as f:
            assert sorted(f.keys()) == sorted(keys)


def test_the_index_document(reference: Path, model: nn.Module, out_dir: Path):
    index, files = _write(reference, model, out_dir / "model.safetensors", _limit_for(model, 3))
    document = json.loads(index.read_text())
    state = model.state_dict()

    assert set(document) == {"metadata", "weight_map"}
    assert document["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
    with safe_open(str(reference), "pt") as f:
        assert document["metadata"]["epcli"] == f.metadata()["epcli"]
    assert sorted(document["weight_map"]) == sorted(state)
    for key, name in document["weight_map"].items():
        with safe_open(str(out_dir / name), "pt") as f:
            assert key in list(f.keys())
    assert sorted(set(document["weight_map"].values())) == [p.name for p in files[:-1]]


def test_each_shard_is_an_ordinary_safetensors_file(reference: Path, model: nn.Module, out_dir: Path):
    _, files = _write(reference, model, out_dir / "model.safetensors", _limit_for(model, 4))
    merged: dict[str, torch.Tensor] = {}
    for shard in files[:-1]:
        merged.update(load_file(str(shard)))
        with safe_open(str(shard), "pt") as f:
            assert f.metadata() == {"format": "pt", SHARD_OF_KEY: "model.safetensors.index.json"}
    expected = model.state_dict()
    assert sorted(merged) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(merged[key], value), key


@pytest.mark.parametrize("shards", [2, 3, 10])
def test_loading_the_index_equals_loading_the_single_file(
    reference: Path, model: nn.Module, out_dir: Path, shards: int
):
    index, files = _write(reference, model, out_dir / "model.safetensors", _limit_for(model, shards))
    assert len(files) == shards + 1

    sharded = load_checkpoint(index)
    single = load_checkpoint(reference)

    assert sharded.path == index
    assert list(sharded.state_dict) == list(single.state_dict)
    for key, value in single.state_dict.items():
        assert sharded.state_dict[key].dtype == value.dtype and torch.equal(sharded.state_dict[key], value), key
    assert sharded.metadata == single.metadata and sharded.ep_layers == single.ep_layers
    x = torch.randn(5, *INPUT_SHAPE)
    with torch.no_grad():
        assert torch.equal(sharded.model(x), single.model(x))
        assert torch.equal(sharded.model(x), model(x))
    opened = open_checkpoint(index)
    assert opened.files[0] == index and sorted(opened.files[1:]) == sorted(files[:-1])
    assert opened.nbytes == json.loads(index.read_text())["metadata"]["total_size"]


def test_limit_above_the_total_writes_one_file(reference: Path, model: nn.Module, out_dir: Path):
    total = sum(_sizes(model).values())
    output = out_dir / "model.safetensors"
    written, files = _write(reference, model, output, total)
    assert written == output and files == (output,)
    assert [p.name for p in out_dir.iterdir()] == ["model.safetensors"]
    assert load_file(str(output)).keys() == model.state_dict().keys()


def test_pt_output_is_never_sharded(reference: Path, model: nn.Module, out_dir: Path):
    output = out_dir / "model.pt"
    written, files = _write(reference, model, output, 1)
    assert written == output and files == (output,)
    assert [p.name for p in out_dir.iterdir()] == ["model.pt"]
    state = load_checkpoint(output).state_dict
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_upper_case_suffix_gives_a_readable_sharded_checkpoint(reference: Path, model: nn.Module, out_dir: Path):
    """The writer accepts ``.SafeTensors`` (suffixes are case-insensitive); what it writes must load."""
    index, files = _write(reference, model, out_dir / "model.SafeTensors", _limit_for(model, 2))
    assert len(files) == 3
    loaded = load_checkpoint(index)
    assert all(torch.equal(loaded.state_dict[k], v) for k, v in model.state_dict().items())


# ---- reading a single shard, and bad indexes ---------------------------------------------------
@pytest.fixture
def sharded(reference: Path, model: nn.Module, out_dir: Path) -> tuple[Path, list[Path]]:
    """An index and its 3 shards."""
    index, files = _write(reference, model, out_dir / "model.safetensors", _limit_for(model, 3))
    return index, list(files[:-1])


def _expect(path: Path, *patterns: str) -> str:
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    for pattern in patterns:
        assert pattern in message, f"{pattern!r} not in {message!r}"
    return message


def test_a_single_shard_names_its_index(sharded: tuple[Path, list[Path]]):
    index, shards = sharded
    for shard in shards:
        _expect(shard, "is one shard of a sharded checkpoint", f"open its index {index.name!r} instead")
        with pytest.raises(CheckpointError, match="one shard of a sharded checkpoint"):
            open_checkpoint(shard)


def test_a_missing_shard(sharded: tuple[Path, list[Path]]):
    index, shards = sharded
    with safe_open(str(shards[1]), "pt") as f:
        held = sorted(f.keys())
    shards[1].unlink()
    message = _expect(index, f"shard '{shards[1].name}'", "is missing beside the index", "copy every shard file")
    assert repr(held[0]) in message


def _key_of(shard: Path) -> str:
    with safe_open(str(shard), "pt") as f:
        return min(f.keys())


INDEX_EDITS: dict[str, tuple[Callable[[dict[str, Any], list[Path]], None], str]] = {
    "a directory in a shard name": (
        lambda d, s: d["weight_map"].update({_key_of(s[0]): "../" + s[0].name}),
        "must name a shard file beside the index (no directories), got '../model-00001-of-00003.safetensors'",
    ),
    "a subdirectory in a shard name": (
        lambda d, s: d["weight_map"].update({_key_of(s[0]): "sub/x.safetensors"}),
        "(no directories), got 'sub/x.safetensors'",
    ),
    "a shard that is not safetensors": (
        lambda d, s: d["weight_map"].update({_key_of(s[0]): "x.bin"}),
        "names 'x.bin'; shards must be .safetensors files",
    ),
    "a shard name that is not a string": (
        lambda d, s: d["weight_map"].update({_key_of(s[0]): 3}),
        "must name a shard file beside the index",
    ),
    "a key mapped to the wrong shard": (
        lambda d, s: d["weight_map"].update({_key_of(s[0]): s[1].name}),
        "which the index does not map to it",
    ),
    "a key the shard does not hold": (
        lambda d, s: d["weight_map"].update({"0.ghost": s[0].name}),
        "the index maps '0.ghost' to shard 'model-00001-of-00003.safetensors', which does not hold it",
    ),
    "a shard holding an unlisted key": (
        lambda d, s: d["weight_map"].pop(_key_of(s[2])),
        "shard 'model-00003-of-00003.safetensors' holds ",
    ),
    "no epcli metadata": (lambda d, s: d["metadata"].pop("epcli"), "has no epcli metadata"),
    "no metadata at all": (lambda d, s: d.pop("metadata"), "has no epcli metadata"),
    "metadata not a string": (lambda d, s: d["metadata"].update(epcli={"kind": "expanded"}), "must be a JSON string"),
    "no weight_map": (lambda d, s: d.pop("weight_map"), 'a "weight_map" object'),
    "weight_map a list": (lambda d, s: d.update(weight_map=[]), 'a "weight_map" object'),
}


@pytest.mark.parametrize("case", INDEX_EDITS)
def test_bad_index(sharded: tuple[Path, list[Path]], case: str):
    index, shards = sharded
    edit, pattern = INDEX_EDITS[case]
    _edit_json(index, lambda document: edit(document, shards))
    _expect(index, pattern)
    with pytest.raises(CheckpointError, match=str(index)):
        open_checkpoint(index)


def test_wrong_shard_names_the_key(sharded: tuple[Path, list[Path]]):
    index, shards = sharded
    key = _key_of(shards[0])
    _edit_json(index, lambda d: d["weight_map"].update({key: shards[1].name}))
    _expect(index, repr(key))


@pytest.mark.parametrize("text", [b"{not json", b"\xff\xfe", b"[1, 2]", b"null"])
def test_index_not_json_object(sharded: tuple[Path, list[Path]], text: bytes):
    index, _ = sharded
    index.write_bytes(text)
    phrase = "shard index is not valid JSON" if text.startswith((b"{", b"\xff")) else "must be a JSON object"
    _expect(index, phrase)


@pytest.mark.parametrize("damage", ["header length", "truncated"])
def test_a_corrupt_shard(sharded: tuple[Path, list[Path]], damage: str):
    index, shards = sharded
    data = bytearray(shards[1].read_bytes())
    if damage == "header length":
        data[:8] = (10**6).to_bytes(8, "little")
    else:
        del data[-3:]
    shards[1].write_bytes(bytes(data))
    _expect(index, f"shard '{shards[1].name}': ", "truncated")


def test_read_index_reads_headers_only(sharded: tuple[Path, list[Path]], model: nn.Module):
    index, shards = sharded
    parsed = read_index(index)
    assert list(parsed.headers) == shards
    assert {key: shard.name for key, shard in parsed.weight_map.items()} == json.loads(index.read_text())["weight_map"]
    assert sorted(k for header in parsed.headers.values() for k in header.tensors) == sorted(model.state_dict())


# ---- an earlier output under the same name -----------------------------------------------------
def test_fewer_shards_replace_more(reference: Path, model: nn.Module, out_dir: Path):
    output = out_dir / "model.safetensors"
    _, old = _write(reference, model, output, _limit_for(model, 3))
    assert len(old) == 4

    _, new = _write(reference, model, output, _limit_for(model, 2))

    assert sorted(p.name for p in out_dir.iterdir()) == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    ]
    assert read_index(index_path(output)).headers.keys() == set(new[:-1])
    assert load_checkpoint(new[-1]).state_dict.keys() == model.state_dict().keys()


def test_a_single_file_replaces_shards(reference: Path, model: nn.Module, out_dir: Path):
    output = out_dir / "model.safetensors"
    _write(reference, model, output, _limit_for(model, 3))

    written, _ = _write(reference, model, output, None)

    assert written == output
    assert [p.name for p in out_dir.iterdir()] == ["model.safetensors"]
    loaded, expected = load_file(str(output)), model.state_dict()
    assert sorted(loaded) == sorted(expected) and all(torch.equal(loaded[k], v) for k, v in expected.items())


def test_shards_replace_a_single_file(reference: Path, model: nn.Module, out_dir: Path):
    output = out_dir / "model.safetensors"
    _write(reference, model, output, None)
    assert output.is_file()

    written, files = _write(reference, model, output, _limit_for(model, 2))

    assert not output.exists()
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(p.name for p in files)
    load_checkpoint(written)


def test_same_shard_names_are_overwritten_in_place(reference: Path, model: nn.Module, out_dir: Path):
    output = out_dir / "model.safetensors"
    _, first = _write(reference, model, output, _limit_for(model, 3))
    before = _snapshot(out_dir)
    _, second = _write(reference, model, output, _limit_for(model, 3))
    assert first == second and _snapshot(out_dir) == before  # byte-identical, nothing removed


def test_clean_up_spares_files_an_edited_index_lists(reference: Path, model: nn.Module, out_dir: Path):
    """Only names of the pattern ``<stem>-0000k-of-0000N.safetensors`` are removed, whatever the old index says."""
    output = out_dir / "model.safetensors"
    index, _ = _write(reference, model, output, _limit_for(model, 3))
    spared = ["other.safetensors", "othermodel-00001-of-00003.safetensors", "model-1-of-3.safetensors"]
    for name in spared:
        (out_dir / name).write_bytes(b"keep me " + name.encode())
    _edit_json(index, lambda d: d["weight_map"].update({f"extra.{i}": name for i, name in enumerate(spared)}))
    assert listed_shards(index) == [out_dir / f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]

    _write(reference, model, output, _limit_for(model, 2))

    for name in spared:
        assert (out_dir / name).read_bytes() == b"keep me " + name.encode()
    assert not any((out_dir / f"model-0000{k}-of-00003.safetensors").exists() for k in (1, 2, 3))


def test_clean_up_survives_an_unreadable_old_index(reference: Path, model: nn.Module, out_dir: Path):
    output = out_dir / "model.safetensors"
    index, _ = _write(reference, model, output, _limit_for(model, 3))
    index.write_bytes(b"\x00garbage")
    assert listed_shards(index) == []

    written, _ = _write(reference, model, output, None)

    assert written == output and not index.exists()
    assert load_checkpoint(output).state_dict.keys() == model.state_dict().keys()


def test_stale_files_lists_what_a_write_would_leave_behind(reference: Path, model: nn.Module, out_dir: Path):
    output = out_dir / "model.safetensors"
    layout = _layout(model)
    _, old = _write(reference, model, output, _limit_for(model, 3))
    two = output_files(output, layout, _limit_for(model, 2))

    assert set(stale_files(output, two)) == set(old[:-1])  # the old index is overwritten, its shards are not
    assert set(stale_files(output, (output,))) == set(old)
    assert stale_files(output, old) == ()
    assert stale_files(out_dir / "other.safetensors", (out_dir / "other.safetensors",)) == ()
    assert stale_files(out_dir / "model.pt", (out_dir / "model.pt",)) == ()


def test_without_remove_stale_earlier_files_stay(reference: Path, model: nn.Module, out_dir: Path):
    output = out_dir / "model.safetensors"
    _, old = _write(reference, model, output, _limit_for(model, 3))
    old_shards = {path.name: path.read_bytes() for path in old[:-1]}

    written, _ = _write(reference, model, output, None, remove_stale=False)

    assert written == output and output.is_file()
    assert {name: (out_dir / name).read_bytes() for name in old_shards} == old_shards
    assert index_path(output).is_file()


# ---- failure part-way ---------------------------------------------------------------------------
@pytest.mark.parametrize("earlier", ["nothing", "single", "sharded"])
@pytest.mark.parametrize("limit_shards", [None, 3])
def test_failure_mid_write_changes_nothing(
    reference: Path, model: nn.Module, out_dir: Path, earlier: str, limit_shards: int | None
):
    output = out_dir / "model.safetensors"
    if earlier != "nothing":
        _write(reference, model, output, None if earlier == "single" else _limit_for(model, 2))
    (out_dir / "unrelated.txt").write_text("x")
    before = _snapshot(out_dir)
    limit = None if limit_shards is None else _limit_for(model, limit_shards)
    state = model.state_dict()
    first_shard = plan_shards(_sizes(model), limit or 10**9)[0]

    with (
        pytest.raises(RuntimeError, match="interrupted"),
        CheckpointWriter(output, _layout(model), max_shard_bytes=limit, remove_stale=True) as writer,
    ):
        for key in first_shard:
            writer.add(key, state[key])
        if limit is not None:  # a complete shard went to a temp file already: the test has something to undo
            assert len(list(out_dir.iterdir())) == len(before) + 1
        raise RuntimeError("interrupted")

    assert _snapshot(out_dir) == before


def test_commit_with_missing_tensors_changes_nothing(reference: Path, model: nn.Module, out_dir: Path):
    output = out_dir / "model.safetensors"
    _write(reference, model, output, _limit_for(model, 3))
    before = _snapshot(out_dir)
    state = model.state_dict()
    keys = list(state)
    with CheckpointWriter(output, _layout(model), max_shard_bytes=_limit_for(model, 2), remove_stale=True) as writer:
        for key in keys[:-1]:
            writer.add(key, state[key])
        with pytest.raises(CheckpointError, match=rf"tensors \[{keys[-1]!r}\] were never given; nothing was written"):
            writer.commit("{}")
    assert _snapshot(out_dir) == before


@pytest.mark.parametrize(
    ("key", "tensor", "pattern"),
    [
        ("nope", torch.zeros(1), "tensor 'nope' is not part of the checkpoint being written"),
        ("0.layer_dict.0.0.bias", torch.zeros(5), r"is \[5\] torch.float32, expected \[6\] torch.float32"),
        ("0.layer_dict.0.0.bias", torch.zeros(6, dtype=torch.float64), "expected \\[6\\] torch.float32"),
    ],
)
def test_writer_refuses_a_tensor_not_in_the_layout(
    model: nn.Module, out_dir: Path, key: str, tensor: torch.Tensor, pattern: str
):
    with (
        CheckpointWriter(out_dir / "m.safetensors", _layout(model), max_shard_bytes=100) as writer,
        pytest.raises(CheckpointError, match=pattern),
    ):
        writer.add(key, tensor)
    assert list(out_dir.iterdir()) == []


def test_writer_refuses_a_tensor_twice(model: nn.Module, out_dir: Path):
    state = model.state_dict()
    with CheckpointWriter(out_dir / "m.safetensors", _layout(model)) as writer:
        writer.add("0.layer_dict.0.0.bias", state["0.layer_dict.0.0.bias"])
        with pytest.raises(CheckpointError, match="'0.layer_dict.0.0.bias' was given twice"):
            writer.add("0.layer_dict.0.0.bias", state["0.layer_dict.0.0.bias"])


@pytest.mark.parametrize("limit", [0, -5])
def test_writer_refuses_a_limit_below_one_byte(model: nn.Module, out_dir: Path, limit: int):
    with pytest.raises(CheckpointError, match=f"at least 1 byte, got {limit}"):
        CheckpointWriter(out_dir / "m.safetensors", _layout(model), max_shard_bytes=limit)

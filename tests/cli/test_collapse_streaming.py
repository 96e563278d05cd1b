"""``epcli collapse`` streaming from the file: one EP layer at a time, sharded output, model-check policy.

Every expectation is computed independently of the code under test:

* the reference collapse is ``epcli.collapse_state_dict`` on the fully loaded state
  dict, and the reference model ``epcli.collapse_model`` on the loaded expanded model;
* written files are read back with the ``safetensors`` library / ``torch.load``,
  and sharded *inputs* are built by hand (``safetensors.torch.save_file`` plus an
  index written as JSON, the Hugging Face layout epcli documents), not by epcli.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import struct
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

import epcli
from epcli import EPConv2d, EPLinear

INDEX_SUFFIX = ".safetensors.index.json"


# ---- models ----------------------------------------------------------------------------------
def _mixed() -> nn.Module:
    """EP layers between plain ones: BatchNorm1d (int64 num_batches_tracked), Linear, an EP layer without bias."""
    return nn.Sequential(
        EPLinear(16, 12, depth=3, batch_norm=True, residual=True, residual_mode="learn"),  # "0", projected skip
        nn.ReLU(),
        nn.BatchNorm1d(12),  # "2"
        nn.Linear(12, 8),  # "3"
        EPLinear(8, 8, depth=3, batch_norm=True, residual=True),  # "4", identity skip
        nn.Tanh(),
        EPLinear(8, 3, depth=2, bias=False),  # "6", the last EP layer
    )


def _conv() -> nn.Module:
    return nn.Sequential(
        EPConv2d(2, 4, [3, 1, 3], padding=2, batch_norm=True, residual=True, residual_mode="learn"),
        nn.ReLU(),
        EPConv2d(4, 4, 3, depth=3, padding=1, stride=2, residual=True, residual_intervals=[1, 3]),
        nn.BatchNorm2d(4),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )


def _root_conv() -> nn.Module:
    """The model is one EP layer: its path is the empty string."""
    return EPConv2d(3, 5, [2, 2], stride=2, batch_norm=True)


def _root_linear_f64() -> nn.Module:
    return EPLinear(10, 6, depth=3, width=2, batch_norm=True).double()


def _bf16() -> nn.Module:
    return nn.Sequential(EPLinear(8, 8, depth=3, batch_norm=True, residual=True), nn.ReLU(), nn.Linear(8, 3)).to(
        torch.bfloat16
    )


MODELS = {
    "mixed": (_mixed, (16,)),
    "conv": (_conv, (2, 9, 9)),
    "root_conv": (_root_conv, (3, 8, 8)),
    "root_linear_f64": (_root_linear_f64, (10,)),
    "bf16": (_bf16, (8,)),
}


def _randomised(model: nn.Module, seed: int) -> nn.Module:
    """Non-trivial weights and batch-norm statistics (so the collapse has something to fold); eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            values = torch.randn(parameter.shape, generator=generator, dtype=torch.float64) * 0.5
            parameter.copy_(values.to(parameter.dtype))
        for norm in model.modules():
            if isinstance(norm, nn.modules.batchnorm._BatchNorm):
                mean = torch.randn(norm.running_mean.shape, generator=generator, dtype=torch.float64) * 0.3
                var = torch.rand(norm.running_var.shape, generator=generator, dtype=torch.float64) + 0.5
                norm.running_mean.copy_(mean.to(norm.running_mean.dtype))
                norm.running_var.copy_(var.to(norm.running_var.dtype))
                norm.num_batches_tracked.fill_(17)
    return model.eval()


def _save(name: str, path: Path, seed: int = 0) -> Path:
    factory, shape = MODELS[name]
    return epcli.save_checkpoint(_randomised(factory(), seed), path, input_shape=shape)


@pytest.fixture
def mixed(tmp_path: Path) -> Path:
    """The mixed model as ``src/model.safetensors`` (outputs go elsewhere unless a test says so)."""
    (tmp_path / "src").mkdir()
    return _save("mixed", tmp_path / "src" / "model.safetensors")


# ---- independent readers and helpers ---------------------------------------------------------
def _read_shard_set(index: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """All tensors of a sharded safetensors checkpoint, read with the safetensors library; and the index document."""
    document = json.loads(index.read_text())
    state: dict[str, Tensor] = {}
    for name in sorted(set(document["weight_map"].values())):
        shard = load_file(str(index.with_name(name)))
        overlap = set(shard) & set(state)
        assert not overlap, f"tensors {overlap} are stored in two shards"
        for key in shard:
            assert document["weight_map"][key] == name, f"{key} is in {name} but the index maps it elsewhere"
        state.update(shard)
    assert set(state) == set(document["weight_map"]), "the index and the shards disagree on the keys"
    return state, document


def _read_output(path: Path) -> dict[str, Tensor]:
    """A written checkpoint's tensors, read without epcli."""
    if path.name.endswith(INDEX_SUFFIX):
        return _read_shard_set(path)[0]
    if path.suffix == ".safetensors":
        return load_file(str(path))
    return dict(torch.load(path, map_location="cpu", weights_only=True))  # a collapsed .pt is a plain state dict


def _reference(source: Path) -> dict[str, Tensor]:
    expanded = epcli.load_checkpoint(source)
    return epcli.collapse_state_dict(expanded.state_dict, expanded.ep_layers)


def _assert_same_state(actual: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    assert set(actual) == set(expected)
    for key, value in expected.items():
        assert actual[key].dtype == value.dtype, (key, actual[key].dtype, value.dtype)
        assert torch.equal(actual[key], value), f"tensor {key} differs"


def _tensor_bytes(state: dict[str, Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def _snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    """Every entry of a directory (dotfiles too, subdirectories recursively): bytes and mtime."""
    return {
        p.name: _snapshot(p) if p.is_dir() else (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(directory.iterdir())
    }


def _shard_names(stem: str, count: int) -> list[str]:
    return [f"{stem}-{k:05d}-of-{count:05d}.safetensors" for k in range(1, count + 1)]


def _write_sharded_input(source: Path, index: Path, count: int) -> list[Path]:
    """Split a single-file safetensors checkpoint into ``count`` shards (round-robin by key) plus an index, by hand."""
    with safe_open(str(source), "pt") as handle:
        metadata = handle.metadata()["epcli"]
    tensors = load_file(str(source))
    keys = sorted(tensors)
    stem = index.name[: -len(INDEX_SUFFIX)]
    names = _shard_names(stem, count)
    weight_map = {}
    for number, name in enumerate(names):
        mine = keys[number::count]
        save_file({key: tensors[key] for key in mine}, str(index.with_name(name)), metadata={"format": "pt"})
        weight_map.update({key: name for key in mine})
    document = {"metadata": {"epcli": metadata, "total_size": _tensor_bytes(tensors)}, "weight_map": weight_map}
    index.write_text(json.dumps(document, indent=2))
    return [index.with_name(name) for name in names]


def _probe(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """A fixed batch of 7 random inputs of one sample ``shape``."""
    return torch.randn(7, *shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(dtype)


def _model_dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def _poke_nan(path: Path, key: str) -> None:
    """Overwrite the first element of tensor ``key`` with NaN, parsing the safetensors header by hand."""
    with path.open("r+b") as handle:
        length = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(length))
        entry = header[key]
        assert entry["dtype"] == "F32"
        handle.seek(8 + length + entry["data_offsets"][0])
        handle.write(struct.pack("<f", math.nan))


# ---- streaming equals the in-memory reference --------------------------------------------------
CASES = [
    ("mixed", ".pt", ".safetensors"),
    ("mixed", ".safetensors", ".safetensors"),
    ("mixed", ".safetensors", ".pt"),
    ("conv", ".safetensors", ".safetensors"),
    ("conv", ".pt", ".pt"),
    ("root_conv", ".pt", ".safetensors"),
    ("root_conv", ".safetensors", ".safetensors"),
    ("root_linear_f64", ".safetensors", ".safetensors"),
    ("bf16", ".pt", ".safetensors"),
]


@pytest.mark.parametrize(("name", "suffix", "out_suffix"), CASES, ids=[f"{n}{s}->{o}" for n, s, o in CASES])
def test_streaming_collapse_equals_in_memory_reference(tmp_path, invoke, json_doc, name, suffix, out_suffix):
    source = _save(name, tmp_path / f"model{suffix}", seed=len(name))
    output = tmp_path / f"out{out_suffix}"

    run = invoke("collapse", source, "-o", output, "--json")

    assert run.returncode == 0, run.describe()
    document = json_doc(run.stdout)
    assert document["output"] == str(output) and document["files"] == [str(output)]
    expanded = epcli.load_checkpoint(source)
    _assert_same_state(_read_output(output), _reference(source))
    assert [layer["path"] for layer in document["layers"]] == list(expanded.ep_layers)
    # the rebuilt collapsed model computes exactly what collapse_model makes of the expanded model
    collapsed = epcli.load_checkpoint(output)
    assert collapsed.kind == "collapsed" and collapsed.model is not None
    assert not any(isinstance(m, epcli.EPLayer) for m in collapsed.model.modules())
    reference_model = epcli.collapse_model(expanded.model)
    x = _probe(expanded.input_shape, _model_dtype(reference_model))
    with torch.no_grad():
        assert torch.equal(collapsed.model(x), reference_model(x))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([source.name, output.name]), "no temp files left"


def test_export_safetensors_streams_the_same_tensors(mixed, tmp_path, invoke):
    output = tmp_path / "export.safetensors"

    run = invoke("export", mixed, "--safetensors", output)

    assert run.returncode == 0, run.describe()
    _assert_same_state(_read_output(output), _reference(mixed))


# ---- sharded output --------------------------------------------------------------------------
SHARD_LIMIT = 512  # bytes: the mixed model's collapsed tensors (about 2.4 kB) need several shards


def test_sharded_output_via_cli(mixed, tmp_path, invoke, json_doc, flat):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    output = out_dir / "out.safetensors"
    index = out_dir / "out.safetensors.index.json"
    plain = tmp_path / "plain.safetensors"

    # in-process: a real process writing shards is covered by the determinism and human-output tests
    run = invoke("collapse", mixed, "-o", output, "--max-shard-size", str(SHARD_LIMIT), "--json")
    single = invoke("collapse", mixed, "-o", plain)

    assert run.returncode == 0, run.describe()
    assert single.returncode == 0, single.describe()
    document = json_doc(run.stdout)
    assert document["output"] == str(index)
    names = sorted(p.name for p in out_dir.iterdir())
    count = len(names) - 1
    assert count >= 3, names
    assert names == sorted([*_shard_names("out", count), index.name]), "shards plus index, nothing else"
    assert not output.exists()
    assert sorted(document["files"]) == sorted(str(out_dir / n) for n in names)
    # the tensors are those of the unsharded output, each shard within the limit unless it holds one tensor
    state, index_document = _read_shard_set(index)
    _assert_same_state(state, load_file(str(plain)))
    assert index_document["metadata"]["total_size"] == _tensor_bytes(state)
    assert isinstance(index_document["metadata"]["epcli"], str)
    for name in _shard_names("out", count):
        shard = load_file(str(out_dir / name))
        assert _tensor_bytes(shard) <= SHARD_LIMIT or len(shard) == 1, (name, _tensor_bytes(shard))
        with safe_open(str(out_dir / name), "pt") as handle:
            assert handle.metadata().get("format") == "pt", "Hugging Face loaders expect format=pt in each shard"
    # human output names the index and the shards
    assert f"{count} shards" in flat(run.stderr) and str(index) in flat(run.stderr), run.stderr
    # the set loads as one checkpoint and computes what the single file does
    sharded_model = epcli.load_checkpoint(index).model
    single_model = epcli.load_checkpoint(plain).model
    x = _probe((16,), torch.float32)
    with torch.no_grad():
        assert torch.equal(sharded_model(x), single_model(x))


def test_sharded_output_verifies_and_inspects(mixed, tmp_path, invoke, json_doc):
    output = tmp_path / "out.safetensors"
    index = tmp_path / "out.safetensors.index.json"
    assert invoke("collapse", mixed, "-o", output, "--max-shard-size", "1KB").returncode == 0

    verified = invoke("verify", mixed, index, "--json")
    inspected = invoke("inspect", index, "--json")

    assert verified.returncode == 0, verified.describe()
    verify_document = json_doc(verified.stdout)
    assert verify_document["passed"] is True
    assert {c["name"] for c in verify_document["comparisons"]} >= {"0", "4", "6"}
    assert inspected.returncode == 0, inspected.describe()
    inspect_document = json_doc(inspected.stdout)
    assert inspect_document["kind"] == "collapsed"
    assert sorted(layer["path"] for layer in inspect_document["layers"]) == ["0", "4", "6"]


def test_a_limit_the_output_fits_in_writes_one_file(mixed, tmp_path, invoke, json_doc):
    output = tmp_path / "out.safetensors"
    default = tmp_path / "default.safetensors"

    run = invoke("collapse", mixed, "-o", output, "--max-shard-size", "5GB", "--json")
    assert invoke("collapse", mixed, "-o", default).returncode == 0

    assert run.returncode == 0, run.describe()
    document = json_doc(run.stdout)
    assert document["output"] == str(output) and document["files"] == [str(output)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["default.safetensors", "out.safetensors", "src"]
    _assert_same_state(load_file(str(output)), load_file(str(default)))


@pytest.mark.parametrize("sharded_output", [False, True], ids=["to-single", "to-shards"])
def test_sharded_input_gives_the_same_output(mixed, tmp_path, invoke, json_doc, sharded_output):
    shard_dir = tmp_path / "sharded"
    shard_dir.mkdir()
    index = shard_dir / "x.safetensors.index.json"
    _write_sharded_input(mixed, index, count=3)
    reference_out = tmp_path / "ref.safetensors"
    assert invoke("collapse", mixed, "-o", reference_out).returncode == 0
    extra = ["--max-shard-size", "300"] if sharded_output else []

    run = invoke("collapse", index, *extra, "--json")

    assert run.returncode == 0, run.describe()
    document = json_doc(run.stdout)
    default = shard_dir / ("x.collapsed.safetensors.index.json" if sharded_output else "x.collapsed.safetensors")
    assert document["output"] == str(default) and default.is_file()
    _assert_same_state(_read_output(default), load_file(str(reference_out)))
    assert document["source_sha256"] == hashlib.sha256(index.read_bytes()).hexdigest()
    # the model check ran on the sharded input too
    assert isinstance(document["model_max_abs_error"], float) and document["model_check_skipped"] is None


def test_sharded_input_default_pt_name(mixed, tmp_path, invoke):
    index = tmp_path / "x.safetensors.index.json"
    _write_sharded_input(mixed, index, count=2)

    run = invoke("collapse", index, "--format", "pt")

    assert run.returncode == 0, run.describe()
    _assert_same_state(_read_output(tmp_path / "x.collapsed.pt"), _reference(mixed))


# ---- overwriting -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("first", "second", "named"),
    [
        (str(SHARD_LIMIT), str(SHARD_LIMIT), None),  # the same shards again: any of them may be named
        (None, str(SHARD_LIMIT), "out.safetensors"),  # a single file, now shards: it would be removed
        (str(SHARD_LIMIT), None, "out.safetensors.index.json"),  # shards, now a single file: they would be removed
    ],
    ids=["shards-again", "single-then-shards", "shards-then-single"],
)
def test_an_existing_output_is_refused_without_force(mixed, tmp_path, invoke, flat, json_doc, first, second, named):
    output = tmp_path / "out.safetensors"

    def collapse(limit: str | None, *extra: str):
        return invoke("collapse", mixed, "-o", output, *(["--max-shard-size", limit] if limit else []), *extra)

    assert collapse(first).returncode == 0
    before = _snapshot(tmp_path)

    run = collapse(second, "--json")

    after = sorted(p.name for p in tmp_path.iterdir())
    assert _snapshot(tmp_path) == before, (
        f"an existing output was replaced/removed without --force: {sorted(before)} -> {after}"
    )
    assert run.returncode == 4, run.describe()
    message = flat(run.stderr)
    assert "--force" in message
    if named is None:
        assert any(str(tmp_path / name) in message for name in before if name != "src"), message
    else:
        assert str(tmp_path / named) in message, message
    assert json_doc(run.stdout)["passed"] is False


@pytest.mark.parametrize(
    ("first", "second"),
    [(str(SHARD_LIMIT), "1"), ("1", "1KB"), (str(SHARD_LIMIT), None), (None, str(SHARD_LIMIT))],
    ids=["more-shards", "fewer-shards", "shards-to-single", "single-to-shards"],
)
def test_force_replaces_an_output_without_stale_files(mixed, tmp_path, invoke, json_doc, first, second):
    output = tmp_path / "out.safetensors"

    def collapse(limit: str | None, *extra: str):
        return invoke("collapse", mixed, "-o", output, *(["--max-shard-size", limit] if limit else []), *extra)

    assert collapse(first).returncode == 0

    run = collapse(second, "--force", "--json")

    assert run.returncode == 0, run.describe()
    document = json_doc(run.stdout)
    remaining = sorted(str(p) for p in tmp_path.iterdir() if p.name != "src")
    assert remaining == sorted(document["files"]), "only the new output's files are left"
    _assert_same_state(_read_output(Path(document["output"])), _reference(mixed))
    if second == "1":  # one tensor per shard
        assert len(document["files"]) - 1 == len(_reference(mixed))


def test_export_checks_an_earlier_sharded_output_before_writing_anything(mixed, tmp_path, invoke, flat):
    """``export --onnx A --safetensors B``: B's old shards need --force, and that is found before A is written."""
    output = tmp_path / "out.safetensors"
    assert invoke("collapse", mixed, "-o", output, "--max-shard-size", str(SHARD_LIMIT)).returncode == 0
    before = _snapshot(tmp_path)

    run = invoke("export", mixed, "--onnx", tmp_path / "model.onnx", "--safetensors", output)

    assert run.returncode == 4, run.describe()
    assert "out.safetensors.index.json already exists" in flat(run.stderr) and "--force" in flat(run.stderr)
    assert _snapshot(tmp_path) == before, "no ONNX file, and the old output untouched"


def test_output_may_not_be_a_shard_of_the_source(mixed, tmp_path, invoke, flat):
    index = tmp_path / "x.safetensors.index.json"
    shards = _write_sharded_input(mixed, index, count=2)
    before = _snapshot(tmp_path)

    runs = [invoke("collapse", index, "-o", shards[0], "--force"), invoke("collapse", index, "-o", shards[1])]

    for run in runs:
        assert run.returncode == 4, run.describe()
        assert str(Path(run.args[3])) in flat(run.stderr)
    assert "source" in flat(runs[0].stderr), "--force does not make overwriting the source allowed"
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("force", [False, True], ids=["plain", "--force"])
def test_output_named_like_a_sharded_source_never_deletes_it(mixed, tmp_path, invoke, force):
    """``x.safetensors.index.json`` in, ``-o x.safetensors`` out: the source is not an old output to clean up."""
    index = tmp_path / "x.safetensors.index.json"
    shards = _write_sharded_input(mixed, index, count=2)
    before = {p.name: p.read_bytes() for p in (index, *shards)}

    run = invoke("collapse", index, "-o", tmp_path / "x.safetensors", *(["--force"] if force else []))

    after = {p.name: p.read_bytes() for p in (index, *shards) if p.exists()}
    assert after == before, (
        f"the source checkpoint was destroyed: {sorted(before)} -> {sorted(after)} ({run.describe()})"
    )
    assert run.returncode in (0, 4), run.describe()
    epcli.load_checkpoint(index)


# ---- bad shard options -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "args",
    [["--format", "pt"], ["-o", "{dir}/x.pt"], ["-o", "{dir}/x.pt", "--format", "pt"]],
    ids=["--format-pt", "-o-pt", "both"],
)
def test_max_shard_size_with_pt_output_is_a_usage_error(mixed, tmp_path, invoke, flat, args):
    before = _snapshot(mixed.parent)
    argv = [a.format(dir=mixed.parent) for a in args]

    run = invoke("collapse", mixed, *argv, "--max-shard-size", "1KB")

    assert run.returncode == 2, run.describe()
    message = flat(run.stderr)
    assert "shard" in message and ".safetensors" in message and "Traceback" not in message, message
    assert _snapshot(mixed.parent) == before


@pytest.mark.parametrize("size", ["abc", "0", "5XB", "-1", "0.1", ""])
def test_bad_max_shard_size_is_a_usage_error(mixed, invoke, flat, json_doc, size):
    before = _snapshot(mixed.parent)

    run = invoke("collapse", mixed, "--max-shard-size", size)
    as_json = invoke("collapse", mixed, "--max-shard-size", size, "--json")

    assert run.returncode == 2, run.describe()
    assert "--max-shard-size" in flat(run.stderr) and "Traceback" not in run.stderr
    assert run.stdout == ""
    assert as_json.returncode == 2, as_json.describe()
    document = json_doc(as_json.stdout)
    assert document["command"] == "collapse" and document["passed"] is False
    assert "--max-shard-size" in document["error"]["message"]
    assert _snapshot(mixed.parent) == before


@pytest.mark.parametrize(
    ("text", "expected"),
    [("5GB", 5 * 10**9), ("500MiB", 500 * 2**20), ("123", 123), ("2G", 2 * 10**9), ("1.5KB", 1500), ("1 kib", 1024)],
)
def test_parse_size(text, expected):
    from epcli.cli.options import parse_size

    assert parse_size(text, "--max-shard-size") == expected


# ---- the whole-model check -------------------------------------------------------------------
def test_small_checkpoint_gets_the_whole_model_check(samples, invoke, json_doc, flat):
    run = invoke("collapse", samples.mlp, "--json")

    assert run.returncode == 0, run.describe()
    document = json_doc(run.stdout)
    error = document["model_max_abs_error"]
    assert isinstance(error, float) and 0 <= error < 1e-4
    assert document["model_check_skipped"] is None
    assert "not checked" not in flat(run.stderr)
    provenance = epcli.load_checkpoint(samples.dir / "digits_mlp.collapsed.safetensors").metadata["provenance"]
    assert provenance["model_max_abs_error"] == error


def test_no_model_check_skips_it_with_a_reason(samples, invoke, json_doc, flat):
    run = invoke("collapse", samples.cnn, "--no-model-check", "--json")

    assert run.returncode == 0, run.describe()
    document = json_doc(run.stdout)
    assert document["model_max_abs_error"] is None
    reason = document["model_check_skipped"]
    assert isinstance(reason, str) and "--no-model-check" in reason
    assert all(isinstance(layer["max_abs_error"], float) for layer in document["layers"]), "layers are still checked"
    assert "not checked" in flat(run.stderr) and reason in flat(run.stderr)
    output = samples.dir / "digits_cnn.collapsed.safetensors"
    assert epcli.load_checkpoint(output).metadata["provenance"]["model_max_abs_error"] is None
    _assert_same_state(_read_output(output), _reference(samples.cnn))


def test_checkpoint_without_architecture(custom_model, invoke, json_doc, flat):
    out_skipped = custom_model.dir / "skipped.safetensors"
    out_forced = custom_model.dir / "forced.safetensors"
    out_factory = custom_model.dir / "factory.safetensors"

    skipped = invoke("collapse", custom_model.path, "-o", out_skipped, "--json")
    forced = invoke("collapse", custom_model.path, "-o", out_forced, "--model-check", "--json")
    factory = invoke(
        "collapse", custom_model.path, "-o", out_factory, "--model-check", "--model", custom_model.factory, "--json"
    )

    assert skipped.returncode == 0, skipped.describe()
    document = json_doc(skipped.stdout)
    assert document["model_max_abs_error"] is None
    assert "architecture" in document["model_check_skipped"]
    assert "not checked" in flat(skipped.stderr) and "architecture" in flat(skipped.stderr)
    _assert_same_state(_read_output(out_skipped), _reference(custom_model.path))

    assert forced.returncode == 2, forced.describe()
    assert "--model" in json_doc(forced.stdout)["error"]["message"]
    assert not out_forced.exists()

    assert factory.returncode == 0, factory.describe()
    checked = json_doc(factory.stdout)
    assert checked["model_check_skipped"] is None and 0 <= checked["model_max_abs_error"] < 1e-4


def test_model_check_size_threshold(mixed, tmp_path, monkeypatch):
    from epcli.artifacts import collapsed
    from epcli.jobs.collapse import collapse_file

    nbytes = _tensor_bytes(load_file(str(mixed)))

    monkeypatch.setattr(collapsed, "MODEL_CHECK_MAX_BYTES", nbytes - 1)
    over = collapse_file(mixed, tmp_path / "over.safetensors")
    forced = collapse_file(mixed, tmp_path / "forced.safetensors", model_check=True)
    monkeypatch.setattr(collapsed, "MODEL_CHECK_MAX_BYTES", nbytes)
    at_limit = collapse_file(mixed, tmp_path / "limit.safetensors")

    assert over.model_max_abs_error is None
    assert "MiB" in over.model_check_skipped and "epcli verify" in over.model_check_skipped
    assert "--model-check" in over.model_check_skipped
    for result in (forced, at_limit):
        assert result.model_check_skipped is None
        assert isinstance(result.model_max_abs_error, float) and 0 <= result.model_max_abs_error < 1e-4
    reference = _reference(mixed)
    for name in ("over", "forced", "limit"):
        _assert_same_state(_read_output(tmp_path / f"{name}.safetensors"), reference)


def test_model_check_false_in_process(mixed, tmp_path):
    from epcli.jobs.collapse import collapse_file

    result = collapse_file(mixed, tmp_path / "out.safetensors", model_check=False)

    assert result.model_max_abs_error is None and "--no-model-check" in result.model_check_skipped


# ---- one real process, two tests ---------------------------------------------------------------
REAL_PROCESS_ARGS = ("--max-shard-size", "1", "--no-model-check")  # one tensor per shard


@pytest.fixture(scope="module")
def real_process(tmp_path_factory: pytest.TempPathFactory, run_epcli) -> SimpleNamespace:
    """``epcli collapse a/model.safetensors -o a/shards.safetensors --max-shard-size 1 --no-model-check`` of the mixed
    model, run once: its human output and its files are checked by the two tests below. ``b`` holds a copy of the
    same source for in-process runs."""
    root = tmp_path_factory.mktemp("real_process")
    a, b = root / "a", root / "b"
    for directory in (a, b):
        directory.mkdir()
    source = _save("mixed", a / "model.safetensors")
    shutil.copyfile(source, b / "model.safetensors")
    run = run_epcli("collapse", source, "-o", a / "shards.safetensors", *REAL_PROCESS_ARGS)
    return SimpleNamespace(a=a, b=b, source=source, run=run)


# ---- determinism -----------------------------------------------------------------------------
def test_outputs_are_byte_identical_across_runs(real_process, invoke):
    """Same source bytes and name, other directory, other process: the same files, shard by shard."""
    a, b = real_process.a, real_process.b

    # one other process (the sharded output: its shards, index and the spool code of the single file);
    # the single file from two in-process runs
    runs = [
        real_process.run,
        invoke("collapse", a / "model.safetensors", "-o", a / "single.safetensors"),
        invoke("collapse", b / "model.safetensors", "-o", b / "single.safetensors"),
        invoke("collapse", b / "model.safetensors", "-o", b / "shards.safetensors", *REAL_PROCESS_ARGS),
    ]

    assert all(r.returncode == 0 for r in runs), [r.describe() for r in runs]
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    assert len(names) >= 1 + 1 + 3 + 1, names  # source, single file, shards, index
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), f"{name} differs between runs"


# ---- failures leave nothing behind -----------------------------------------------------------
@pytest.mark.parametrize(
    ("key", "extra"),
    [
        ("6.layer_dict.1.0.weight", ["--max-shard-size", str(SHARD_LIMIT)]),  # the last EP layer, shards already done
        ("4.layer_dict.2.0.weight", []),  # an EP layer in the middle, single output
        ("3.weight", ["--max-shard-size", "1"]),  # a plain tensor
        ("6.layer_dict.1.0.weight", ["--format", "pt"]),
    ],
    ids=["last-layer-sharded", "middle-layer-single", "pass-through-sharded", "last-layer-pt"],
)
def test_a_failed_run_leaves_no_files(mixed, invoke, json_doc, flat, key, extra):
    _poke_nan(mixed, key)
    before = _snapshot(mixed.parent)

    run = invoke("collapse", mixed, *extra, "--json")

    assert run.returncode == 3, run.describe()
    assert key in flat(run.stderr) and "NaN" in flat(run.stderr)
    document = json_doc(run.stdout)
    assert document["passed"] is False and key in document["error"]["message"]
    assert _snapshot(mixed.parent) == before, "no output, temp or spool file is left"


def test_a_failed_forced_run_keeps_the_old_output(mixed, tmp_path, invoke):
    output = tmp_path / "out.safetensors"
    assert invoke("collapse", mixed, "-o", output, "--max-shard-size", str(SHARD_LIMIT)).returncode == 0
    _poke_nan(mixed, "6.layer_dict.1.0.weight")
    before = _snapshot(tmp_path)

    runs = [
        invoke("collapse", mixed, "-o", output, "--max-shard-size", "1", "--force"),  # other shard names
        invoke("collapse", mixed, "-o", output, "--force"),  # one file replacing the shards
    ]

    for run in runs:
        assert run.returncode == 3, run.describe()
    assert _snapshot(tmp_path) == before, "the old output is whole and nothing else is left"


def test_an_interrupted_run_leaves_no_files(mixed, tmp_path):
    """Ctrl-C while the last EP layer is being collapsed, after earlier shards were written."""
    from epcli.jobs.collapse import collapse_file

    seen: list[tuple[int, int, str]] = []

    def progress(done: int, total: int, label: str) -> None:
        seen.append((done, total, label))
        if "6" in label:
            raise KeyboardInterrupt

    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(KeyboardInterrupt):
        collapse_file(mixed, out_dir / "out.safetensors", max_shard_bytes=64, progress=progress)

    assert list(out_dir.iterdir()) == [], "no shard, index or temp file is left"
    assert [label for _, _, label in seen][:2] == ["collapsing layer 0", "collapsing layer 4"]


@pytest.mark.parametrize("model_check", [None, False], ids=["checked", "--no-model-check"])
def test_progress_reports_each_layer(mixed, tmp_path, model_check):
    from epcli.jobs.collapse import collapse_file

    seen: list[tuple[int, int, str]] = []

    result = collapse_file(
        mixed, tmp_path / "out.safetensors", model_check=model_check, progress=lambda *args: seen.append(args)
    )

    steps = 3 + (model_check is None)  # three EP layers, and the whole model when it is checked
    labels = [label for _, _, label in seen]
    assert labels[:3] == ["collapsing layer 0", "collapsing layer 4", "collapsing layer 6"]
    assert len(labels) == steps and all(total == steps for _, total, _ in seen)
    assert [done for done, _, _ in seen] == list(range(steps))
    if model_check is None:
        assert "whole model" in labels[-1] and result.model_max_abs_error is not None


@pytest.mark.parametrize(
    ("suffix", "sharded"),
    [(".pt", False), (".safetensors", False), (".safetensors", True)],
    ids=["pt", "single", "sharded"],
)
def test_output_in_a_missing_directory_is_created(mixed, tmp_path, invoke, suffix, sharded):
    output = tmp_path / "missing" / "deeper" / f"out{suffix}"

    run = invoke("collapse", mixed, "-o", output, *(["--max-shard-size", "1"] if sharded else []))

    assert run.returncode == 0, run.describe()
    written = output.with_name(f"{output.stem}{INDEX_SUFFIX}") if sharded else output
    assert written.is_file()
    _assert_same_state(_read_output(written), _reference(mixed))


def test_output_under_a_file_is_a_clean_error(mixed, tmp_path, invoke, flat):
    (tmp_path / "afile").write_bytes(b"")
    output = tmp_path / "afile" / "out.safetensors"

    run = invoke("collapse", mixed, "-o", output)

    assert run.returncode == 4, run.describe()
    message = flat(run.stderr)
    assert "unexpected" not in message and "Traceback" not in message, message
    assert "cannot create its directory" in message and str(output) in message, message


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes into read-only directories")
def test_unwritable_output_directory_fails_cleanly(mixed, tmp_path, invoke, flat):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        run = invoke("collapse", mixed, "-o", locked / "out.safetensors", "--max-shard-size", str(SHARD_LIMIT))

        assert run.returncode == 2, run.describe()
        assert "Traceback" not in run.stderr and "unexpected" not in run.stderr, run.stderr
        assert str(locked) in flat(run.stderr)
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)


# ---- human output ----------------------------------------------------------------------------
def test_human_output_in_a_real_process(real_process, flat):
    run = real_process.run

    assert run.returncode == 0, run.describe()
    assert run.stderr == "", "the report is stdout's"
    text = flat(run.stdout)
    assert "not checked" in text and "--no-model-check" in text, run.stdout
    shards = len(_reference(real_process.source))  # one tensor per shard
    assert f"and {shards} shards" in text, run.stdout
    assert "Traceback" not in run.stdout and "\x1b" not in run.stdout

"""``open_checkpoint``: every check that needs no tensor data, with the data left in the file until ``read``.

Damaged tensor bytes (NaN written over one tensor's data) show what is read when:
``open_checkpoint`` must not notice them, ``load_checkpoint`` and ``read`` of that
tensor must, and ``read`` of the other tensors must still work.
"""

from __future__ import annotations

import math
import struct
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

import epcli
from epcli import CheckpointError, EpcliError, ShapeMismatchError
from epcli.checkpoint.load import load_checkpoint, open_checkpoint
from epcli.checkpoint.opened import CheckpointFile
from epcli.storage import source
from epcli.storage.mapped_pages import release_pages
from epcli.storage.safetensors_io import read_header
from epcli.storage.sharded import read_index
from epcli.storage.writer import CheckpointWriter

FORMATS = [".pt", ".safetensors", "sharded"]
INPUT_SHAPE = (8,)
NAN = struct.pack("<f", math.nan)


def _model(width: int = 8, hidden: int = 6) -> nn.Module:
    torch.manual_seed(99)
    return nn.Sequential(epcli.EPLinear(width, hidden, depth=3), nn.ReLU(), epcli.EPLinear(hidden, 4, depth=2)).eval()


def _save(model: nn.Module, directory: Path, form: str, input_shape: tuple[int, ...] = INPUT_SHAPE) -> Path:
    """Save ``model`` as ``.pt``, ``.safetensors``, or sharded (3+ shards; returns the index)."""
    if form != "sharded":
        return epcli.save_checkpoint(model, directory / f"model{form}", input_shape=input_shape)
    single = epcli.save_checkpoint(model, directory / "single.safetensors", input_shape=input_shape)
    opened = open_checkpoint(single)
    state = opened.read(opened.tensors)
    single.unlink()
    limit = max(info.nbytes for info in opened.tensors.values())
    with CheckpointWriter(directory / "model.safetensors", opened.tensors, max_shard_bytes=limit) as writer:
        for key, value in state.items():
            writer.add(key, value)
        index = writer.commit(opened.source.metadata)
    assert len(writer.files) >= 4
    return index


def _overwrite_with_nan(path: Path, key: str) -> str:
    """Write NaN over the data of ``key`` (float32) in place; returns the key actually damaged."""
    if path.name.endswith(".index.json"):
        shard = read_index(path).weight_map[key]
        return _overwrite_with_nan(shard, key)
    if path.suffix == ".safetensors":
        header = read_header(path)
        entry = header.tensors[key]
        with path.open("r+b") as f:
            f.seek(header.data_start + entry.begin)
            f.write(NAN * (entry.nbytes // 4))
        return key
    # .pt: a zip of stored (uncompressed) records; torch checks no CRC, so patching a record's bytes damages it
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(next(n for n in archive.namelist() if n.endswith("/data/0")))
    data = bytearray(path.read_bytes())
    name_length, extra_length = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    start = info.header_offset + 30 + name_length + extra_length
    data[start : start + info.file_size] = NAN * (info.file_size // 4)
    path.write_bytes(bytes(data))
    state = torch.load(path, weights_only=True)["state_dict"]  # the reference says which tensor that was
    damaged = [k for k, v in state.items() if v.isnan().any()]
    assert len(damaged) == 1 and state[damaged[0]].isnan().all()
    return damaged[0]


def _rchar() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


# ---- no tensor data is read --------------------------------------------------------------------
@pytest.mark.parametrize("form", FORMATS)
def test_damaged_data_is_noticed_by_read_not_by_open(tmp_path: Path, form: str):
    model = _model()
    path = _save(model, tmp_path, form)
    damaged = _overwrite_with_nan(path, "0.layer_dict.1.0.weight")
    expected = model.state_dict()

    opened = open_checkpoint(path)

    assert isinstance(opened, CheckpointFile) and opened.path == path and opened.kind == "expanded"
    assert damaged in opened.tensors and opened.nbytes == sum(t.nbytes for t in expected.values())
    others = [key for key in opened.tensors if key != damaged]
    state = opened.read(others)
    assert list(state) == others
    for key in others:
        assert torch.equal(state[key], expected[key]), key
    pattern = rf"^{path}: tensor '{damaged}' in the file has non-finite values \({expected[damaged].numel()} NaN, 0 Inf\)"
    with pytest.raises(CheckpointError, match=pattern):
        opened.read([others[0], damaged])
    with pytest.raises(CheckpointError, match=pattern):
        load_checkpoint(path)


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux's per-process read counter")
@pytest.mark.parametrize("form", [".safetensors", "sharded"])
def test_open_reads_headers_only(tmp_path: Path, form: str):
    """Counted by the kernel: opening ~0.8 MB of tensors reads a few kB per file (headers, index); loading reads it all."""
    model = _model(width=256, hidden=256)
    path = _save(model, tmp_path, form, input_shape=(256,))
    nbytes = sum(t.nbytes for t in model.state_dict().values())
    assert nbytes > 500_000
    open_checkpoint(path)  # warm up any lazy imports

    before = _rchar()
    opened = open_checkpoint(path)
    opening = _rchar() - before
    before = _rchar()
    opened.read(opened.tensors)
    reading = _rchar() - before

    # a header, plus at most one 8 KiB read buffer per file
    assert opening < min(16_384 * len(opened.files), nbytes // 10), opening
    assert reading >= nbytes


# ---- what an opened checkpoint lists -----------------------------------------------------------
@pytest.mark.parametrize("form", FORMATS)
def test_listing_matches_the_load(tmp_path: Path, form: str):
    model = _model()
    path = _save(model, tmp_path, form)

    opened = open_checkpoint(path)
    loaded = load_checkpoint(path)

    assert list(opened.tensors) == list(loaded.state_dict)
    for key, info in opened.tensors.items():
        assert (info.shape, info.dtype) == (tuple(loaded.state_dict[key].shape), loaded.state_dict[key].dtype)
    meta = opened.meta_state()
    assert list(meta) == list(opened.tensors)
    assert all(t.is_meta and t.shape == loaded.state_dict[k].shape for k, t in meta.items())
    assert opened.nbytes == sum(t.numel() * t.element_size() for t in loaded.state_dict.values())
    assert opened.ep_layers == loaded.ep_layers and opened.metadata == loaded.metadata
    assert opened.input_shape == INPUT_SHAPE and opened.architecture == loaded.architecture
    if form == "sharded":
        assert opened.files[0] == path and len(opened.files) >= 5
        assert all(f.exists() and f.parent == path.parent for f in opened.files)
    else:
        assert opened.files == (path,)


def test_pt_lists_tensors_in_the_model_order(tmp_path: Path):
    model = _model()
    opened = open_checkpoint(_save(model, tmp_path, ".pt"))
    assert list(opened.tensors) == list(model.state_dict())


@pytest.mark.parametrize("form", FORMATS)
def test_read_returns_fresh_tensors_in_the_order_asked(tmp_path: Path, form: str):
    model = _model()
    path = _save(model, tmp_path, form)
    opened = open_checkpoint(path)
    keys = list(reversed(opened.tensors))[::2]

    first = opened.read(keys)
    full = load_checkpoint(path).state_dict

    assert list(first) == keys
    for key in keys:
        assert torch.equal(first[key], full[key]) and first[key].is_contiguous(), key
        first[key].add_(1.0)  # writable, and no other tensor or the file sees it
    again = opened.read(keys)
    for key in keys:
        assert torch.equal(again[key], full[key]), key
    pointers = [t.untyped_storage().data_ptr() for t in [*first.values(), *again.values()]]
    assert len(set(pointers)) == len(pointers)


@pytest.mark.parametrize("form", FORMATS)
def test_read_of_an_unknown_key(tmp_path: Path, form: str):
    path = _save(_model(), tmp_path, form)
    with pytest.raises(CheckpointError, match=rf"^{path}: has no tensors \['nope'\]"):
        open_checkpoint(path).read(["0.layer_dict.0.0.weight", "nope"])


def test_pt_read_of_tied_tensors_shares_no_memory(tmp_path: Path, rewrite):
    """Two keys stored as one storage in the .pt come back as independent tensors."""
    model = _model()
    path = _save(model, tmp_path, ".pt")
    tied = ("0.layer_dict.1.0.weight", "0.layer_dict.2.0.weight")  # both 6x6
    rewrite(path, state=lambda state: state.update({tied[1]: state[tied[0]]}))
    stored = torch.load(path, weights_only=True)["state_dict"]
    assert stored[tied[0]].untyped_storage().data_ptr() == stored[tied[1]].untyped_storage().data_ptr()

    opened = open_checkpoint(path)
    subset = opened.read(tied)

    assert torch.equal(subset[tied[0]], model.state_dict()[tied[0]])
    assert torch.equal(subset[tied[1]], subset[tied[0]])
    assert subset[tied[0]].untyped_storage().data_ptr() != subset[tied[1]].untyped_storage().data_ptr()
    subset[tied[0]].zero_()
    assert torch.equal(subset[tied[1]], model.state_dict()[tied[0]])
    loaded = load_checkpoint(path).state_dict
    assert loaded[tied[0]].untyped_storage().data_ptr() != loaded[tied[1]].untyped_storage().data_ptr()


def test_pt_read_of_a_subset_equals_the_full_load(tmp_path: Path):
    model = _model()
    path = _save(model, tmp_path, ".pt")
    opened = open_checkpoint(path)
    full = load_checkpoint(path).state_dict
    for key in opened.tensors:
        (alone,) = opened.read([key]).values()
        assert torch.equal(alone, full[key]) and alone.untyped_storage().data_ptr() != full[key].untyped_storage().data_ptr()


# ---- structural errors come from open_checkpoint itself ----------------------------------------
STRUCTURAL = {
    "an EP weight of the wrong shape": (
        lambda state: state.update({"0.layer_dict.0.0.weight": torch.zeros(6, 9)}),
        None,
        ShapeMismatchError,
        r"layer '0' \(EPLinear\): 0.layer_dict.0.0.weight has shape \[6, 9\], expected \[6, 8\]",
    ),
    "an EP tensor missing": (
        lambda state: state.pop("2.layer_dict.1.0.bias"),
        None,
        CheckpointError,
        r"layer '2' \(EPLinear\): missing keys \['2.layer_dict.1.0.bias'\]",
    ),
    "a tensor the architecture lacks": (
        lambda state: state.update({"extra": torch.zeros(3)}),
        None,
        CheckpointError,
        r"the embedded architecture does not match the file's tensors: unexpected keys \['extra'\]",
    ),
    "a config deeper than the file": (
        None,
        lambda document: document["ep_layers"]["2"]["config"].update(depth=5),
        CheckpointError,
        r"layer '2' \(EPLinear\): its config \(depth 5\) needs at least 5 weight tensors",
    ),
    "an unknown metadata format": (
        None,
        lambda document: document.update(format="other"),
        CheckpointError,
        r"format",
    ),
}


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize("case", STRUCTURAL)
def test_structural_errors_are_raised_by_open(tmp_path: Path, rewrite, suffix: str, case: str):
    state_edit, metadata_edit, error, pattern = STRUCTURAL[case]
    path = _save(_model(), tmp_path, suffix)
    rewrite(path, metadata=metadata_edit, state=state_edit)

    with pytest.raises(error, match=rf"^{path}: .*{pattern}"):
        open_checkpoint(path)
    with pytest.raises(error, match=rf"^{path}: .*{pattern}"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    ("suffix", "found"),
    [(".safetensors", "it holds 10 tensors and no 'epcli' entry in __metadata__"),
     (".pt", "it holds a plain state_dict of 10 tensors")],
)
def test_missing_metadata_is_raised_by_open(tmp_path: Path, suffix: str, found: str):
    from safetensors.torch import save_file

    state = _model().state_dict()
    path = tmp_path / f"plain{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path), metadata={"format": "pt"})
    else:
        torch.save(state, path)
    hint = r"name the model's factory with --model module:function and its input with --input-shape .*save_checkpoint"
    with pytest.raises(CheckpointError, match=rf"^{path}: has no epcli metadata \({found}\); .*{hint}"):
        open_checkpoint(path)


@pytest.mark.parametrize("form", FORMATS)
def test_open_errors_are_epcli_errors_naming_the_path(tmp_path: Path, form: str):
    path = _save(_model(), tmp_path, form)
    target = path if form != "sharded" else read_index(path).weight_map["0.layer_dict.0.0.weight"]
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    with pytest.raises(EpcliError, match=rf"^{path}: "):
        open_checkpoint(path)


@pytest.mark.parametrize("form", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16], ids=str)
def test_read_casts_floating_tensors_only(tmp_path: Path, make_model, form: str, dtype: torch.dtype):
    model, shape = make_model("mlp")  # batch-norms: an int64 num_batches_tracked beside float tensors
    path = _save(model, tmp_path, form, input_shape=shape)
    expected = model.state_dict()
    assert any(not t.is_floating_point() for t in expected.values())

    state = open_checkpoint(path).read(expected, dtype=dtype)

    for key, value in expected.items():
        wanted = value.to(dtype) if value.is_floating_point() else value
        assert state[key].dtype == wanted.dtype and torch.equal(state[key], wanted), key


@pytest.mark.parametrize("pages", ["released", "remapped"])
def test_pt_reads_past_the_remap_size_stay_exact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pages: str):
    """A ``.pt`` source gives back the mapped pages of every read (Linux), or else drops and re-maps its memory
    map after each 16 MiB read: reads of released pages, or on either side of a re-mapping, in any order, give
    exactly what ``torch.load`` gives."""
    if pages == "remapped":
        monkeypatch.setattr(source, "release_pages", lambda path, tensors: False)
    elif not sys.platform.startswith("linux"):
        pytest.skip("pages are released in place on Linux only")
    torch.manual_seed(3)
    model = nn.Sequential(epcli.EPLinear(1024, 1024, depth=5), nn.ReLU(), epcli.EPLinear(1024, 8, depth=2))
    path = epcli.save_checkpoint(model, tmp_path / "big.pt", input_shape=(1024,))
    opened = open_checkpoint(path)
    assert opened.nbytes > 16 * 2**20
    reference = torch.load(path, weights_only=True)["state_dict"]
    keys = list(opened.tensors)
    for key in [*keys, *reversed(keys)]:  # more than twice the remap size, in both directions
        assert torch.equal(opened.read([key])[key], reference[key]), key


def _rss_file_kib() -> int:
    """This process's resident pages of file mappings (Linux)."""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("RssFile:"))
    return int(line.split()[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pages are released in place on Linux only")
def test_release_pages_gives_back_a_mapping_and_never_touches_other_memory(tmp_path: Path):
    path = tmp_path / "t.pt"
    torch.save({"t": torch.arange(2**21, dtype=torch.float32)}, path)  # 8 MiB
    mapped = torch.load(path, weights_only=True, mmap=True)["t"]
    assert float(mapped.sum()) == float(sum(range(2**21)))  # every page read: resident
    before = _rss_file_kib()

    assert release_pages(path, [mapped])

    assert before - _rss_file_kib() >= 7 * 1024  # about 8 MiB of file pages given back
    assert torch.equal(mapped, torch.arange(2**21, dtype=torch.float32))  # read again from the file
    own = torch.arange(2**21, dtype=torch.float32)  # anonymous memory: MADV_DONTNEED would zero it
    assert not release_pages(path, [own])
    assert torch.equal(own, torch.arange(2**21, dtype=torch.float32))

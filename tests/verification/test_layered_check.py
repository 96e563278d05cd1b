"""verify of an embedded architecture runs one module at a time, reading each EP layer when it runs, with the
figures of the whole model read at once."""

from __future__ import annotations

import contextlib
import gc
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from epcli import CheckpointError, load_checkpoint, overparameterize, save_checkpoint
from epcli.checkpoint.load import open_checkpoint
from epcli.checkpoint.opened import CheckpointFile
from epcli.convert.offload import is_offloaded, restore
from epcli.jobs.collapse import collapse_file
from epcli.jobs.verify import verify_files
from epcli.layers import EPLinear
from epcli.layers.registry import find_ep_layers
from epcli.storage.scratch import ScratchTensors
from epcli.verification import model_check
from epcli.verification.compare import VerifySettings
from epcli.verification.layered import collapse_opened
from epcli.verification.model_check import verify_checkpoint


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    plain = nn.Sequential(
        nn.Linear(12, 16), nn.BatchNorm1d(16), nn.ReLU(),
        nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 8)), nn.Linear(8, 3),
    )
    return overparameterize(plain, depth=3, batch_norm=True, residual=True, residual_mode="learn")


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    plain = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 10)
    )
    return overparameterize(plain, depth=2, batch_norm=True)


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {"mlp": (_mlp, (12,)), "cnn": (_cnn, (3, 6, 6))}


def _saved(name: str, dtype: str, tmp_path: Path) -> Path:
    build, shape = MODELS[name]
    model = build()
    with torch.no_grad():
        model.train()(torch.randn(32, *shape))  # running statistics
    return save_checkpoint(model.to(getattr(torch, dtype)).eval(), tmp_path / f"{name}.safetensors", input_shape=shape)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_layered_check_reports_what_the_whole_model_check_does(name: str, dtype: str, tmp_path: Path):
    source = _saved(name, dtype, tmp_path)
    for check in ("float32", "float64"):
        settings = VerifySettings(dtype=check, samples=24, batch_size=8)  # three batches
        layered = verify_files(source, None, settings).report
        whole = verify_checkpoint(load_checkpoint(source), settings)  # the model read whole, collapsed in place
        assert [c.scope for c in layered.comparisons].count("model") == 1
        assert layered.comparisons == whole.comparisons  # every figure, to the bit
        assert layered.settings == whole.settings and layered.passed == whole.passed


@pytest.mark.parametrize("name", sorted(MODELS))
def test_layered_check_of_a_collapsed_file_reports_what_the_whole_model_check_does(name: str, tmp_path: Path):
    """verify CKPT COLLAPSED reads the collapsed file a module at a time too: the same figures as the strict load
    of the whole collapsed model; and the file's own tensors outside the EP layers are the ones compared."""
    source = _saved(name, "float32", tmp_path)
    collapsed = tmp_path / "collapsed.safetensors"
    collapse_file(source, collapsed)
    settings = VerifySettings(dtype="float32", samples=24, batch_size=8)
    layered = verify_files(source, collapsed, settings).report
    whole = verify_checkpoint(load_checkpoint(source), settings, collapsed_state=load_file(collapsed),
                              label=collapsed.name)
    assert layered.comparisons == whole.comparisons and layered.passed
    tensors, metadata = load_file(collapsed), safe_open(str(collapsed), "pt").metadata()
    norm = "1.weight"  # the batch-norm the model keeps plain
    for changed in ({**tensors, norm: tensors[norm] * 0.5}, {**tensors, "extra": torch.zeros(1)}):
        stale = tmp_path / "stale.safetensors"
        save_file(changed, stale, metadata)
        if "extra" in changed:
            with pytest.raises(CheckpointError, match=r"unexpected keys \['extra'\]"):
                verify_files(source, stale, settings)
        else:
            report = verify_files(source, stale, settings).report
            assert not report.passed and not report.comparisons[-1].passed  # the whole model: the tensor is used


def test_each_ep_layer_is_read_when_it_runs_and_freed_before_the_next(tmp_path: Path, monkeypatch: Any):
    torch.manual_seed(0)
    model = nn.Sequential(*(layer for _ in range(4) for layer in (EPLinear(32, 32, depth=3), nn.ReLU())))
    source = save_checkpoint(model.eval(), tmp_path / "m.safetensors", input_shape=(32,))
    reads: list[set[str]] = []
    read = CheckpointFile.read

    def recording(self: CheckpointFile, keys: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        keys = list(keys)
        reads.append({key.split(".")[0] for key in keys})
        return read(self, keys, **kwargs)

    built: list[weakref.ref[nn.Module]] = []
    alive_at_build: list[int] = []
    expanded_layer = model_check.expanded_layer

    def tracked(*args: Any, **kwargs: Any) -> Any:
        gc.collect()
        alive_at_build.append(sum(ref() is not None for ref in built))
        layer = expanded_layer(*args, **kwargs)
        built.append(weakref.ref(layer))
        return layer

    monkeypatch.setattr(CheckpointFile, "read", recording)
    monkeypatch.setattr(model_check, "expanded_layer", tracked)
    gc.freeze()  # what this process held before is not garbage of this check: each collect walks only what it made
    try:
        report = verify_files(source, None, VerifySettings(dtype="float64", samples=16, batch_size=4)).report
    finally:
        gc.unfreeze()
    assert report.passed and [c.name for c in report.comparisons] == ["0", "2", "4", "6", "<model>"]
    # each read is of one layer, and the layers are read in the order the model runs them, each in one stretch (its
    # collapse reads it a chain layer at a time, then it is read whole to run and check it)
    assert all(len(layers) == 1 for layers in reads)
    assert [next(iter(layers)) for i, layers in enumerate(reads) if i == 0 or layers != reads[i - 1]] == ["0", "2", "4", "6"]
    assert alive_at_build == [0] * 4  # no EP layer is resident when the next one is built


@pytest.mark.parametrize("parked", [False, True], ids=["held", "parked"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_the_collapsed_model_as_stored_holds_what_collapse_writes(name: str, dtype: str, parked: bool, tmp_path: Path):
    """compress's starting point, built a layer at a time while the float64 reference runs, is bit for bit the
    file ``epcli collapse`` writes (each tensor in its stored dtype; parked collapsed weights too, once read back),
    and the reference is the expanded model's."""
    source = _saved(name, dtype, tmp_path)
    written = load_file(collapse_file(source, tmp_path / "collapsed.safetensors").output)
    settings = VerifySettings(samples=8, batch_size=4, seed=0, dtype="float64")

    with ScratchTensors(tmp_path) if parked else contextlib.nullcontext() as scratch:
        collapsed = collapse_opened(open_checkpoint(source), settings, what="test", as_stored=True, scratch=scratch)
        offloaded = [module for module in collapsed.model.modules() if is_offloaded(module)]
        assert len(offloaded) == (len(find_ep_layers(load_checkpoint(source).model)) if parked else 0)
        for module in offloaded:
            restore(module)

    state = collapsed.model.state_dict()
    assert set(state) == set(written)
    for key, value in written.items():
        assert state[key].dtype == value.dtype, key
        torch.testing.assert_close(state[key], value, rtol=0, atol=0)
    expanded = load_checkpoint(source).model.to(torch.float64).eval()
    with torch.no_grad():
        for batch, output in zip(collapsed.expected.batches, collapsed.expected.outputs, strict=True):
            torch.testing.assert_close(output, expanded(*batch), rtol=1e-12, atol=1e-12)

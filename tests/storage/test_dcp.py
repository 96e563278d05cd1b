"""torch.distributed.checkpoint directories are read with torch's DCP API, except that their ``.metadata``
pickle is unpickled with an allowlist: a pickle that would run code, or names a data file outside the
directory, is refused before anything is read."""

from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path

import pytest
import torch

from epcli.errors import CheckpointError, UnsafeCheckpointError
from epcli.storage.dcp import DCP_METADATA, read_dcp_listing, read_dcp_tensors


@pytest.fixture()
def dcp_dir(tmp_path: Path) -> Path:
    import torch.distributed.checkpoint as dcp

    state = {"w": torch.arange(12.0).reshape(3, 4), "ids": torch.arange(3), "half": torch.ones(2, dtype=torch.bfloat16)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": state, "step": 5}, checkpoint_id=str(tmp_path / "ckpt"), no_dist=True)
    return tmp_path / "ckpt"


def test_listing_comes_from_the_metadata_and_tensors_are_read_on_demand(dcp_dir: Path):
    listing = read_dcp_listing(dcp_dir)
    assert listing == {
        "model.w": ((3, 4), torch.float32),
        "model.ids": ((3,), torch.int64),
        "model.half": ((2,), torch.bfloat16),
    }  # 'step' is not a tensor
    out = read_dcp_tensors(dcp_dir, listing, ["model.w"])
    assert list(out) == ["model.w"] and torch.equal(out["model.w"], torch.arange(12.0).reshape(3, 4))


class _Exploit:
    def __reduce__(self):  # what a hostile .metadata would hold
        return (os.system, ("echo owned > /dev/null",))


def test_a_metadata_pickle_that_would_run_code_is_refused(dcp_dir: Path):
    (dcp_dir / DCP_METADATA).write_bytes(pickle.dumps(_Exploit()))
    with pytest.raises(UnsafeCheckpointError, match=r"references 'posix.system'|references 'os.system'"):
        read_dcp_listing(dcp_dir)


def test_a_data_file_outside_the_directory_is_refused(dcp_dir: Path):
    from epcli.storage.dcp import _read_metadata

    metadata = _read_metadata(dcp_dir)
    for info in metadata.storage_data.values():
        info.relative_path = "../../etc/passwd"
    (dcp_dir / DCP_METADATA).write_bytes(pickle.dumps(metadata))
    with pytest.raises(CheckpointError, match="plain file names inside the checkpoint directory"):
        read_dcp_listing(dcp_dir)

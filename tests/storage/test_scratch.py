"""The scratch store: what is parked reads back bit for bit (whole, or its leading rows), nothing is left in the
directory, and a directory that cannot hold the file is an OutputError naming it."""

from __future__ import annotations

import os

import pytest
import torch

from epcli.errors import OutputError
from epcli.storage.scratch import ScratchTensors


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.bool])
def test_parked_tensors_read_back_bit_for_bit(tmp_path, dtype):
    tensors = {
        "matrix": (torch.randn(7, 5) * 100).to(dtype),
        "scalar": torch.tensor(3.5).to(dtype),
        "empty": torch.zeros(0, 4, dtype=dtype),
        "transposed": (torch.randn(6, 3) * 100).to(dtype).T,  # not contiguous: parked as its values
    }
    with ScratchTensors(tmp_path) as store:
        keys = {name: store.put(tensor) for name, tensor in tensors.items()}
        assert os.listdir(tmp_path) == []  # the file has no name
        assert store.nbytes == sum(t.numel() * t.element_size() for t in tensors.values())
        for name, tensor in reversed(tensors.items()):
            read = store.get(keys[name])
            assert read.dtype == dtype and read.shape == tensor.shape and torch.equal(read, tensor)
        assert torch.equal(store.get(keys["matrix"], rows=2), tensors["matrix"][:2])
        assert torch.equal(store.get(keys["transposed"], rows=1), tensors["transposed"][:1])


def test_more_rows_than_a_tensor_has_are_refused(tmp_path):
    with ScratchTensors(tmp_path) as store:
        key = store.put(torch.ones(2, 3))
        with pytest.raises(ValueError, match="3 rows of tensor 0, which has 2"):
            store.get(key, rows=3)


def test_a_directory_that_cannot_hold_the_file_is_named(tmp_path):
    missing = tmp_path / "missing"
    with pytest.raises(OutputError, match="missing: cannot hold a scratch file there"):
        ScratchTensors(missing)

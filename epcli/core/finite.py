"""Whether a tensor's values are all finite, fast, for every floating dtype epcli reads."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

__all__ = ["all_finite", "flat_chunks"]

_CHUNK = 2**20


def all_finite(tensor: Tensor) -> bool:
    """``isfinite(t).all()`` in one pass where ``aminmax`` applies (NaN propagates to both ends, Inf shows at one):
    20x faster, and one parallel region instead of two, which counts on a busy machine."""
    if tensor.numel() == 0:
        return True
    try:
        low, high = torch.aminmax(tensor)
    except (RuntimeError, NotImplementedError):  # no kernel for this dtype (complex, float8)
        return all(bool(torch.isfinite(chunk).all()) for chunk in flat_chunks(tensor))
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))


def flat_chunks(tensor: Tensor) -> Iterator[Tensor]:
    """The tensor's elements in flat chunks; 1-byte floats (float8) as float32 copies, which torch can test."""
    flat = tensor.reshape(-1)
    widen = tensor.is_floating_point() and tensor.dtype.itemsize == 1
    for start in range(0, flat.numel(), _CHUNK):
        chunk = flat[start : start + _CHUNK]
        yield chunk.float() if widen else chunk

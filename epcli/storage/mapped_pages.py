"""Giving back the resident pages of a memory-mapped file once tensors have been copied out of them.

Pages of a file mapping that have been read stay resident, and count in the process's
memory, until they are unmapped. On Linux, ``madvise(MADV_DONTNEED)`` on a range of a
file mapping drops those pages from the process (a later access reads them again
from the page cache), without unmapping anything: far cheaper than dropping the
mapping and loading the ``.pt`` again. The range is released only when it lies wholly
inside a mapping of that very file (same device and inode, per ``/proc/self/maps``),
so anonymous memory, whose pages ``MADV_DONTNEED`` would zero, is never touched.

:func:`trim_heap` gives back what the C allocator keeps after frees: glibc serves blocks
below its (adaptive, up to 32 MiB) mmap threshold from its heap and keeps them once freed.
:func:`map_large_blocks` fixes that threshold, for a process that frees many large blocks in turn.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the command line sets the allocator up before torch is imported
    from torch import Tensor

__all__ = ["map_large_blocks", "release_pages", "trim_heap"]

_MADV_DONTNEED = 4  # Linux
_MAPS = Path("/proc/self/maps")


def release_pages(path: Path, tensors: Iterable[Tensor]) -> bool:
    """Drop the resident pages under ``tensors`` (views of a mapping of ``path``) from this process.

    False, having released none or only some, where that cannot be done (not Linux, no
    ``/proc``, a tensor outside any mapping of the file, ``madvise`` refused): callers then
    bound the resident pages another way.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        spans = _file_mappings(os.stat(path))
    except OSError:
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    page = mmap.PAGESIZE
    for tensor in tensors:
        start = tensor.untyped_storage().data_ptr() + int(tensor.storage_offset()) * tensor.element_size()
        end = start + int(tensor.nbytes)
        span = next(((low, high) for low, high in spans if low <= start and end <= high), None)
        if span is None:
            return False
        low, high = start - start % page, min(span[1], -(-end // page) * page)  # pages it touches, in the mapping
        if high > low and libc.madvise(ctypes.c_void_p(low), ctypes.c_size_t(high - low), _MADV_DONTNEED) != 0:
            return False
    return True


def _file_mappings(stat: os.stat_result) -> list[tuple[int, int]]:
    """Address ranges of this process's mappings of the file ``stat`` describes."""
    device = f"{os.major(stat.st_dev):02x}:{os.minor(stat.st_dev):02x}"
    spans: list[tuple[int, int]] = []
    for line in _MAPS.read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) >= 5 and fields[3] == device and fields[4] == str(stat.st_ino):
            low, high = fields[0].split("-")
            spans.append((int(low, 16), int(high, 16)))
    return spans


def trim_heap() -> None:
    """Return the free pages of glibc's heap to the system (``malloc_trim``); elsewhere, nothing.

    Call it between phases whose buffers differ in size: the next phase's large blocks are
    mapped afresh and would not reuse the pages the last one freed, so both would count.
    """
    trim = _glibc("malloc_trim")
    if trim is not None:
        trim(0)


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
LARGE_BLOCK_BYTES = 1 << 20


def map_large_blocks(threshold: int = LARGE_BLOCK_BYTES) -> None:
    """Have glibc map every block of ``threshold`` bytes or more on its own, given back to the system when freed;
    elsewhere, nothing. For the command line's process, not a library caller's.

    glibc raises its mmap threshold to the size of each mapped block freed (up to 32 MiB), so a run that reads,
    collapses and frees one large layer after another serves the later ones from its heap and keeps their pages
    once freed: the process holds the high-water mark of many layers instead of one (about 1.5x one layer's
    collapse, measured on 2048 x 2048 layers). A fixed threshold turns that adaptation off.

    MKL (torch's BLAS) keeps its own pool of the buffers its large products used, about one layer's worth on
    2048 x 2048 layers; unless the environment says otherwise, its fast memory manager is turned off too, which
    must happen before torch is imported.
    """
    os.environ.setdefault("MKL_DISABLE_FAST_MM", "1")
    mallopt = _glibc("mallopt")
    if mallopt is not None:
        mallopt(_M_MMAP_THRESHOLD, threshold)


def _glibc(name: str) -> Callable[..., int] | None:
    """The C library's function ``name`` on Linux with glibc; None elsewhere (another OS, musl)."""
    if not sys.platform.startswith("linux"):
        return None
    function: Callable[..., int] | None = getattr(ctypes.CDLL(None), name, None)
    return function

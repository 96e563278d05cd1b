"""Timing helpers shared by the benchmark scripts (not a benchmark itself).

The scripts run as ``python benchmarks/<name>.py`` from the repository root, so this
directory is ``sys.path[0]`` and ``from _timing import ...`` works without packaging.

Candidates are always timed side by side in one run: after a warm-up, every round runs
each candidate once (in alternating order, A B then B A, so neither always follows the
other), and each candidate's figure is the median over rounds. A noisy, shared machine
then slows all candidates alike instead of biasing one.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from importlib import metadata
from pathlib import Path

__all__ = ["interleaved_medians", "machine_summary", "seconds", "speedup"]


def seconds(call: Callable[[], object], calls: int = 1) -> float:
    """Wall time of one call of ``call``, averaged over ``calls`` back-to-back calls."""
    start = time.perf_counter()
    for _ in range(calls):
        call()
    return (time.perf_counter() - start) / calls


def interleaved_medians(
    candidates: Mapping[str, Callable[[], object]],
    rounds: int,
    *,
    warmup: int = 1,
    calls: int = 1,
) -> dict[str, float]:
    """Median seconds per call of each candidate, timed interleaved over ``rounds`` rounds.

    ``warmup`` untimed calls of each candidate come first; a round times ``calls`` calls of
    each candidate in turn, reversing the order every other round.
    """
    names = list(candidates)
    for name in names:
        for _ in range(warmup):
            candidates[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for index in range(rounds):
        for name in names if index % 2 == 0 else reversed(names):
            samples[name].append(seconds(candidates[name], calls))
    return {name: statistics.median(times) for name, times in samples.items()}


def speedup(slow: float, fast: float) -> float:
    """How many times faster ``fast`` is than ``slow`` (both in seconds)."""
    return slow / fast


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_summary() -> str:
    """One line naming the machine and the versions that matter (read without importing torch)."""
    return (
        f"machine: {os.cpu_count()} cores ({_cpu_model()}), {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}, torch {_version('torch')}, onnxruntime {_version('onnxruntime')}, "
        f"onnx {_version('onnx')}"
    )

"""Shared test fixtures: per-test seeding, non-trivial batch-norms, scale-relative closeness; big grids.

Helpers are exposed as fixtures (not imports) because ``tests`` is not a package. Grids marked
``@pytest.mark.grid`` run a covering subset by default and every point with ``--exhaustive``,
which also runs the tests marked ``@pytest.mark.slow``.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import zlib
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:  # torch is imported where it is used: the pytest-xdist controller loads this file, runs no test,
    # and starts its workers only once it has (an `import torch` here delayed every run by ~1.5 s). numpy too: a
    # worker sets OMP_NUM_THREADS before anything loads OpenBLAS (see pytest_configure)
    from torch import Tensor, nn

RandomiseBatchNorm = Callable[["nn.Module"], None]
AssertScaledClose = Callable[["Tensor", "Tensor"], None]

TOLERANCES: dict[str, tuple[float, float]] = {
    "torch.float64": (1e-10, 1e-10),
    "torch.float32": (1e-5, 1e-5),
}
"""dtype under test (``str(dtype)``) -> (rtol, atol relative to the largest |expected|) for "collapsed equals expanded".

The collapse is exact up to rounding, and rounding error is relative to the size of the
values involved, so the absolute tolerance follows the output's magnitude.
"""


@pytest.fixture
def seed_torch(request: pytest.FixtureRequest) -> None:
    """Seed torch from the test id, so every item is reproducible on its own and items differ from each other.

    Not autouse: directories opt in from their own conftest, leaving other tests' RNG alone.
    """
    import torch

    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


def _randomise_batch_norm(module: nn.Module) -> None:
    """Give every batch-norm in ``module`` random running statistics and affine parameters.

    Fresh batch-norms are the identity in eval mode (mean 0, var 1, gamma 1, beta 0),
    which would hide any mistake in how the collapse folds them.
    """
    import torch
    from torch import nn

    with torch.no_grad():
        for norm in module.modules():
            if isinstance(norm, nn.modules.batchnorm._BatchNorm):
                norm.running_mean.normal_(0.0, 0.5)
                norm.running_var.uniform_(0.5, 2.0)
                norm.weight.uniform_(0.5, 1.5)
                norm.bias.normal_(0.0, 0.5)


@pytest.fixture
def randomise_batch_norm() -> RandomiseBatchNorm:
    return _randomise_batch_norm


def _assert_scaled_close(actual: Tensor, expected: Tensor) -> None:
    """``assert_close`` with the :data:`TOLERANCES` of ``actual``'s dtype, compared in ``expected``'s dtype.

    A float32 result may be checked against a float64 reference: that isolates its own
    rounding from the reference's.
    """
    import torch

    rtol, atol_scale = TOLERANCES[str(actual.dtype)]
    scale = expected.detach().abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual.to(expected.dtype), expected, rtol=rtol, atol=atol_scale * scale)


@pytest.fixture
def assert_scaled_close() -> AssertScaledClose:
    return _assert_scaled_close


# --- Big parametrised grids: a covering subset by default, every point with --exhaustive -----------------------

GridAxes = Callable[[Any], Sequence[Hashable]]


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist each worker computes on one thread: two workers already fill two cores, and more
    threads than cores made torch's spin-waiting threads slow everything down. numpy's OpenBLAS reads
    ``OMP_NUM_THREADS`` when it loads, so nothing imports numpy before this hook (an SVD of the inspect tests
    spun a second OpenBLAS thread beside the other worker).

    The processes the tests start (``epcli`` runs, fresh interpreters) inherit ``OMP_NUM_THREADS=1`` (unless it is
    set already) for the same reason: they run beside both workers, and their tiny models gain nothing from a
    second thread (its spin-waiting cost a verify run 0.2-1 CPU-s beside a busy worker)."""
    if hasattr(config, "workerinput"):
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        import torch

        torch.set_num_threads(1)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--exhaustive",
        action="store_true",
        default=os.environ.get("EPCLI_EXHAUSTIVE") == "1",
        help="run every point of @pytest.mark.grid grids (not a covering subset) and the @pytest.mark.slow tests "
        "(or EPCLI_EXHAUSTIVE=1): the scheduled CI job",
    )


TESTS = os.path.dirname(os.path.abspath(__file__))
RUN_FIRST = ("cli", "zoo")
"""Directories of ``tests/`` whose files start real ``epcli`` processes or build real models: they run first.

Under pytest-xdist the suite is shared out a file at a time (``--dist loadfile`` in ``pyproject.toml``: a module's
fixtures, such as a batch of subprocess runs, are made once, on one worker), each worker taking the next file when
it is done. With the files that take tens of seconds handed out first, the quick unit-test files fill the end and
both workers finish together; in collection order one worker ended up with every CLI file in a row."""


def _runs_first(item: pytest.Item) -> bool:
    return os.path.relpath(item.path, TESTS).split(os.sep)[0] in RUN_FIRST


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``@pytest.mark.slow`` tests are skipped unless ``--exhaustive``: they would take a large share of the run.

    The files of :data:`RUN_FIRST` are moved to the front (a stable sort: otherwise collection order)."""
    items.sort(key=lambda item: not _runs_first(item))
    if config.getoption("exhaustive"):
        return
    skip = pytest.mark.skip(reason="slow: runs with --exhaustive (EPCLI_EXHAUSTIVE=1), as the scheduled CI job does")
    for item in items:
        if item.get_closest_marker("slow"):
            item.add_marker(skip)


def covering_subset(rows: Sequence[Sequence[Hashable]], strength: int) -> list[int]:
    """Indices of rows that together hold every ``strength``-way combination of values held by any row.

    Greedy set cover over the given rows (each step takes the first row that adds the most
    uncovered combinations): deterministic, and every combination that occurs in the grid is
    in the subset. Only combinations that occur are targets, so constraints (invalid points
    left out of ``rows``) need no special handling. Combinations are numbered with numpy and
    gains kept up to date through an index of which rows hold each: a fraction of a second
    for ten thousand rows.
    """
    import numpy as np

    if not rows:
        return []
    values: list[dict[Hashable, int]] = [{} for _ in rows[0]]
    coded = np.array([[index.setdefault(v, len(index)) for index, v in zip(values, row, strict=True)] for row in rows])
    numbers, offset = [], 0
    for columns in itertools.combinations(range(len(values)), min(strength, len(values))):
        number = np.zeros(len(rows), dtype=np.int64)
        for c in columns:  # mixed radix: one number per combination of values in these columns
            number = number * len(values[c]) + coded[:, c]
        numbers.append(offset + number)
        offset += math.prod(len(values[c]) for c in columns)
    held = np.stack(numbers, axis=1)  # [row, column set] -> combination number; a row holds each at most once
    order = np.argsort(held, axis=None, kind="stable")
    holders = order // held.shape[1]  # rows, grouped by the combination they hold
    starts = np.searchsorted(held.ravel()[order], np.arange(offset + 1))
    gains = np.full(len(rows), held.shape[1])
    covered = np.zeros(offset, dtype=bool)
    chosen = []
    while gains.max() > 0:
        i = int(gains.argmax())
        new = held[i][~covered[held[i]]]
        covered[new] = True
        gains -= np.bincount(np.concatenate([holders[starts[c] : starts[c + 1]] for c in new]), minlength=len(rows))
        chosen.append(i)
    return sorted(chosen)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """``@pytest.mark.grid(cases, axes=..., strength=t, ids=...)`` parametrises ``case``.

    By default only a t-way covering subset of ``cases`` runs (``axes(case)`` gives the values
    that must be combined); ``--exhaustive`` runs all of them.
    """
    marker = metafunc.definition.get_closest_marker("grid")
    if marker is None:
        return
    cases: Sequence[Any] = marker.args[0]
    axes: GridAxes = marker.kwargs["axes"]
    if not metafunc.config.getoption("exhaustive"):
        cases = [cases[i] for i in covering_subset([axes(case) for case in cases], marker.kwargs["strength"])]
    metafunc.parametrize("case", cases, ids=marker.kwargs.get("ids"))


@pytest.fixture
def covering() -> Callable[[Sequence[Sequence[Hashable]], int], list[int]]:
    return covering_subset


# --- made once per run, whatever the number of workers -----------------------------------------------------------
Shared = Callable[[str, Callable[[Path], Any]], Any]


def _shared_by_workers(tmp_path_factory: pytest.TempPathFactory, name: str, make: Callable[[Path], Any]) -> Any:
    """``make(directory)``'s JSON-able result, made once per run: under pytest-xdist by the first worker that asks, in
    a directory of the run's temporary root, while the others wait on a lock and then read its record (the pattern
    pytest-xdist documents for session fixtures); without workers, or without ``fcntl``, made here.

    A ``make`` that fails leaves no record, so the next worker to ask makes it again, in a directory of its own."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    try:
        import fcntl
    except ImportError:  # not POSIX: each worker makes its own
        worker = None
    if worker is None:
        return make(tmp_path_factory.mktemp(name))
    root = tmp_path_factory.getbasetemp().parent  # the run's root, shared by its workers (a fresh one each run)
    record = root / f"{name}.json"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        if record.is_file():
            return json.loads(record.read_text())
        directory = root / f"{name}-{worker}"
        directory.mkdir()
        result = make(directory)
        record.write_text(json.dumps(result))
        return result


@pytest.fixture(scope="session")
def shared_by_workers(tmp_path_factory: pytest.TempPathFactory) -> Shared:
    """``shared_by_workers(name, make)``: ``make(directory)``'s JSON-able result, made by one worker for all of them.

    For data many tests only read (never modify) and every worker would otherwise make again."""
    return lambda name, make: _shared_by_workers(tmp_path_factory, name, make)


@dataclass(frozen=True)
class Bounded:
    """One ``epcli`` run in a child process under an address-space cap: exit code, output, peak RSS, wall time."""

    returncode: int
    stdout: str
    stderr: str
    max_rss: int  # bytes
    seconds: float

    @property
    def message(self) -> str:
        return " ".join(self.stderr.split())


BOUNDED_CAP = 4 * 2**30
"""The address space a bounded run may map (torch alone reserves ~1 GiB of it): a runaway allocation
fails in the child instead of exhausting the machine."""


def _run_bounded(
    *args: object, timeout: float = 120, cap: int = BOUNDED_CAP, env: dict[str, str] | None = None
) -> Bounded:
    import resource
    import shutil
    import subprocess
    import sys
    import threading
    import time

    script = shutil.which("epcli", path=os.path.dirname(sys.executable))
    argv = [script] if script else [sys.executable, "-m", "epcli"]
    environment = {k: v for k, v in os.environ.items() if k not in ("EPCLI_DEBUG", "FORCE_COLOR", "COLUMNS")}
    environment.update({"NO_COLOR": "1", "COLUMNS": "120", **(env or {})})

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    start = time.monotonic()
    child = subprocess.Popen(
        [*argv, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
        env=environment, preexec_fn=limit,
    )
    out: dict[str, bytes] = {}
    readers = [
        threading.Thread(target=lambda name=name, pipe=pipe: out.__setitem__(name, pipe.read()), daemon=True)
        for name, pipe in (("stdout", child.stdout), ("stderr", child.stderr))
    ]
    for reader in readers:
        reader.start()
    timer = threading.Timer(timeout, child.kill)
    timer.start()
    _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage, not every child's
    timer.cancel()
    child.returncode = os.waitstatus_to_exitcode(status)
    for reader in readers:
        reader.join()
    seconds = time.monotonic() - start
    assert seconds < timeout, f"epcli {args} ran for more than {timeout} s"
    return Bounded(
        child.returncode, out["stdout"].decode(errors="replace"), out["stderr"].decode(errors="replace"),
        usage.ru_maxrss * 1024, seconds,
    )


@pytest.fixture(scope="session")
def run_bounded() -> Callable[..., Bounded]:
    """``run_bounded(*args, timeout=120, cap=4 GiB, env=None)``: the installed ``epcli`` in a child process under an
    RLIMIT_AS cap, with its own peak RSS (``ru_maxrss``) and wall time."""
    return _run_bounded

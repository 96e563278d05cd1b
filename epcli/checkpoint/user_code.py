"""The one door through which epcli runs code the user named: a factory's module, the factory, a model's forward.

User code is not trusted to behave. nanoGPT prints ``number of parameters: ...`` while it
builds, so ``epcli verify --json`` would emit text before its JSON document; a script may
call ``sys.exit(0)``, which would end epcli with exit code 0 and nothing checked. Inside
:func:`user_code` whatever is written to stdout goes to stderr (``sys.stdout`` and file
descriptor 1, so ``print`` and C extensions alike), and a ``SystemExit`` becomes a
:class:`~epcli.errors.CheckpointError` naming who called it. Ctrl-C stays an interrupt.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

from epcli.errors import CheckpointError
from epcli.text import quote

__all__ = ["MODEL_FORWARD", "run_forward", "user_code"]

MODEL_FORWARD = "the model's forward"

_depth = [0]
"""How many doors are open: only the outermost one moves file descriptor 1 (a forward may run inside a factory)."""


@contextlib.contextmanager
def user_code(who: str, doing: str) -> Iterator[None]:
    """Run the body as user code: its stdout goes to stderr, its ``SystemExit`` raises :class:`CheckpointError`.

    ``who`` and ``doing`` name it in the message: ``model factory 'zoo:gpt'``, ``building the model``.
    """
    with _stdout_to_stderr():
        try:
            yield
        except SystemExit as e:
            raise CheckpointError(
                f"{who} called sys.exit({quote(e.code)}) while {doing}; epcli stopped there and checked nothing: "
                "a model factory must return the model, and a forward its output, without exiting"
            ) from e


def run_forward(model: Callable[..., Any], *inputs: Any, doing: str = "running on example inputs") -> Any:
    """``model(*inputs)`` through the door."""
    with user_code(MODEL_FORWARD, doing):
        return model(*inputs)


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """``sys.stdout`` and, for the outermost door, file descriptor 1 point at stderr; both restored after."""
    moved = None
    if _depth[0] == 0:
        with contextlib.suppress(Exception):  # a closed or replaced sys.stdout: nothing of ours to flush
            sys.stdout.flush()
        try:
            saved = os.dup(1)
            os.dup2(2, 1)
            moved = saved
        except OSError:  # no descriptor 1 or 2 (a daemon): sys.stdout alone is redirected
            pass
    _depth[0] += 1
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        _depth[0] -= 1
        if moved is not None:
            _flush_c_stdio()  # what C code buffered belongs to stderr, not to the stdout restored next
            os.dup2(moved, 1)
            os.close(moved)


def _flush_c_stdio() -> None:
    """``fflush(NULL)``: the C library's buffers are written out while descriptor 1 is still stderr."""
    with contextlib.suppress(Exception):  # no C library to ask (not POSIX): Python's own streams were redirected
        ctypes.CDLL(None).fflush(None)

"""Ctrl-C and SIGTERM unwind the stack, so atomic writers remove their temp files, and are remembered.

Python's default for SIGTERM is to die on the spot, leaving every temp file of a
write in progress behind. :func:`raise_on_signals` turns it into a :class:`Terminated`
exception instead (a ``BaseException``, like ``KeyboardInterrupt``, so no ``except
Exception`` swallows it); the command guard maps it to exit code 143 (128 + SIGTERM),
as shells report a killed process.

Both signals are also *recorded*: code that catches everything can mask them (an
interrupt that lands while torch imports ``torch._dynamo`` surfaces as an
``AttributeError`` from torch's own error handling, which the ONNX exporter then
reports as an export failure), so the guard asks :func:`signal_received` before it
blames the input.
"""

from __future__ import annotations

import signal
from types import FrameType

__all__ = ["EXIT_TERMINATED", "Terminated", "raise_on_signals", "signal_received"]

EXIT_TERMINATED = 128 + signal.SIGTERM

_received: list[int] = []


class Terminated(BaseException):
    """The process received SIGTERM."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    _received.append(signum)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM during clean-up ends the process
    raise Terminated


def _on_sigint(signum: int, frame: FrameType | None) -> None:
    _received.append(signum)
    raise KeyboardInterrupt


def raise_on_signals() -> None:
    """Install both handlers (main thread only, as Python requires)."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGINT, _on_sigint)


def signal_received() -> int | None:
    """The first SIGINT / SIGTERM this process received, if any."""
    return _received[0] if _received else None

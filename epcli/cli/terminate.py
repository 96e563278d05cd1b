"""SIGTERM handled like Ctrl-C: it unwinds the stack, so atomic writers remove their temp files.

Python's default for SIGTERM is to die on the spot, leaving every temp file of a
write in progress behind. :func:`raise_on_sigterm` turns the signal into a
:class:`Terminated` exception instead (a ``BaseException``, like
``KeyboardInterrupt``, so no ``except Exception`` swallows it); the command
guard maps it to exit code 143 (128 + SIGTERM), as shells report a killed process.
"""

from __future__ import annotations

import signal
from types import FrameType

__all__ = ["EXIT_TERMINATED", "Terminated", "raise_on_sigterm"]

EXIT_TERMINATED = 128 + signal.SIGTERM


class Terminated(BaseException):
    """The process received SIGTERM."""


def _raise(signum: int, frame: FrameType | None) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM during clean-up ends the process
    raise Terminated


def raise_on_sigterm() -> None:
    """Install the handler (main thread only, as Python requires)."""
    signal.signal(signal.SIGTERM, _raise)

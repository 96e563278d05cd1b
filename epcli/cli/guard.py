"""Turns library errors into exit codes and one-line messages (no tracebacks).

Exit codes: 0 success, 1 verification failed, 2 usage or input error.
``EPCLI_DEBUG=1`` also prints the traceback (the exit code stays the same).
"""

from __future__ import annotations

import functools
import os
import signal
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

import typer

from epcli.cli import render
from epcli.cli.options import OutputMode
from epcli.cli.terminate import EXIT_TERMINATED, Terminated, signal_received
from epcli.errors import EpcliError

__all__ = ["EXIT_INPUT_ERROR", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_VERIFY_FAILED", "guarded"]

EXIT_OK = 0
EXIT_VERIFY_FAILED = 1
EXIT_INPUT_ERROR = 2
EXIT_INTERRUPTED = 130
"""128 + SIGINT, as shells report a process stopped by Ctrl-C."""

F = TypeVar("F", bound=Callable[..., Any])


def _debug() -> bool:
    return os.environ.get("EPCLI_DEBUG", "").strip() not in ("", "0", "false", "no")


def _show_traceback_if_debugging() -> None:
    if _debug():
        render.plain(traceback.format_exc())


def guarded(command: F, *, name: str | None = None, mode: OutputMode | None = None) -> F:
    """Run a command body; map EpcliError (and any other failure) to exit code 2 with a message.

    ``mode`` is the command line's ``--json`` / ``-q`` (:func:`~epcli.cli.options.output_mode`): with ``--json``
    the failure is also reported as the one JSON document on stdout, so a CI step that parses stdout always gets a
    document; so is an interrupt (``Interrupted``, exit 130) or SIGTERM (``Terminated``, exit 143). ``name`` names
    the command in that document (default: the function's name without ``_command``).
    """
    command_name = name or command.__name__.removesuffix("_command")
    output = mode or OutputMode()

    def fail(message: str, error_type: str, code: int = EXIT_INPUT_ERROR) -> None:
        _show_traceback_if_debugging()
        render.error(message)
        if output.json:
            render.emit_json(command_name, {"passed": False, "error": {"type": error_type, "message": message}})
        raise typer.Exit(code)

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        render.configure(json_output=output.json, quiet=output.quiet)
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except KeyboardInterrupt:
            fail("interrupted", "Interrupted", EXIT_INTERRUPTED)
        except Terminated:
            fail("terminated", "Terminated", EXIT_TERMINATED)
        except Exception as e:
            if signal_received() == signal.SIGINT:  # the interrupt was caught and re-raised as something else
                fail("interrupted", "Interrupted", EXIT_INTERRUPTED)
            if signal_received() == signal.SIGTERM:
                fail("terminated", "Terminated", EXIT_TERMINATED)
            if isinstance(e, EpcliError):
                fail(str(e), type(e).__name__)
            # a bug or an error from a user-named model factory
            fail(f"unexpected {type(e).__name__}: {e} (set EPCLI_DEBUG=1 for the traceback)", type(e).__name__)

    return wrapper  # type: ignore[return-value]

"""The one path every command's outcome takes: exit code, JSON document, JUnit XML, GitHub annotations.

A command body returns an :class:`Outcome` or raises; :func:`guarded` turns either into the
same envelope, so a gate written against one command works against every command:

* the exit code (:data:`EXIT_CODES`, by error class; the table ``--help`` and the docs show),
* with ``--json``, one document on stdout: ``schema_version``, ``command``, ``passed``,
  ``exit_code``, ``error`` (null, or ``{type, message, file}``), ``warnings``, and the command's fields,
* with ``--junit-xml FILE``, a JUnit report of the comparisons (or of the error),
* on GitHub Actions, ``::error`` / ``::warning`` annotations and the step summary.

No traceback is shown unless ``EPCLI_DEBUG=1`` (the exit code stays the same).
"""

from __future__ import annotations

import functools
import os
import signal
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import typer

from epcli.cli import ci_reports, render
from epcli.cli.ci_reports import CaseTable, ErrorInfo
from epcli.cli.options import OutputMode
from epcli.cli.terminate import EXIT_TERMINATED, Terminated, signal_received
from epcli.errors import EpcliError, OutputError, UsageError, VerificationError
from epcli.storage.paths import check_output

__all__ = [
    "EXIT_CODES",
    "EXIT_INPUT",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_OUTPUT",
    "EXIT_USAGE",
    "EXIT_VERIFY_FAILED",
    "Outcome",
    "exit_code",
    "guarded",
    "usage_error",
]

EXIT_OK = 0
EXIT_VERIFY_FAILED = 1
EXIT_USAGE = 2
EXIT_INPUT = 3
EXIT_OUTPUT = 4
EXIT_INTERRUPTED = 130
"""128 + SIGINT, as shells report a process stopped by Ctrl-C."""

EXIT_CODES: Mapping[type[BaseException], int] = {
    VerificationError: EXIT_VERIFY_FAILED,
    UsageError: EXIT_USAGE,
    OutputError: EXIT_OUTPUT,
    EpcliError: EXIT_INPUT,  # CheckpointError, ConfigError, ShapeMismatchError, ExportError, and their subclasses
    KeyboardInterrupt: EXIT_INTERRUPTED,
    Terminated: EXIT_TERMINATED,
}
"""The one mapping from error class to exit code; an error takes the code of its nearest class here. Anything
else (an error epcli did not anticipate) is reported like an unusable input."""

F = TypeVar("F", bound=Callable[..., Any])


def exit_code(error: BaseException) -> int:
    """The exit code of ``error``: that of the first class of its MRO in :data:`EXIT_CODES`."""
    return next((EXIT_CODES[cls] for cls in type(error).__mro__ if cls in EXIT_CODES), EXIT_INPUT)


@dataclass(frozen=True)
class Outcome:
    """What a command body returns to the guard.

    ``payload`` is the command's own JSON fields; ``failure`` says in one line why it did not pass (None when it
    passed); ``tables`` are the comparisons, for JUnit and the step summary; ``warnings`` qualify the result.
    """

    payload: Mapping[str, Any]
    failure: str | None = None
    tables: tuple[CaseTable, ...] = ()
    warnings: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        return self.failure is None


def _debug() -> bool:
    return os.environ.get("EPCLI_DEBUG", "").strip() not in ("", "0", "false", "no")


def guarded(
    command: F, *, name: str | None = None, mode: OutputMode | None = None, subject: str | None = None
) -> F:
    """Run a command body and report its :class:`Outcome` or error through the one envelope (module docstring).

    ``mode`` is the command line's ``--json`` / ``-q`` / ``--junit-xml``; ``name`` names the command (default: the
    function's name without ``_command``); ``subject`` is the checkpoint argument, the file an error or a failed
    comparison is annotated on when the error names none.
    """
    command_name = name or command.__name__.removesuffix("_command")
    output = mode or OutputMode()

    def report(
        payload: Mapping[str, Any], code: int, error: ErrorInfo | None, outcome: Outcome | None, junit: bool = True
    ) -> None:
        """``outcome`` is None when the run stopped on ``error``; with an outcome, ``error`` is why it failed.
        ``junit=False``: the JUnit report's own path was refused, so it is not tried (the error said it once)."""
        tables = outcome.tables if outcome is not None else ()
        warnings = outcome.warnings if outcome is not None else ()
        if output.junit_xml is not None and junit:
            unwritable = _write_junit(output.junit_xml, command_name, tables, error if outcome is None else None)
            if unwritable is not None:
                render.error(unwritable.message)
                if outcome is not None:  # an error that stopped the run keeps its own code
                    payload, code, error, tables = {}, EXIT_OUTPUT, unwritable, ()
        if ci_reports.github_actions():
            _github(command_name, tables, warnings, error, code, subject)
        if output.json:
            document = {
                **payload,
                "passed": code == EXIT_OK,
                "exit_code": code,
                "error": None if error is None else {"type": error.type, "message": error.message, "file": error.file},
                "warnings": list(warnings),
            }
            render.emit_json(command_name, document)
        if code != EXIT_OK:
            raise typer.Exit(code)

    def fail(error: BaseException, message: str, error_type: str, junit: bool = True) -> None:
        if _debug():
            render.plain(traceback.format_exc())
        render.error(message)
        file = getattr(error, "file", None) or subject
        code = exit_code(error)
        report({}, code, ErrorInfo(error_type, render.printable(message), file), None, junit)

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        render.configure(json_output=output.json, quiet=output.quiet)
        try:
            if output.junit_xml is not None:  # checked (and its directory made) before any work; rewritten each run
                try:
                    check_output(output.junit_xml, (".xml",), force=True, option="--junit-xml", example="report.xml")
                except EpcliError as e:  # a directory (exit 4, as for -o DIR), a wrong suffix (2): said once
                    fail(e, str(e), type(e).__name__, junit=False)
            outcome = command(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except KeyboardInterrupt as e:
            fail(e, "interrupted", "Interrupted")
        except Terminated as e:
            fail(e, "terminated", "Terminated")
        except Exception as e:
            if signal_received() == signal.SIGINT:  # the interrupt was caught and re-raised as something else
                fail(KeyboardInterrupt(), "interrupted", "Interrupted")
            elif signal_received() == signal.SIGTERM:
                fail(Terminated(), "terminated", "Terminated")
            elif isinstance(e, EpcliError):
                fail(e, str(e), type(e).__name__)
            else:  # a bug: say so, with the way to see the traceback
                fail(e, f"unexpected {type(e).__name__}: {e} (set EPCLI_DEBUG=1 for the traceback)", type(e).__name__)
        else:
            assert isinstance(outcome, Outcome), f"{command_name} returned {outcome!r}, not an Outcome"
            read = _directory_read(subject)
            if read is not None:
                render.warning(read)
                outcome = replace(outcome, warnings=(read, *outcome.warnings))
            error = None
            if outcome.failure is not None:
                error = ErrorInfo(VerificationError.__name__, render.printable(outcome.failure), subject)
            report(outcome.payload, EXIT_OK if outcome.passed else EXIT_VERIFY_FAILED, error, outcome)

    return wrapper  # type: ignore[return-value]


def _directory_read(subject: str | None) -> str | None:
    """Which file a directory argument was read from, when the directory holds other checkpoints beside it."""
    if subject is None or not Path(subject).is_dir():
        return None
    from epcli.storage.source import SUFFIXES, directory_file

    read = directory_file(Path(subject))
    if read is None:
        return None
    others = sorted(p.name for p in read.parent.iterdir() if p != read and p.name.lower().endswith(SUFFIXES))
    also = f" (also there: {', '.join(others)}; name a file to read another)" if others else ""
    return f"{subject} is a directory: read {read}{also}"


def _write_junit(path: Path, command: str, tables: tuple[CaseTable, ...], error: ErrorInfo | None) -> ErrorInfo | None:
    """Write the JUnit report atomically; an error that stops it is returned (the run then fails with exit 4)."""
    from epcli.storage.atomic import atomic_write

    xml = ci_reports.junit_xml(command, tables, error)
    try:
        atomic_write(path, lambda handle: handle.write(xml))
    except OutputError as e:
        return ErrorInfo(OutputError.__name__, f"--junit-xml: {e}", str(path))
    return None


def _github(
    command: str,
    tables: tuple[CaseTable, ...],
    warnings: tuple[str, ...],
    error: ErrorInfo | None,
    code: int,
    subject: str | None,
) -> None:
    """Annotations on stderr (the runner reads workflow commands from both streams), and the step summary."""
    title = f"epcli {command}"
    for text in warnings:
        render.workflow_command(ci_reports.annotation("warning", text, file=subject, title=title))
    failures = [(table, case) for table in tables for case in table.cases if case.failure is not None]
    for table, case in failures:
        message = f"{table.title}: {case.name}: {case.failure}"
        render.workflow_command(ci_reports.annotation("error", message, file=subject, title=title))
    if error is not None and not failures:
        render.workflow_command(ci_reports.annotation("error", error.message, file=error.file, title=title))
    verdict = "**passed**" if code == EXIT_OK else f"**failed** (exit code {code})"
    if error is not None:
        verdict += f": {error.message}"
    try:
        ci_reports.append_summary(ci_reports.step_summary(command, tables, verdict, warnings))
    except OSError as e:
        render.warning(f"cannot append to $GITHUB_STEP_SUMMARY ({e.strerror or e}); the step summary is missing")


def usage_error(command: str, message: str, *, json_output: bool) -> None:
    """Report a command line that did not parse (click prints the message and exits 2): the JSON document and the
    GitHub annotation, as for any other error. No JUnit report: the options that would name it did not parse."""
    if ci_reports.github_actions():
        render.workflow_command(ci_reports.annotation("error", message, title=f"epcli {command}"))
    if json_output:
        error = {"type": UsageError.__name__, "message": message, "file": None}
        render.emit_json(command, {"passed": False, "exit_code": EXIT_USAGE, "error": error, "warnings": []})

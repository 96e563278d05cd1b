"""The only module that talks to the terminal.

Three channels. The human report (tables, summaries, "wrote ...") goes to stdout, so
``epcli inspect x | less`` shows it; with ``--json`` stdout carries the one JSON document
alone and the report moves to stderr; ``--quiet`` drops the report. Messages (errors,
warnings) and progress always go to stderr. ``NO_COLOR`` (any non-empty value) turns every
style off, not only colour; rich drops styles and animation when a stream is not a terminal.

Everything printed goes through :func:`printable` first: file content (a shard name, a
layer path) can hold control characters, and they are shown escaped, never sent to the
terminal.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

__all__ = [
    "JSON_SCHEMA_VERSION",
    "configure",
    "emit_json",
    "error",
    "info",
    "plain",
    "printable",
    "progress",
    "success",
    "table",
    "warning",
    "workflow_command",
]

JSON_SCHEMA_VERSION = 1
"""Version of every ``--json`` document; bumped when a field changes meaning or disappears."""

_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u2028-\u202e\u2066-\u2069]")
"""C0 (but newline and tab), DEL, C1, and the Unicode controls that reorder or break lines."""


def printable(text: str) -> str:
    """``text`` with every control character shown as an escape (``\\x1b``), so it cannot drive the terminal."""
    return _CONTROL.sub(
        lambda match: f"\\x{ord(match.group()):02x}" if ord(match.group()) < 0x100 else f"\\u{ord(match.group()):04x}",
        text,
    )


_LOG_WIDTH = 100_000
"""The width of a stream that is not a terminal (a CI log, a pipe, a file): nothing is cut or wrapped."""


def _console(*, stderr: bool) -> Console:
    no_color = bool(os.environ.get("NO_COLOR"))  # https://no-color.org: set and not empty
    stream = sys.stderr if stderr else sys.stdout
    # the stream itself, not rich's guess (FORCE_COLOR makes rich treat a log as a terminal of 80 columns)
    on_terminal = hasattr(stream, "isatty") and stream.isatty()
    return Console(
        stderr=stderr,
        highlight=False,
        soft_wrap=False,
        color_system=None if no_color else "auto",
        width=None if on_terminal else _LOG_WIDTH,
    )


_messages = _console(stderr=True)
_report: Console | None = _console(stderr=False)


def configure(*, json_output: bool = False, quiet: bool = False) -> None:
    """Called once per command, before it prints: where the report goes, and the environment's colour rules."""
    global _messages, _report
    _messages = _console(stderr=True)
    _report = None if quiet else _console(stderr=json_output)


def _json_safe(value: Any) -> Any:
    """NaN/Inf are not JSON: report them as null rather than emit an invalid document."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def emit_json(command: str, payload: Mapping[str, Any]) -> None:
    """Write exactly one JSON document to stdout (control characters are escaped by the JSON encoder)."""
    document = {"schema_version": JSON_SCHEMA_VERSION, "command": command, **payload}
    sys.stdout.write(json.dumps(_json_safe(document), indent=2, sort_keys=True, allow_nan=False) + "\n")
    sys.stdout.flush()


def table(
    title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], *, footer: Sequence[Any] | None = None
) -> None:
    if _report is None:
        return
    _report.print(escape(printable(title)))  # a line of its own: a table's title is padded to the table's width
    view = Table(show_footer=footer is not None)
    for index, name in enumerate(columns):
        numeric = bool(rows) and all(isinstance(row[index], (int, float)) for row in rows)
        view.add_column(
            name, justify="right" if numeric else "left", footer="" if footer is None else _cell(footer[index])
        )
    for row in rows:
        view.add_row(*(_cell(value) for value in row))
    _report.print(view)


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return "[green]yes[/]" if value else "[red]NO[/]"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.3g}"
    if isinstance(value, int):
        return f"{value:,}"
    return escape(printable(str(value)))


def plain(text: str) -> None:
    """Raw text on stderr: no markup, highlighting or wrapping (tracebacks)."""
    _messages.out(printable(text), highlight=False)


def info(message: str) -> None:
    """A line of the report."""
    if _report is not None:
        _report.print(escape(printable(message)))


def success(message: str) -> None:
    """The report's last line: what was done."""
    if _report is not None:
        _report.print(f"[green]✓[/] {escape(printable(message))}")


def warning(message: str) -> None:
    """Something the user should know that does not stop the command (stderr, also with --quiet; one line)."""
    _messages.print(f"[yellow]warning:[/] {escape(printable(message))}", soft_wrap=True)


def workflow_command(line: str) -> None:
    """A CI runner's command line (``::error ...::``) on stderr, exactly as given: already escaped for the runner."""
    sys.stderr.write(printable(line) + "\n")
    sys.stderr.flush()


def error(message: str) -> None:
    """One line on stderr whatever the terminal's width, so a CI log or ``grep`` sees the whole message."""
    _messages.print(f"[red]error:[/] {escape(printable(message))}", soft_wrap=True)


class _Count(ProgressColumn):
    """``done/total``, or nothing while the total is not known yet."""

    def render(self, task: Task) -> Text:
        return Text("" if task.total is None else f"{task.completed:g}/{task.total:g}")


@contextmanager
def progress() -> Iterator[Callable[[int, int, str], None]]:
    """A transient progress bar on stderr, drawn only on a terminal; yields ``report(done, total, label)``."""
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        _Count(),
        TimeElapsedColumn(),
        console=_messages,
        transient=True,
        disable=not _messages.is_terminal,
    )
    with bar:
        task = bar.add_task("", total=None)
        yield lambda done, total, label: bar.update(
            task, completed=done, total=total, description=escape(printable(label))
        )

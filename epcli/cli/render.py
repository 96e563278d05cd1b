"""The only module that talks to the terminal.

Data goes to stdout (one JSON document with ``--json``); tables, progress and
messages go to stderr through one rich Console. Rich already follows NO_COLOR
and drops colour and animation when stderr is not a terminal.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

__all__ = ["JSON_SCHEMA_VERSION", "console", "emit_json", "error", "info", "plain", "progress", "success", "table"]

JSON_SCHEMA_VERSION = 1
"""Version of every ``--json`` document; bumped when a field changes meaning or disappears."""

console = Console(stderr=True, highlight=False, soft_wrap=False)


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
    """Write exactly one JSON document to stdout."""
    document = {"schema_version": JSON_SCHEMA_VERSION, "command": command, **payload}
    sys.stdout.write(json.dumps(_json_safe(document), indent=2, sort_keys=True, allow_nan=False) + "\n")
    sys.stdout.flush()


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], *, footer: Sequence[Any] | None = None) -> None:
    view = Table(title=title, title_justify="left", show_footer=footer is not None)
    for index, name in enumerate(columns):
        numeric = bool(rows) and all(isinstance(row[index], (int, float)) for row in rows)
        view.add_column(name, justify="right" if numeric else "left", footer="" if footer is None else str(footer[index]))
    for row in rows:
        view.add_row(*(_cell(value) for value in row))
    console.print(view)


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return "[green]yes[/]" if value else "[red]NO[/]"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.3g}"
    if isinstance(value, int):
        return f"{value:,}"
    return escape(str(value))


def plain(text: str) -> None:
    """Raw text on stderr: no markup, highlighting or wrapping (tracebacks)."""
    console.out(text, highlight=False)


def info(message: str) -> None:
    console.print(escape(message))


def success(message: str) -> None:
    console.print(f"[green]✓[/] {escape(message)}")


def error(message: str) -> None:
    console.print(f"[red]error:[/] {escape(message)}")


@contextmanager
def progress() -> Iterator[Callable[[int, int, str], None]]:
    """A transient progress bar on stderr, drawn only on a terminal; yields ``report(done, total, label)``."""
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    )
    with bar:
        task = bar.add_task("", total=None)
        yield lambda done, total, label: bar.update(task, completed=done, total=total, description=escape(label))

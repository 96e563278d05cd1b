"""The ``epcli`` Typer app: registers one command per module.

Nothing heavy is imported here or in the command modules at import time: torch,
onnx and onnxruntime load inside a command body, so ``--help`` and usage errors
stay instant.
"""

from __future__ import annotations

import typer

from epcli.cli import collapse, export, inspect, verify
from epcli.cli.terminate import EXIT_TERMINATED, Terminated, raise_on_sigterm

__all__ = ["app", "main"]

app = typer.Typer(
    name="epcli",
    help="Collapse expand-and-project (EP) checkpoints exactly, verify them, and export them "
    "(safetensors, ONNX).\n\nExit codes: 0 success, 1 verification failed, 2 usage or input error.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
app.command("collapse", no_args_is_help=True)(collapse.collapse_command)
app.command("verify", no_args_is_help=True)(verify.verify_command)
app.command("export", no_args_is_help=True)(export.export_command)
app.command("inspect", no_args_is_help=True)(inspect.inspect_command)


def _print_version(value: bool) -> None:
    if value:
        from epcli import __version__

        typer.echo(__version__)
        raise typer.Exit(0)


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", help="Print the epcli version and exit.", is_eager=True, callback=_print_version
    ),
) -> None:
    """Collapse, verify, export and inspect EP checkpoints."""


def main() -> None:
    """Console-script entry point; SIGTERM cleans up like Ctrl-C and exits 143."""
    raise_on_sigterm()
    try:
        app()
    except Terminated:  # arrived outside a command body (the guard handles it inside)
        raise SystemExit(EXIT_TERMINATED) from None

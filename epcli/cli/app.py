"""The ``epcli`` Typer app: registers one command per module.

Two small Typer subclasses carry the contract that lives outside any command body:
``--json`` / ``-q``, which belong to the group and are accepted before or after the
command's name; every command body run under the guard (:mod:`epcli.cli.guard`), which
turns the :class:`~epcli.cli.guard.Outcome` it returns, or its error, into the exit code,
the JSON document and the CI reports (a command that compares is a ``_GateCommand`` and
also takes ``--junit-xml``);
usage lines that read ``CKPT [ARTIFACT]``; and usage errors that, with ``--json``,
are also the one JSON document on stdout.

Nothing heavy is imported here or in the command modules at import time: torch,
onnx and onnxruntime load inside a command body, so ``--help`` and usage errors
stay instant.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup

from epcli.cli import collapse, compress, export, inspect, render, verify
from epcli.cli.guard import EXIT_USAGE, guarded, usage_error
from epcli.cli.options import junit_option, output_mode, output_options
from epcli.cli.terminate import EXIT_TERMINATED, Terminated, raise_on_signals
from epcli.storage.mapped_pages import map_large_blocks

__all__ = ["app", "main"]

_ClickUsageError: type[Any] = next(cls for cls in typer.BadParameter.__mro__ if cls.__name__ == "UsageError")
"""click's ``UsageError``, the base of every command-line parsing error. Typer exports only its subclass
``BadParameter`` (and from some version on vendors click in a private module), so it is found from that."""


class _Command(TyperCommand):
    """A command that takes the group's ``--json`` / ``-q`` too, runs its body under the guard, and whose usage
    line reads ``CKPT [ARTIFACT]`` (Typer writes required arguments as ``{name}``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.params.extend(output_options())

    def invoke(self, ctx: Any) -> Any:
        checkpoint = ctx.params.get("checkpoint")
        subject = None if checkpoint is None else str(checkpoint)
        return guarded(super().invoke, name=self.name, mode=output_mode(ctx), subject=subject)(ctx)

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if isinstance(param, TyperArgument):
                pieces.append(param.display_name_raw if param.required else f"[{param.display_name_raw}]")
            else:
                pieces.extend(param.get_usage_pieces(ctx))
        return pieces


class _GateCommand(_Command):
    """A command that compares, and so also writes a JUnit report on request (``--junit-xml FILE``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.params.append(junit_option())


class _Group(TyperGroup):
    """The root group: with ``--json`` among the arguments, a usage error is also the one JSON document on stdout.

    Usage errors (an unknown option, a bad value) happen while the arguments are parsed,
    before any command body (and its guard) runs, so they are caught here; the message still
    goes to stderr and the exit code stays 2.
    """

    _argv: Sequence[str] = ()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.params.extend(output_options())

    def main(self, args: Sequence[str] | None = None, *rest: Any, **kwargs: Any) -> Any:
        self._argv = list(sys.argv[1:] if args is None else args)
        return super().main(args, *rest, **kwargs)

    def make_context(self, *args: Any, **kwargs: Any) -> Any:
        with self._usage_errors_as_json():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx: Any) -> Any:
        with self._usage_errors_as_json():
            return super().invoke(ctx)

    @contextmanager
    def _usage_errors_as_json(self) -> Iterator[None]:
        try:
            yield
        except _ClickUsageError as error:
            command = next((arg for arg in self._argv if arg in self.commands), "epcli")
            usage_error(command, render.printable(error.format_message()), json_output="--json" in self._argv)
            error.exit_code = EXIT_USAGE
            raise


EXIT_CODE_HELP = (
    "Exit codes: 0 passed; 1 verification failed (out of tolerance, stale artifact); 2 command-line usage "
    "(including --input-shape/--input the model rejects or too big for a check, more samples than a check holds); "
    "3 an input that cannot be used (missing, unreadable, corrupt, unsafe, unsupported, does not fit the model, "
    "input specs recorded in the checkpoint the model rejects); "
    "4 an output that cannot be written (exists without --force, permissions, disk full, read-only directory); "
    "130 / 143 interrupted / terminated. With --json the code is also the document's exit_code."
)

app = typer.Typer(
    name="epcli",
    cls=_Group,
    help="Collapse expand-and-project (EP) checkpoints exactly, verify them, and export them "
    "(safetensors, ONNX).",
    epilog=EXIT_CODE_HELP,
    context_settings={"help_option_names": ["-h", "--help"]},
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
app.command("collapse", cls=_GateCommand, no_args_is_help=True)(collapse.collapse_command)
app.command("verify", cls=_GateCommand, no_args_is_help=True)(verify.verify_command)
app.command("export", cls=_GateCommand, no_args_is_help=True)(export.export_command)
app.command("inspect", cls=_Command, no_args_is_help=True)(inspect.inspect_command)
app.command("compress", cls=_Command, no_args_is_help=True)(compress.compress_command)


def _print_version(value: bool) -> None:
    if value:
        from epcli._version import __version__

        typer.echo(__version__)
        raise typer.Exit(0)


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "-V", "--version", help="Print the epcli version and exit.", is_eager=True, callback=_print_version
    ),
) -> None:
    """Collapse, verify, export and inspect EP checkpoints."""


def main() -> None:
    """Console-script entry point; SIGTERM cleans up like Ctrl-C and exits 143."""
    raise_on_signals()
    map_large_blocks()  # a layer's freed blocks go back to the system before the next layer is read
    try:
        app()
    except Terminated:  # arrived outside a command body (the guard handles it inside)
        raise SystemExit(EXIT_TERMINATED) from None

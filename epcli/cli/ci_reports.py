"""What CI systems read besides the exit code: JUnit XML, GitHub Actions annotations and the step summary.

Every command that compares hands the guard the same :class:`CaseTable` s its human table shows
(:mod:`epcli.cli.reports` builds them from the result objects), so the three reports and the
table never disagree. This module only formats; :mod:`epcli.cli.guard` decides when to write.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "Case",
    "CaseTable",
    "ErrorInfo",
    "annotation",
    "append_summary",
    "github_actions",
    "junit_xml",
    "step_summary",
]


@dataclass(frozen=True)
class Case:
    """One comparison: ``cells`` are its row in the table; ``failure`` (numbers and tolerance) when it failed,
    ``skipped`` (why) when it was not made."""

    name: str
    cells: tuple[str, ...] = ()
    failure: str | None = None
    skipped: str | None = None


@dataclass(frozen=True)
class CaseTable:
    """The comparisons of one report, as its table shows them (``columns`` name ``Case.cells``)."""

    title: str
    columns: tuple[str, ...]
    cases: tuple[Case, ...]


@dataclass(frozen=True)
class ErrorInfo:
    """Why a command stopped: the error class's name, its one-line message, and the file at fault if known."""

    type: str
    message: str
    file: str | None


def junit_xml(command: str, tables: Sequence[CaseTable], error: ErrorInfo | None) -> bytes:
    """One ``<testsuite>`` per table, one ``<testcase>`` per comparison; a run stopped by an error is one suite
    with one errored case (the form GitLab, Jenkins, Azure DevOps and GitHub's JUnit reporters all read)."""
    root = ET.Element("testsuites", name=f"epcli {command}")
    if error is not None:
        suite = _suite(root, f"epcli {command}", 1)
        suite.set("errors", "1")
        case = ET.SubElement(suite, "testcase", classname=f"epcli.{command}", name=error.file or command)
        ET.SubElement(case, "error", type=error.type, message=error.message).text = error.message
    for table in tables:
        suite = _suite(root, table.title, len(table.cases))
        suite.set("failures", str(sum(case.failure is not None for case in table.cases)))
        suite.set("skipped", str(sum(case.skipped is not None for case in table.cases)))
        for item in table.cases:
            case = ET.SubElement(suite, "testcase", classname=f"epcli.{command}", name=item.name)
            if item.failure is not None:
                ET.SubElement(case, "failure", type="VerificationError", message=item.failure).text = item.failure
            elif item.skipped is not None:
                ET.SubElement(case, "skipped", message=item.skipped)
    for name in ("tests", "failures", "errors", "skipped"):
        root.set(name, str(sum(int(suite.get(name, "0")) for suite in root)))
    ET.indent(root)
    return bytes(ET.tostring(root, encoding="utf-8", xml_declaration=True)) + b"\n"


def _suite(root: ET.Element, name: str, tests: int) -> ET.Element:
    return ET.SubElement(root, "testsuite", name=name, tests=str(tests), failures="0", errors="0", skipped="0")


def github_actions() -> bool:
    """Running as a GitHub Actions step (the runner sets ``GITHUB_ACTIONS=true``)."""
    return os.environ.get("GITHUB_ACTIONS") == "true"


def _escape_data(text: str) -> str:
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _escape_property(text: str) -> str:
    return _escape_data(text).replace(":", "%3A").replace(",", "%2C")


def annotation(level: str, message: str, *, file: str | None = None, title: str | None = None) -> str:
    """A workflow command (``::error file=x,title=y::message``), escaped as GitHub's runner unescapes it."""
    properties = ",".join(
        f"{key}={_escape_property(value)}" for key, value in (("file", file), ("title", title)) if value is not None
    )
    return f"::{level}{' ' + properties if properties else ''}::{_escape_data(message)}"


def step_summary(command: str, tables: Sequence[CaseTable], verdict: str, warnings: Sequence[str]) -> str:
    """Markdown for ``$GITHUB_STEP_SUMMARY``: each comparison table, the verdict, and the warnings."""
    lines = [f"### epcli {command}", ""]
    for table in tables:
        lines += [f"**{_cell(table.title)}**", ""]
        lines.append("| " + " | ".join(_cell(text) for text in ("compared", *table.columns, "result")) + " |")
        lines.append("|" + " --- |" * (len(table.columns) + 2))
        for case in table.cases:
            result = "failed" if case.failure is not None else "skipped" if case.skipped is not None else "passed"
            lines.append("| " + " | ".join(_cell(text) for text in (case.name, *case.cells, result)) + " |")
        lines.append("")
    lines += [_cell(verdict), ""]  # a failure names <model>
    lines += [f"- warning: {_cell(text)}" for text in warnings]
    return "\n".join(lines).rstrip("\n") + "\n\n"


def _cell(text: str) -> str:
    """Text for a Markdown table cell: ``<model>`` would be read as an HTML tag and vanish, ``|`` end the cell."""
    escaped = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return escaped.replace("|", "\\|").replace("\n", " ")


def append_summary(markdown: str) -> Path | None:
    """Append to the file GitHub names in ``GITHUB_STEP_SUMMARY`` (None when it names none)."""
    name = os.environ.get("GITHUB_STEP_SUMMARY")
    if not name:
        return None
    path = Path(name)
    with path.open("a", encoding="utf-8") as handle:
        handle.write(markdown)
    return path

"""The documentation runs as written: every ``bash`` and ``python`` block of README.md and docs/*.md.

CONTRIBUTING.md's convention: those blocks run from the repository root, in the venv; outputs and templates are
``text`` / ``yaml``. Here they run in order, in a temporary root holding a copy of ``sample_checkpoints/`` (the
only repository files the blocks read), with this interpreter's ``epcli`` and ``python`` first on PATH and the
checkout on PYTHONPATH. Two kinds of block are skipped, each by a named rule (:data:`SKIPPED`).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SKIPPED = {
    "creates a virtual environment and installs into it (CI's first step does this)": re.compile(r"-m venv\b"),
    "runs the test suite, which this test is part of": re.compile(r"-m pytest\b"),
}
_BLOCK = re.compile(r"^```(bash|python)\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def blocks() -> list[tuple[str, str, str]]:
    """(where, language, code) of every bash / python block, in document order."""
    found = []
    for document in DOCUMENTS:
        text = document.read_text()
        for match in _BLOCK.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            found.append((f"{document.relative_to(ROOT)}:{line}", match.group(1), match.group(2)))
    return found


def skip_reason(code: str) -> str | None:
    return next((reason for reason, pattern in SKIPPED.items() if pattern.search(code)), None)


def test_every_block_is_run_or_skipped_by_a_named_rule():
    found = blocks()
    assert len(found) > 10, "the block pattern finds the documentation's blocks"
    skipped = [where for where, _, code in found if skip_reason(code)]
    assert [where.split(":")[0] for where in skipped] == ["README.md", "README.md"], skipped


@pytest.mark.slow
def test_documentation_blocks_run_as_written(tmp_path):
    root = tmp_path / "repo"
    root.mkdir()
    shutil.copytree(ROOT / "sample_checkpoints", root / "sample_checkpoints")
    to_run = [(where, language, code) for where, language, code in blocks() if skip_reason(code) is None]
    script = ["#!/bin/bash"]
    for index, (_, language, code) in enumerate(to_run):
        path = tmp_path / f"block_{index}.{'sh' if language == 'bash' else 'py'}"
        path.write_text(code)
        runner = f"bash -euo pipefail {path}" if language == "bash" else f"python {path}"
        script += [f"echo '=== {index}' >&2", f"(cd {root} && {runner}) >&2; echo \"=== {index} rc $?\" >&2"]
    env = {k: v for k, v in os.environ.items() if k not in ("GITHUB_ACTIONS", "GITHUB_STEP_SUMMARY", "EPCLI_DEBUG")}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])

    done = subprocess.run(["bash", "-c", "\n".join(script)], capture_output=True, text=True, env=env, timeout=900)

    failed = []
    for index, (where, _, _) in enumerate(to_run):
        outcome = re.search(rf"^=== {index}\n(.*?)^=== {index} rc (\d+)$", done.stderr, re.MULTILINE | re.DOTALL)
        assert outcome is not None, done.stderr[-3000:]
        if outcome.group(2) != "0":
            failed.append(f"{where} exited {outcome.group(2)}:\n{outcome.group(1)[-2000:]}")
    assert not failed, "\n\n".join(failed)

"""An instant CLI: wall time of help and usage errors against the cost of importing torch.

Run from the repository root, with the venv that has epcli installed (about half a minute)::

    python benchmarks/cli_startup.py

Each candidate is a fresh subprocess, timed end to end (interpreter start included):
``epcli --help``, ``epcli collapse --help``, ``epcli verify --help``, a usage error
(``epcli verify`` with no arguments, exit code 2), an output name with the wrong suffix (``epcli collapse
SAMPLE -o out.bin``, exit code 2: checked before torch is imported), ``python -c "import torch"`` and, as the
floor no command can beat, ``python -c pass``. They run interleaved, one of each per round,
after a warm-up round that also checks every exit code; the figures are medians.

It also checks, in a fresh interpreter, that ``import epcli.cli.app`` (everything ``--help``
and usage errors need) leaves torch, onnx and onnxruntime out of ``sys.modules``.

What to look for: each epcli line at < 0.3x of ``import torch`` (the target), close to the
interpreter floor; "heavy modules loaded: none". A ratio near 1 means something on the
help path imports torch.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from _timing import interleaved_medians, machine_summary

ROUNDS = 10
TARGET = 0.3
HEAVY_MODULES = ("torch", "onnx", "onnxruntime")
BASELINE = "python -c 'import torch'"
SAMPLE = str(Path(__file__).resolve().parents[1] / "sample_checkpoints" / "digits_mlp.pt")


@dataclass(frozen=True)
class Command:
    """One subprocess to time and the exit code it must end with."""

    label: str
    argv: list[str]
    exit_code: int = 0

    def run(self) -> int:
        return subprocess.run(self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False).returncode


def epcli_executable() -> str:
    """The ``epcli`` script next to this interpreter (the venv's), else the one on PATH."""
    beside = Path(sys.executable).with_name("epcli")
    found = str(beside) if beside.exists() else shutil.which("epcli")
    if found is None:
        sys.exit("epcli is not installed in this environment: run `pip install -e .` first")
    return found


def commands() -> list[Command]:
    epcli = epcli_executable()
    return [
        Command("epcli --help", [epcli, "--help"]),
        Command("epcli collapse --help", [epcli, "collapse", "--help"]),
        Command("epcli verify --help", [epcli, "verify", "--help"]),
        Command("epcli verify (usage error)", [epcli, "verify"], exit_code=2),
        Command("epcli collapse -o out.bin", [epcli, "collapse", SAMPLE, "-o", "out.bin"], exit_code=2),
        Command(BASELINE, [sys.executable, "-c", "import torch"]),
        Command("python -c pass (floor)", [sys.executable, "-c", "pass"]),
    ]


def check_exit_codes(candidates: list[Command]) -> None:
    """Run each command once (the warm-up) and stop if one ends with the wrong exit code."""
    for command in candidates:
        code = command.run()
        if code != command.exit_code:
            sys.exit(f"{command.label}: exit code {code}, expected {command.exit_code}")


def heavy_modules_after_cli_import() -> list[str]:
    """Which of torch / onnx / onnxruntime a fresh ``import epcli.cli.app`` pulls into sys.modules."""
    probe = (
        "import json, sys; import epcli.cli.app; "
        f"print(json.dumps([m for m in {list(HEAVY_MODULES)!r} if m in sys.modules]))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    loaded: list[str] = json.loads(result.stdout)
    return loaded


def main() -> None:
    print(machine_summary())
    print(f"each command a fresh subprocess; medians of {ROUNDS} interleaved rounds after a warm-up round")
    candidates = commands()
    check_exit_codes(candidates)
    medians = interleaved_medians({c.label: c.run for c in candidates}, ROUNDS, warmup=0)
    baseline = medians[BASELINE]
    print(f"\n{'command':<30} {'exit':>4} {'median s':>9} {'vs import torch':>16}")
    for command in candidates:
        ratio = medians[command.label] / baseline
        print(f"{command.label:<30} {command.exit_code:>4} {medians[command.label]:9.3f} {ratio:15.2f}x")
    worst = max(medians[c.label] for c in candidates if c.label.startswith("epcli")) / baseline
    print(f"\ntarget: every epcli command < {TARGET}x of import torch: worst {worst:.2f}x, "
          f"{'met' if worst < TARGET else 'NOT met'}")
    loaded = heavy_modules_after_cli_import()
    print(f"import epcli.cli.app, heavy modules loaded: {', '.join(loaded) if loaded else 'none'} "
          f"(checked {', '.join(HEAVY_MODULES)})")


if __name__ == "__main__":
    main()

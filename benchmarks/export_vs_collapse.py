"""`epcli export --onnx` against `epcli collapse` of the same file: wall time of whole commands.

Run from the repository root, with the venv that has epcli installed (about a minute)::

    python benchmarks/export_vs_collapse.py [--rounds N]

Each candidate is a fresh subprocess, timed end to end (interpreter start and imports included),
interleaved round by round, medians reported, on both bundled samples:

* ``epcli collapse SAMPLE -o OUT --force``: per-layer collapse and error check, whole-model check, write;
* ``epcli export SAMPLE --onnx OUT --force``: collapse, ONNX (emitted directly for these plain trees),
  onnx.checker, the same per-layer and whole-model comparisons (the model through onnxruntime), write;
* ``python -c "import torch"`` as the floor both pay.

Target: export at most 1.5x collapse. Through torch.onnx alone the export takes 3-4x
collapse, nearly all of it torch.onnx's own start-up (importing dynamo and onnxscript, building its
op registry from source, decompositions).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from _timing import interleaved_medians, machine_summary

SAMPLES = Path(__file__).resolve().parent.parent / "sample_checkpoints"
TARGET = 1.5


def _runner(argv: list[str]) -> object:
    def run() -> None:
        done = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False)
        if done.returncode != 0:
            sys.exit(f"{' '.join(argv)} exited {done.returncode}: {done.stderr[-2000:]}")

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    epcli = str(Path(sys.executable).with_name("epcli"))
    print(machine_summary())
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        for sample in ("digits_cnn.safetensors", "digits_mlp.pt"):
            source = str(SAMPLES / sample)
            candidates = {
                "import torch": _runner([sys.executable, "-c", "import torch"]),
                "collapse": _runner([epcli, "collapse", source, "-o", str(out / "c.safetensors"), "--force"]),
                "export --onnx": _runner([epcli, "export", source, "--onnx", str(out / "m.onnx"), "--force"]),
            }
            medians = interleaved_medians(candidates, args.rounds)  # type: ignore[arg-type]
            ratio = medians["export --onnx"] / medians["collapse"]
            print(f"\n{sample} (medians of {args.rounds} interleaved rounds)")
            for name, value in medians.items():
                print(f"  {name:<14} {value:6.2f} s")
            verdict = "meets" if ratio <= TARGET else "misses"
            print(f"  export / collapse = {ratio:.2f}x ({verdict} the {TARGET}x target)")


if __name__ == "__main__":
    main()

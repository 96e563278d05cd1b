"""``epcli inspect`` against ``epcli collapse`` of the same file, and ``epcli.save_checkpoint``'s peak memory.

Every candidate is a fresh subprocess forked from a small wrapper that reads its peak RSS with
``os.wait4`` (see ``large_collapse.py``, whose wrapper and checkpoint builder this reuses).

1. On a checkpoint of ``LAYERS x EPLinear(WIDTH, WIDTH, depth=4)`` (.safetensors), interleaved rounds of
   ``epcli collapse CKPT -o OUT --force`` and ``epcli inspect CKPT`` (and, with ``--exact``,
   ``epcli inspect CKPT --exact``): median wall time and peak RSS of each. Targets: inspect
   no slower than collapse, memory bounded like collapse.
2. ``save_checkpoint`` of the same model to .safetensors and .pt: peak RSS of the child minus its RSS
   right before the call (measured inside the child), as a multiple of the model's tensor bytes. With
   ``--before PATH`` (a checkout of epcli before the change, e.g. ``/work/main``) the same save runs with
   that epcli too, side by side. Target: at most 0.5x the model.

Run from the repository root: ``python benchmarks/inspect_and_save.py`` (4 x 2048, 256 MiB: a few minutes
on 2 cores); ``--width 4096`` for a 1 GiB checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import textwrap
from pathlib import Path

from _timing import machine_summary
from large_collapse import build, run

SAVE = textwrap.dedent(
    """
    import json, os, sys
    import torch
    from torch import nn
    import epcli

    layers, width, path, report = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    torch.manual_seed(0)
    model = nn.Sequential(*[epcli.EPLinear(width, width, depth=4) for _ in range(layers)])
    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    before = rss()
    epcli.save_checkpoint(model, path, input_shape=(width,))
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    with open(report, "w") as f:
        json.dump({"before": before, "model_bytes": size, "epcli": epcli.__file__}, f)
    """
)


def compare_inspect(directory: Path, source: Path, rounds: int, exact: bool) -> None:
    commands = {
        "collapse": [sys.executable, "-m", "epcli", "collapse", str(source), "-o", str(directory / "out.safetensors"),
                     "--force"],
        "inspect": [sys.executable, "-m", "epcli", "inspect", str(source)],
    }
    if exact:
        commands["inspect --exact"] = [*commands["inspect"], "--exact"]
    times: dict[str, list[float]] = {name: [] for name in commands}
    peaks: dict[str, list[int]] = {name: [] for name in commands}
    for index in range(rounds):
        for name in list(commands) if index % 2 == 0 else list(reversed(commands)):
            seconds, peak = run(commands[name])
            times[name].append(seconds)
            peaks[name].append(peak)
    size = source.stat().st_size
    for name in commands:
        print(f"  {name:16s} wall median {statistics.median(times[name]):7.2f} s "
              f"(runs {', '.join(f'{t:.1f}' for t in times[name])}); peak RSS {max(peaks[name]) / 2**20:6.0f} MiB "
              f"= {max(peaks[name]) / size:.2f}x input")
    ratio = statistics.median(times["inspect"]) / statistics.median(times["collapse"])
    print(f"  inspect / collapse wall time = {ratio:.2f}x (target <= 1.0x): {'met' if ratio <= 1.0 else 'NOT met'}")
    memory = max(peaks["inspect"]) / max(peaks["collapse"])
    print(f"  inspect / collapse peak RSS = {memory:.2f}x")


def measure_save(directory: Path, layers: int, width: int, before: Path | None) -> None:
    script = directory / "save.py"
    script.write_text(SAVE)
    checkouts = {"this epcli": None} | ({f"epcli at {before}": before} if before else {})
    for label, checkout in checkouts.items():
        for suffix in (".safetensors", ".pt"):
            report = directory / "save.json"
            env_path = os.environ.get("PYTHONPATH", "")
            if checkout is not None:
                os.environ["PYTHONPATH"] = str(checkout)
            try:
                seconds, peak = run([sys.executable, str(script), str(layers), str(width),
                                     str(directory / f"saved{suffix}"), str(report)])
            finally:
                os.environ["PYTHONPATH"] = env_path
            found = json.loads(report.read_text())
            grown = peak - found["before"]
            print(f"  {label:28s} {suffix:12s} {seconds:6.1f} s; peak RSS above the RSS before the call "
                  f"{grown / 2**20:6.0f} MiB = {grown / found['model_bytes']:.2f}x the model "
                  f"({found['model_bytes'] / 2**20:.0f} MiB; target <= 0.5x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--exact", action="store_true", help="also time inspect --exact (float64 SVD of every layer)")
    parser.add_argument("--before", type=Path, help="a checkout of epcli to run the same save with, for comparison")
    parser.add_argument("--skip-inspect", action="store_true")
    parser.add_argument("--skip-save", action="store_true")
    args = parser.parse_args()
    print(machine_summary())
    with tempfile.TemporaryDirectory() as temp:
        directory = Path(temp)
        _, floor = run([sys.executable, "-c", "import torch"])
        print(f"floor: python -c 'import torch' peak RSS {floor / 2**20:.0f} MiB")
        if not args.skip_inspect:
            source = build(directory, args.layers, args.width, (".safetensors",))[".safetensors"]
            print(f"\ninspect vs collapse: {source.stat().st_size / 2**20:.0f} MiB "
                  f"({args.layers} x EPLinear({args.width}, {args.width}, depth=4)), {args.rounds} rounds")
            compare_inspect(directory, source, args.rounds, args.exact)
        if not args.skip_save:
            print(f"\nsave_checkpoint of {args.layers} x EPLinear({args.width}, {args.width}, depth=4)")
            measure_save(directory, args.layers, args.width, args.before)


if __name__ == "__main__":
    main()

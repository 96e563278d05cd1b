"""Peak memory and wall time of every epcli command on one multi-GB checkpoint, side by side.

Builds ``LAYERS x EPLinear(WIDTH, WIDTH, depth=4)`` as ``.safetensors`` (default 64 x 2048: 4 GiB) in a temp
dir, then runs each command once in a fresh process forked from a small wrapper that reads its peak RSS with
``os.wait4`` (see ``large_collapse.py``, whose wrapper, bare script and builder this reuses):

* the floors: ``python -c "import torch"`` and the bare script (read, compose in float64, write);
* ``epcli collapse``, ``epcli inspect``, ``epcli verify CKPT`` (collapsed in memory), ``epcli verify CKPT
  COLLAPSED``, ``epcli export CKPT --onnx OUT.onnx`` (with its validation in onnxruntime), ``epcli compress CKPT
  --max-error 0.5`` (random weights: a loose budget, so that layers are factored), and ``epcli verify CKPT --model
  bigfactory:make`` (a factory, written beside the file, that builds the same model with initialised weights);
* ``epcli.save_checkpoint`` of the same model (peak above the child's RSS right before the call, measured inside
  the child, as a multiple of the model's tensor bytes).

Each command's peak RSS is printed above the ``import torch`` floor as a multiple of the input, and its wall time
as a multiple of ``epcli collapse``'s (the commands run in the listed order, once, so on a loaded machine read the
time ratios as rough). Targets: verify / verify COLLAPSED / export / compress at most 0.5x the input above the floor,
verify with a factory one copy of the model plus 0.1x,
inspect no slower than collapse, collapse within 1.3x of the bare script (that one is measured in rounds by
``large_collapse.py``), save at most 0.5x the model.

Run from the repository root: ``python benchmarks/every_command.py`` (4 GiB: about 15 minutes on 2 cores without
compress, whose SVD of each layer adds several seconds per layer; ``--layers 16`` for a 1 GiB rehearsal,
``--layers 4`` for 256 MiB, ``--layers 16 --width 1024`` for 256 MiB in smaller layers). ``--only NAME`` (repeatable,
e.g. ``--only "export --onnx"``) runs only those commands, beside the floor and ``collapse`` (the time ratios' base,
and the file ``verify COLLAPSED`` reads), and leaves out ``save_checkpoint``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from _timing import machine_summary
from inspect_and_save import SAVE
from large_collapse import BARE, DEPTH, MULTI_LAYERS, MULTI_WIDTH, build, cache_bytecode, run

MEMORY_TARGETS = {  # x input, above the floor
    "verify": 0.5, "verify COLLAPSED": 0.5, "export --onnx": 0.5, "compress": 0.5, "verify --model": 1.1,
}
FACTORY = """from torch import nn
import epcli

def make():
    return nn.Sequential(*[epcli.EPLinear({width}, {width}, depth={depth}) for _ in range({layers})])
"""
TIME_TARGETS = {"inspect": 1.0}  # x collapse's wall time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=MULTI_LAYERS)
    parser.add_argument("--width", type=int, default=MULTI_WIDTH)
    parser.add_argument("--only", action="append", metavar="NAME", help="run only this command (repeatable)")
    args = parser.parse_args()
    print(machine_summary())
    with tempfile.TemporaryDirectory() as temp:
        directory = Path(temp)
        cache_bytecode(directory)  # as an installed epcli runs (see large_collapse.py)
        run([sys.executable, "-c", "import torch"])  # fills that cache
        source = build(directory, args.layers, args.width, (".safetensors",))[".safetensors"]
        size = source.stat().st_size
        collapsed, onnx = directory / "collapsed.safetensors", directory / "model.onnx"
        (directory / "bare.py").write_text(BARE)
        (directory / "save.py").write_text(SAVE)
        epcli = [sys.executable, "-m", "epcli"]
        commands = {
            "import torch": [sys.executable, "-c", "import torch"],
            "bare script": [sys.executable, str(directory / "bare.py"), str(source), str(directory / "bare.safetensors"),
                            str(args.layers), str(DEPTH)],
            "collapse": [*epcli, "collapse", str(source), "-o", str(collapsed)],
            "inspect": [*epcli, "inspect", str(source)],
            "verify": [*epcli, "verify", str(source)],
            "verify COLLAPSED": [*epcli, "verify", str(source), str(collapsed)],
            "export --onnx": [*epcli, "export", str(source), "--onnx", str(onnx)],
            "compress": [*epcli, "compress", str(source), "-o", str(directory / "compressed.safetensors"),
                         "--max-error", "0.5"],
            "verify --model": [*epcli, "verify", str(source), "--model", "bigfactory:make"],
        }
        unknown = sorted(set(args.only or ()) - set(commands))
        if unknown:
            parser.error(f"unknown command {unknown[0]!r}; choose from {', '.join(map(repr, commands))}")
        if args.only:
            commands = {name: command for name, command in commands.items()
                        if name in ("import torch", "collapse", *args.only)}
        (directory / "bigfactory.py").write_text(FACTORY.format(width=args.width, depth=DEPTH, layers=args.layers))
        print(f"input {source.name}: {size / 2**30:.2f} GiB ({args.layers} x EPLinear({args.width}, {args.width}, "
              f"depth={DEPTH}), float32)\n")
        results: dict[str, tuple[float, int]] = {}
        for name, command in commands.items():
            # verify exits 1 when a float32 comparison misses its default tolerance, compress when nothing can be
            # factored within the budget: measured all the same
            results[name] = run(command, accepted="0,1", cwd=directory if "--model" in command else None)
            onnx.with_name(onnx.name + ".data").unlink(missing_ok=True)
        floor, collapse_seconds = results["import torch"][1], results["collapse"][0]
        print("| command | wall | vs collapse | peak RSS | above the torch floor | target |")
        print("| --- | --- | --- | --- | --- | --- |")
        for name, (seconds, peak) in results.items():
            above, ratio = (peak - floor) / size, seconds / collapse_seconds
            verdict = ""
            if name in MEMORY_TARGETS:
                verdict = f"memory <= {MEMORY_TARGETS[name]}x: {'met' if above <= MEMORY_TARGETS[name] else 'NOT met'}"
            if name in TIME_TARGETS:
                verdict = f"time <= {TIME_TARGETS[name]}x collapse: {'met' if ratio <= TIME_TARGETS[name] else 'NOT met'}"
            print(f"| `{name}` | {seconds:.1f} s | {ratio:.2f}x | {peak / 2**20:,.0f} MiB | "
                  f"{max(0, peak - floor) / 2**20:,.0f} MiB = {above:.2f}x | {verdict} |")
        if args.only:
            return
        report = directory / "save.json"
        seconds, peak = run([sys.executable, str(directory / "save.py"), str(args.layers), str(args.width),
                             str(directory / "saved.safetensors"), str(report)])
        saved = json.loads(report.read_text())
        model = saved["model_bytes"]
        print(f"| `save_checkpoint` (.safetensors) | {seconds:.1f} s (model built in the same process) | | "
              f"{peak / 2**20:,.0f} MiB | {(peak - saved['before']) / 2**20:,.0f} MiB above the RSS before the call = "
              f"{(peak - saved['before']) / model:.2f}x the model | memory <= 0.5x: "
              f"{'met' if peak - saved['before'] <= 0.5 * model else 'NOT met'} |")


if __name__ == "__main__":
    main()

"""ONNX export above protobuf's 2 GiB limit: wall time and peak memory of ``epcli export --onnx``.

One serialised protobuf message cannot exceed 2 GiB, so a model with more weights than
that is written the ONNX way: ``NAME.onnx`` (the graph) plus ``NAME.onnx.data`` (the
tensors). epcli switches automatically from the size of the collapsed weights, checks
the pair with ``onnx.checker`` on the path, runs it in onnxruntime against the expanded
torch model, and only then moves both files into place.

Builds a checkpoint of ``LAYERS`` x ``EPLinear(N, N, depth=2, width=1/16)`` (a narrow hidden
layer keeps the expanded file and the float64 collapse small, while each collapsed weight is
a full N x N float32 matrix), then runs ``python -m epcli export CKPT --onnx OUT.onnx --json``
once in a fresh subprocess, timed and with its peak RSS from ``os.wait4`` (the wrapper of
large_collapse.py), and prints the files written. Everything is deleted afterwards.

Run from the repository root: ``python benchmarks/large_onnx_export.py`` (small: N = 1024 with
``--external-data``, seconds); ``--large`` uses N = 16384 (2.0 GiB of collapsed weights plus the
biases, just over the limit: a few minutes and about 10 GB of memory; mind who else shares the machine).
``--dir`` picks where the files go (not a tmpfs: that would count against memory).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from _timing import machine_summary
from large_collapse import run

LAYERS, SMALL_N, LARGE_N, DEPTH, WIDTH = 2, 1024, 16384, 2, 1 / 16

BUILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import torch
    from torch import nn
    import epcli

    path, (layers, n, depth), width = Path(sys.argv[1]), map(int, sys.argv[2:5]), float(sys.argv[5])
    torch.manual_seed(0)
    with torch.no_grad():
        model = nn.Sequential(*[epcli.EPLinear(n, n, depth=depth, width=width) for _ in range(layers)]).eval()
    epcli.save_checkpoint(model, path, input_shape=(n,))
    """
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--large", action="store_true", help=f"N = {LARGE_N}: over 2 GiB of weights (minutes, ~10 GB)")
    parser.add_argument("--dir", type=Path, default=None, help="where to put the files (default: a temp directory)")
    args = parser.parse_args()
    n = LARGE_N if args.large else SMALL_N
    print(machine_summary())
    with tempfile.TemporaryDirectory(dir=args.dir) as temp:
        directory = Path(temp)
        source, output = directory / "big.safetensors", directory / "big.onnx"
        build = [sys.executable, "-c", BUILD, str(source), str(LAYERS), str(n), str(DEPTH), str(WIDTH)]
        subprocess.run(build, check=True)
        _, floor = run([sys.executable, "-c", "import torch"])
        extra = [] if args.large else ["--external-data"]  # the large model must switch by itself
        command = [sys.executable, "-m", "epcli", "export", str(source), "--onnx", str(output), *extra]
        seconds, peak = run(command)  # a failed export (exit code != 0) stops the script with its stderr
        weights = 4 * LAYERS * (n * n + n)
        print(f"\ninput {source.name}: {source.stat().st_size / 2**20:.0f} MiB "
              f"({LAYERS} x EPLinear({n}, {n}, depth={DEPTH}, width={WIDTH:g})); collapsed weights "
              f"{weights / 2**30:.3f} GiB ({weights} bytes; protobuf's limit is {2**31 - 1})")
        print(f"  epcli export --onnx {' '.join(extra)}: wall {seconds:.1f} s; peak RSS {peak / 2**30:.2f} GiB "
              f"({peak / weights:.2f}x the collapsed weights; import torch alone {floor / 2**20:.0f} MiB)")
        print("  validated in onnxruntime and written:")
        for path in sorted(directory.glob(f"{output.name}*")):
            print(f"    {path.name}: {path.stat().st_size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()

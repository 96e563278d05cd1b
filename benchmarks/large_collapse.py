"""Collapse of a large checkpoint: wall time and peak memory of ``epcli collapse`` against a bare script.

``epcli collapse`` streams: it opens the file without reading tensors, then reads, collapses
(float64), checks and spools one EP layer at a time, and commits the output atomically. On
top of the bare script's work it validates the file, checks every value is finite, hashes
the source, measures each layer's error on 32 float64 inputs, and fsyncs the output.

Builds a checkpoint of 16 x ``EPLinear(1024, 1024, depth=4)`` (~270 MB, as .safetensors
and .pt) in a temp dir, then runs, interleaved (A B, B A, ...) in fresh subprocesses:

* A, the bare script: read every tensor layer by layer, compose each chain in float64
  with plain torch matmuls, write the collapsed tensors with safetensors' ``save_file``;
* B, ``python -m epcli collapse CKPT -o OUT --force`` on the same file.

Peak RSS of each subprocess comes from ``os.wait4`` in a tiny wrapper process (Linux keeps
the pre-exec RSS of a forked parent in the child's ``ru_maxrss``, so the measured process must
be forked from a small one, and this script never imports torch itself); the floor is
``python -c "import torch"``. Targets: B/A wall time <= 1.3, peak RSS <= 0.5 x input size.
``import torch`` alone takes about 0.85 x of this input, so the memory target is read as
"peak RSS above the import-torch floor <= 0.5 x input" (both are printed).
Run from the repository root: ``python benchmarks/large_collapse.py`` (about 2-3 minutes; ``--rounds N``
for more rounds on a busy machine); ``--multi-gb`` runs once on a 4 GiB checkpoint instead, with sharded
output (about 10 minutes).

Every subprocess runs with bytecode caching on, cached in the temp dir (``PYTHONPYCACHEPREFIX``), and each
command runs once untimed before the rounds (default mode): an installed epcli, like torch, has its bytecode compiled at
install time, but a checkout run where ``PYTHONDONTWRITEBYTECODE`` is set (some sandboxes) would compile
every epcli module again on every run (about 0.1 s) and charge that to epcli.

``--verify [--width W] [--before CHECKOUT]`` measures ``epcli verify`` instead: on a checkpoint of
``LAYERS x EPLinear(W, W, depth=4)`` (.safetensors; ``--layers``, default 16 x 1024 = 256 MiB, 4 x 4096 = 1 GiB),
one fresh process each of ``epcli collapse``, ``epcli verify CKPT`` (collapsed in memory), ``epcli verify CKPT
COLLAPSED`` and ``epcli export CKPT --onnx OUT.onnx`` (validated in onnxruntime), with this epcli and, with
``--before``, with the epcli package found in CHECKOUT (run with ``PYTHONPATH=CHECKOUT``). Target: the peak RSS of
verify and export --onnx above the ``import torch`` floor <= 1.0x the input; wall times are printed as multiples of
collapse's in the same checkout.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from _timing import machine_summary

LAYERS, WIDTH, DEPTH = 16, 1024, 4
MULTI_LAYERS, MULTI_WIDTH = 64, 2048
ROUNDS = 3
TIME_TARGET, RSS_TARGET = 1.3, 0.5

BARE = textwrap.dedent(
    """
    import sys
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    src, out = sys.argv[1], sys.argv[2]
    layers, depth = int(sys.argv[3]), int(sys.argv[4])
    if src.endswith(".safetensors"):
        def read(keys):
            with safe_open(src, framework="pt") as f:
                return {k: f.get_tensor(k).clone() for k in keys}
    else:
        def read(keys):
            state = torch.load(src, map_location="cpu", mmap=True, weights_only=True)["state_dict"]
            return {k: state[k].clone() for k in keys}
    result = {}
    with torch.no_grad():
        for i in range(layers):
            keys = [f"{i}.layer_dict.{j}.0.{p}" for j in range(depth) for p in ("weight", "bias")]
            t = read(keys)
            w = t[f"{i}.layer_dict.0.0.weight"].double()
            b = t[f"{i}.layer_dict.0.0.bias"].double()
            for j in range(1, depth):
                wj = t[f"{i}.layer_dict.{j}.0.weight"].double()
                w = wj @ w
                b = wj @ b + t[f"{i}.layer_dict.{j}.0.bias"].double()
            result[f"{i}.weight"] = w.float().contiguous()
            result[f"{i}.bias"] = b.float().contiguous()
            del t, w, b
    save_file(result, out)
    """
)


BUILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import torch
    from torch import nn
    import epcli

    directory, layers, width, depth = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    torch.manual_seed(0)
    model = nn.Sequential(*[epcli.EPLinear(width, width, depth=depth) for _ in range(layers)])
    for suffix in sys.argv[5:]:
        epcli.save_checkpoint(model, directory / f"big{suffix}", input_shape=(width,))
    """
)

WRAPPER = textwrap.dedent(
    """
    import os, subprocess, sys, time
    start = time.perf_counter()
    accepted = {int(code) for code in sys.argv[1].split(",")}
    process = subprocess.Popen(sys.argv[2:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code not in accepted:
        sys.stderr.write(process.stderr.read().decode())
        sys.exit(code)
    print(elapsed, usage.ru_maxrss * 1024)  # Linux: KiB
    """
)


def build(directory: Path, layers: int, width: int, suffixes: tuple[str, ...]) -> dict[str, Path]:
    subprocess.run(
        [sys.executable, "-c", BUILD, str(directory), str(layers), str(width), str(DEPTH), *suffixes], check=True
    )
    return {suffix: directory / f"big{suffix}" for suffix in suffixes}


_ENVIRONMENT: dict[str, str] = dict(os.environ)


def cache_bytecode(directory: Path) -> None:
    """From now on, subprocesses write and read bytecode under ``directory`` (see the module docstring)."""
    _ENVIRONMENT.pop("PYTHONDONTWRITEBYTECODE", None)
    _ENVIRONMENT["PYTHONPYCACHEPREFIX"] = str(directory / "pycache")


def run(command: list[str], accepted: str = "0", cwd: Path | None = None) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one fresh subprocess, forked from a small wrapper; ``accepted``: the
    exit codes that count as a run (comma-separated); ``cwd``: where it runs."""
    done = subprocess.run(
        [sys.executable, "-c", WRAPPER, accepted, *command], capture_output=True, text=True, cwd=cwd, env=_ENVIRONMENT
    )
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr}")
    elapsed, peak = done.stdout.split()
    return float(elapsed), int(peak)


def measure(
    directory: Path, source: Path, layers: int, width: int, rounds: int, floor: int, extra: list[str], warm_up: bool
) -> bool:
    """Interleaved rounds of A (bare) and B (epcli), after one untimed run of each with ``warm_up``; prints the
    figures; True when both targets are met."""
    size = source.stat().st_size
    bare = directory / "bare.py"
    bare.write_text(BARE)
    commands = {
        "A bare": [sys.executable, str(bare), str(source), str(directory / "a.safetensors"), str(layers), str(DEPTH)],
        "B epcli": [sys.executable, "-m", "epcli", "collapse", str(source), "-o", str(directory / "b.safetensors"),
                    "--force", *extra],
    }
    times: dict[str, list[float]] = {name: [] for name in commands}
    rss: dict[str, list[int]] = {name: [] for name in commands}
    for command in commands.values() if warm_up else ():  # bytecode and page cache
        run(command)
    for index in range(rounds):
        order = list(commands) if index % 2 == 0 else list(reversed(commands))
        for name in order:
            seconds, peak = run(commands[name])
            times[name].append(seconds)
            rss[name].append(peak)
    print(f"\ninput {source.name}: {size / 2**20:.0f} MiB ({layers} x EPLinear({width}, {width}, depth={DEPTH}))"
          + (f"; epcli {' '.join(extra)}" if extra else ""))
    for name in commands:
        peak = max(rss[name])
        print(
            f"  {name:8s} wall median {statistics.median(times[name]):6.2f} s "
            f"(runs {', '.join(f'{t:.2f}' for t in times[name])}); peak RSS {peak / 2**20:6.0f} MiB = "
            f"{peak / size:.2f}x input; above the torch floor {(peak - floor) / 2**20:6.0f} MiB = "
            f"{(peak - floor) / size:.2f}x input"
        )
    ratio = statistics.median(times["B epcli"]) / statistics.median(times["A bare"])
    pairs = ", ".join(f"{b / a:.2f}" for a, b in zip(times["A bare"], times["B epcli"]))
    print(f"  B/A per round: {pairs}")
    peak_b = max(rss["B epcli"])
    time_ok, rss_ok = ratio <= TIME_TARGET, peak_b <= RSS_TARGET * size
    rss_floor_ok = peak_b - floor <= RSS_TARGET * size
    print(f"  wall time B/A = {ratio:.2f}x (target <= {TIME_TARGET}x): {'met' if time_ok else 'NOT met'}")
    print(
        f"  epcli peak RSS = {peak_b / size:.2f}x input (target <= {RSS_TARGET}x): {'met' if rss_ok else 'NOT met'}"
        f"; above the torch floor {(peak_b - floor) / size:.2f}x: {'met' if rss_floor_ok else 'NOT met'}"
    )
    return time_ok and rss_floor_ok


VERIFY_RSS_TARGET = 1.0


def measure_verify(directory: Path, layers: int, width: int, floor: int, before: Path | None) -> None:
    """One fresh run each of collapse, verify (in memory) and verify against the collapsed file, per checkout."""
    source = build(directory, layers, width, (".safetensors",))[".safetensors"]
    size = source.stat().st_size
    collapsed = directory / "collapsed.safetensors"
    commands = {
        "collapse": ["-m", "epcli", "collapse", str(source), "-o", str(collapsed), "--force"],
        "verify": ["-m", "epcli", "verify", str(source)],
        "verify COLLAPSED": ["-m", "epcli", "verify", str(source), str(collapsed)],
        "export --onnx": ["-m", "epcli", "export", str(source), "--onnx", str(directory / "out.onnx"), "--force"],
    }
    print(f"\nverify: input {size / 2**20:.0f} MiB ({layers} x EPLinear({width}, {width}, depth={DEPTH})); "
          f"floor {floor / 2**20:.0f} MiB")
    # run in the temp dir: ``python -m`` puts the working directory first on sys.path, ahead of PYTHONPATH, so run
    # from a checkout it would import that checkout's epcli whatever PYTHONPATH says
    here = Path(__file__).resolve().parent.parent
    checkouts = {"this epcli": str(here)} | ({f"epcli at {before}": str(before.resolve())} if before else {})
    for label, pythonpath in checkouts.items():
        collapse_seconds = 0.0
        for name, args in commands.items():
            # exit code 1: a comparison failed (float32 at its default tolerances); the run is measured all the same
            seconds, peak = run(
                ["env", f"PYTHONPATH={pythonpath}", sys.executable, *args], accepted="0,1", cwd=directory
            )
            collapse_seconds = collapse_seconds or seconds
            above = (peak - floor) / size
            met = "met" if above <= VERIFY_RSS_TARGET else "NOT met"
            target = "" if name == "collapse" else f" (target <= {VERIFY_RSS_TARGET}x: {met})"
            print(f"  {label:24s} {name:17s} {seconds:7.2f} s = {seconds / collapse_seconds:.2f}x collapse; peak RSS "
                  f"{peak / 2**20:6.0f} MiB = {peak / size:.2f}x input; above the torch floor {above:.2f}x{target}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--multi-gb", action="store_true",
        help=f"instead: one round on {MULTI_LAYERS} x EPLinear({MULTI_WIDTH}, {MULTI_WIDTH}, depth={DEPTH}) (4 GiB, "
        "about 10 minutes), epcli writing shards of at most 256MB",
    )
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="interleaved rounds per checkpoint (default mode)")
    parser.add_argument("--verify", action="store_true", help="instead: measure epcli verify (see the docstring)")
    parser.add_argument("--layers", type=int, default=LAYERS, help="with --verify: number of EP layers")
    parser.add_argument("--width", type=int, default=WIDTH, help="with --verify: their width")
    parser.add_argument("--before", type=Path, help="with --verify: a checkout whose epcli runs the same commands")
    args = parser.parse_args()
    print(machine_summary())
    with tempfile.TemporaryDirectory() as temp:
        directory = Path(temp)
        cache_bytecode(directory)
        run([sys.executable, "-c", "import torch"])  # compiles torch's bytecode into the cache
        _, floor = run([sys.executable, "-c", "import torch"])
        print(f"floor: python -c 'import torch' peak RSS {floor / 2**20:.0f} MiB")
        print(f"targets: epcli/bare wall time <= {TIME_TARGET}x; peak RSS <= {RSS_TARGET}x input file size")
        if args.verify:
            measure_verify(directory, args.layers, args.width, floor, args.before)
            return
        if args.multi_gb:
            paths = build(directory, MULTI_LAYERS, MULTI_WIDTH, (".safetensors",))
            met = measure(directory, paths[".safetensors"], MULTI_LAYERS, MULTI_WIDTH, 1, floor,
                          ["--max-shard-size", "256MB"], warm_up=False)
            shards = sorted(p.name for p in directory.iterdir() if p.name.startswith(("b-", "b.safetensors")))
            print(f"  epcli wrote {len(shards)} files: {', '.join(shards[:3])}{' ...' if len(shards) > 3 else ''}")
        else:
            paths = build(directory, LAYERS, WIDTH, (".safetensors", ".pt"))
            met = all(
                [measure(directory, path, LAYERS, WIDTH, args.rounds, floor, [], warm_up=True) for path in paths.values()]
            )
        print(f"\nall targets met (memory read above the torch floor): {'yes' if met else 'no'}")


if __name__ == "__main__":
    main()

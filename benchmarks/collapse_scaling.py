"""How the collapse time of one EP layer grows with its depth.

Run from the repository root::

    python benchmarks/collapse_scaling.py [--only depthwise] [--repeats 15] [--min]

It times ``layer.collapse()`` (the float64 collapse, no cache) for depths 4 .. 128 for
EPLinear (64 -> 64) and EPConv2d (8 -> 8 channels, kernel sizes [3] + [1] * (depth - 1), so
the collapsed kernel stays 3x3 and only the depth varies), each without skips, with
identity skips every 2 and 3 layers, and with learnable skips every 2 and 3 layers; then,
for contrast, EPConv2d with kernel sizes [3] * depth up to depth 64, whose collapsed kernel
grows with the depth, so each composition costs more and the total is super-linear.
Then the grouped families: depthwise (64 channels, groups 64) and grouped (64 channels,
groups 8) EPConv2d chains, and a dilated depthwise EPConv1d, each with kernel sizes
[3] + [1] * (depth - 1), without skips and with identity or learnable skips; grouped
kernels compose block by block, so these should be linear in depth too.

What to look for: the collapse does one composition per edge, so its time should be
linear in depth: time/depth roughly flat, each doubling ratio t(2d)/t(d) near 2, and the
log-log slope near 1 for every fixed-kernel series. A slope near 2 or more there would mean an expansion over paths or
nodes kept alive needlessly. Timings are medians (``--min``: minima) of several repeats after a
warm-up, with one torch thread, so a noisy machine moves them little; the smallest depths are dominated
by fixed overhead, which pulls the first ratios below 2.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from epcli import EPConv1d, EPConv2d, EPLinear
from epcli.layers import EPLayer

DEPTHS = (4, 8, 16, 32, 64, 128)
REPEATS = 7
FEATURES = 64
CHANNELS = 8
SKIPS = [2, 3]
WIDE = 64
"""Channels of the depthwise and grouped series."""



@dataclass(frozen=True)
class Series:
    """One layer family timed over ``depths``; ``linear`` says whether linear scaling is the expectation."""

    name: str
    build: Callable[[int], EPLayer]
    depths: tuple[int, ...] = DEPTHS
    linear: bool = True


SERIES = [
    Series("linear, no skips", lambda d: EPLinear(FEATURES, FEATURES, depth=d)),
    Series(
        "linear, identity skips [2, 3]",
        lambda d: EPLinear(FEATURES, FEATURES, depth=d, residual=True, residual_intervals=SKIPS),
    ),
    Series(
        "linear, learnable skips [2, 3]",
        lambda d: EPLinear(
            FEATURES, FEATURES, depth=d, batch_norm=True, residual=True, residual_intervals=SKIPS, residual_mode="learn"
        ),
    ),
    Series("conv, no skips", lambda d: EPConv2d(CHANNELS, CHANNELS, 3, 1, depth=d)),
    Series(
        "conv, identity skips [2, 3]",
        lambda d: EPConv2d(CHANNELS, CHANNELS, 3, 1, depth=d, residual=True, residual_intervals=SKIPS),
    ),
    Series(
        "conv, learnable skips [2, 3]",
        lambda d: EPConv2d(
            CHANNELS, CHANNELS, 3, 1, depth=d, batch_norm=True, residual=True, residual_intervals=SKIPS,
            residual_mode="learn",
        ),
    ),
    # every layer 3x3: the collapsed kernel grows to 2 * depth + 1, so each composition costs more
    Series(
        "conv [3] * depth, identity skips [2, 3]",
        lambda d: EPConv2d(CHANNELS, CHANNELS, [3] * d, residual=True, residual_intervals=SKIPS),
        depths=(4, 8, 16, 32, 64),
        linear=False,
    ),
    Series("depthwise conv2d (64, groups 64), no skips", lambda d: EPConv2d(WIDE, WIDE, 3, 1, depth=d, groups=WIDE)),
    Series(
        "depthwise conv2d (64, groups 64), identity skips [2, 3]",
        lambda d: EPConv2d(WIDE, WIDE, 3, 1, depth=d, groups=WIDE, residual=True, residual_intervals=SKIPS),
    ),
    Series(
        "depthwise conv2d (64, groups 64), learnable skips [2, 3]",
        lambda d: EPConv2d(
            WIDE, WIDE, 3, 1, depth=d, groups=WIDE, batch_norm=True, residual=True, residual_intervals=SKIPS,
            residual_mode="learn",
        ),
    ),
    Series("grouped conv2d (64, groups 8), no skips", lambda d: EPConv2d(WIDE, WIDE, 3, 1, depth=d, groups=8)),
    Series(
        "grouped conv2d (64, groups 8), learnable skips [2, 3]",
        lambda d: EPConv2d(
            WIDE, WIDE, 3, 1, depth=d, groups=8, batch_norm=True, residual=True, residual_intervals=SKIPS,
            residual_mode="learn",
        ),
    ),
    Series(
        "depthwise conv1d (64, groups 64, dilation 2), identity skips [2, 3]",
        lambda d: EPConv1d(
            WIDE, WIDE, 3, 2, depth=d, groups=WIDE, dilation=2, residual=True, residual_intervals=SKIPS
        ),
    ),
]


def collapse_seconds(layer: EPLayer, repeats: int, statistic: Callable[[list[float]], float]) -> float:
    """``statistic`` (median or min) of the wall time of ``layer.collapse()`` over ``repeats`` runs, after a warm-up."""
    layer.collapse()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        layer.collapse()
        times.append(time.perf_counter() - start)
    return statistic(times)


def report(series: Series, repeats: int, statistic: Callable[[list[float]], float]) -> float:
    """Print one series' table and return its log-log slope."""
    depths = series.depths
    seconds = [collapse_seconds(series.build(depth), repeats, statistic) for depth in depths]
    print(f"\n{series.name}" + ("" if series.linear else "  (growing kernel: super-linear expected)"))
    print(f"{'depth':>6} {'time ms':>10} {'us/depth':>10} {'t(d)/t(d/2)':>12}")
    for i, (depth, t) in enumerate(zip(depths, seconds)):
        ratio = f"{t / seconds[i - 1]:12.2f}" if i else f"{'':>12}"
        print(f"{depth:>6} {t * 1e3:10.3f} {t / depth * 1e6:10.1f} {ratio}")
    slope = float(np.polyfit(np.log(depths), np.log(seconds), 1)[0])
    print(f"log-log slope of time vs depth: {slope:.2f}  (1 = linear)")
    return slope


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="run only the series whose name contains this text")
    parser.add_argument("--repeats", type=int, default=REPEATS, help=f"timed runs per point (default {REPEATS})")
    parser.add_argument(
        "--min", action="store_true", help="report the fastest run instead of the median (steadier on a busy machine)"
    )
    args = parser.parse_args()
    statistic: Callable[[list[float]], float] = min if args.min else statistics.median
    torch.set_num_threads(1)
    torch.manual_seed(0)
    start = time.perf_counter()
    slopes = {
        series.name: (report(series, args.repeats, statistic), series.linear)
        for series in SERIES
        if args.only in series.name
    }
    print("\nsummary: log-log slopes")
    for name, (slope, linear) in slopes.items():
        print(f"  {name:<66} {slope:.2f}" + ("" if linear else "  (not expected linear)"))
    worst = max(slope for slope, linear in slopes.values() if linear)
    verdict = "linear in depth" if worst < 1.25 else "SUPER-LINEAR"
    print(f"worst slope of the fixed-kernel series {worst:.2f}: {verdict}; total {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()

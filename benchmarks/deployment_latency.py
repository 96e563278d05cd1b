"""The deployment win: inference latency of an expanded EP model against its exact collapse.

Run from the repository root (under a minute)::

    python benchmarks/deployment_latency.py            # every model
    python benchmarks/deployment_latency.py mobilenet  # the models whose name contains "mobilenet"

For each model it exports two ONNX graphs with ``export_onnx_bytes``: the *expanded* model
(eval mode, every EP layer running its chain, via ``expanded_eval``) and the *collapsed* one
(``collapse_model``), and times them in onnxruntime (CPU, ORT_ENABLE_ALL, 2 intra-op
threads) and in torch eager (``inference_mode``), interleaved round by round, medians. It
prints per model the milliseconds of each, the measured speedup and the theoretical ratio of
multiply-accumulates (MACs of every Linear / Conv2d, counted from the layer and output shapes
of one forward pass; for a convolution, output pixels x kernel area x in-channels).

It also saves onnxruntime's *optimised* expanded graph and counts its MatMul / Gemm / Conv
nodes before and after optimisation, and checks that the two ONNX graphs agree numerically.

What to look for:
- the optimised expanded graph still holds one matrix product (or convolution) per chain
  layer: onnxruntime does not fold a chain of linear layers, so only the collapse removes them;
- the MLP (3 x EPLinear 1024 -> 1024, depth 4) should run >= 3x faster collapsed
  (4x is the MAC limit, minus the fixed cost per call);
- the convolutions gain about what their MACs promise, or a bit more: 1x1 layers after a 3x3
  add a third of its MACs ([3, 1, 1, 1] -> 1.33x) and are memory-bound, so dropping them pays
  more than their MACs; but two 3x3 layers collapse into one 5x5 that needs *more* MACs
  (25 / 18 per output pixel, 0.82x with the border): there the measured ratio hovers around
  1 (it swings 0.7x .. 1.25x from run to run on a shared machine) and collapsing buys nothing;
- the MobileNetV2 block (every 1x1 and the 3x3 depthwise conv an EP chain of depth 4, batch-norm
  after each chain layer) collapses to the plain block's three convs: the expand chain runs three
  extra 192 x 192 1x1 convs, so the MACs drop about 9x; the measured speed-up is about 5x (the
  depthwise convs and the element-wise ops between chains cost time but few MACs);
- max |diff| of the two ONNX graphs at float32 rounding level (about 1e-6 of the output scale).
"""

from __future__ import annotations

import collections
import functools
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from _timing import interleaved_medians, machine_summary, speedup
from torch import nn

from epcli import EPConv2d, EPLinear, collapse_model, overparameterize
from epcli.convert import expanded_eval
from epcli.layers import EPLayer
from epcli.onnx.export import INPUT_NAME, export_onnx_bytes

THREADS = 2
ROUNDS = 40
WARMUP = 3
COMPUTE_OPS = ("MatMul", "Gemm", "Conv")
"""Substrings of the op types that do the arithmetic (also matches FusedMatMul, FusedGemm, FusedConv)."""
MLP_TARGET = 3.0


@dataclass(frozen=True)
class Case:
    """One model to deploy: how to build it and the batch it serves."""

    name: str
    build: Callable[[], nn.Module]
    sample_shape: tuple[int, ...]
    batch: int


def _mlp() -> nn.Module:
    return nn.Sequential(
        EPLinear(1024, 1024, depth=4), nn.ReLU(),
        EPLinear(1024, 1024, depth=4), nn.ReLU(),
        EPLinear(1024, 1024, depth=4),
    )


def _cnn(kernel_sizes: list[int], padding: int) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        return nn.Sequential(
            EPConv2d(64, 64, kernel_sizes, padding), nn.ReLU(),
            EPConv2d(64, 64, kernel_sizes, padding), nn.ReLU(),
            EPConv2d(64, 64, kernel_sizes, padding),
        )

    return build


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise (groups = channels), 1x1 linear projection, identity skip."""

    def __init__(self, channels: int, expand: int) -> None:
        super().__init__()
        hidden = channels * expand
        self.expand = nn.Sequential(nn.Conv2d(channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6())
        self.depthwise = nn.Sequential(
            nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()
        )
        self.project = nn.Sequential(nn.Conv2d(hidden, channels, 1, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.project(self.depthwise(self.expand(x)))


def _mobilenet_block() -> nn.Module:
    """Every conv of the block as an EP chain of depth 4 with batch-norms: [1,1,1,1] pointwise, [3,1,1,1] depthwise."""
    return overparameterize(InvertedResidual(32, 6), depth=4, batch_norm=True)


CASES = [
    Case("MLP: 3 x EPLinear(1024, 1024, depth=4) + ReLU", _mlp, (1024,), 64),
    Case("CNN: 3 x EPConv2d(64, 64, [3, 1, 1, 1], padding=1) + ReLU", _cnn([3, 1, 1, 1], 1), (64, 16, 16), 8),
    Case("CNN: 3 x EPConv2d(64, 64, [3, 3], padding=2) + ReLU", _cnn([3, 3], 2), (64, 16, 16), 8),
    Case("MobileNetV2 block 32->192->32, EP depthwise + pointwise, depth 4", _mobilenet_block, (32, 28, 28), 8),
]


# ---- graphs ------------------------------------------------------------------------
def ort_session(model: bytes, optimized_path: Path | None = None) -> ort.InferenceSession:
    """A CPU session with every graph optimisation on; optionally saving the optimised graph."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = THREADS
    options.log_severity_level = 3
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def compute_ops(model: onnx.ModelProto) -> collections.Counter[str]:
    """Count of each arithmetic op type (MatMul, Gemm, Conv and their fused forms) in the main graph."""
    return collections.Counter(
        node.op_type for node in model.graph.node if any(op in node.op_type for op in COMPUTE_OPS)
    )


def optimized_compute_ops(model: bytes) -> collections.Counter[str]:
    """The arithmetic ops of the graph onnxruntime actually runs after ORT_ENABLE_ALL."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "optimized.onnx"
        ort_session(model, optimized_path=path)
        return compute_ops(onnx.load(str(path)))


def describe(ops: collections.Counter[str]) -> str:
    """``Gemm x10, FusedGemm x2``: op counts for printing."""
    return ", ".join(f"{op} x{count}" for op, count in sorted(ops.items())) or "none"


# ---- arithmetic --------------------------------------------------------------------
def count_macs(model: nn.Module, example: torch.Tensor) -> int:
    """Multiply-accumulates of every nn.Linear / nn.Conv2d that runs in one forward pass of ``example``."""
    total = 0

    def hook(module: nn.Module, inputs: object, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Linear):
            total += output.numel() * module.in_features
        elif isinstance(module, nn.Conv2d):
            kernel_h, kernel_w = module.kernel_size
            total += output.numel() * kernel_h * kernel_w * module.in_channels // module.groups

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    try:
        with torch.inference_mode():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    return total


def chain_layers(model: nn.Module) -> int:
    """Linear / Conv2d layers the expanded model runs: the depths of its EP layers."""
    return sum(module.depth for module in model.modules() if isinstance(module, EPLayer))


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Max |a - b| and that divided by max |a| (normwise relative)."""
    diff = float(np.max(np.abs(a - b)))
    return diff, diff / float(np.max(np.abs(a)))


# ---- one model ---------------------------------------------------------------------
@dataclass(frozen=True)
class Result:
    """What the summary reports of one model."""

    name: str
    mac_ratio: float
    ort_speedup: float
    torch_speedup: float


def print_timings(label: str, medians: dict[str, float]) -> float:
    """Print the expanded and collapsed medians of one backend; return the speedup."""
    ratio = speedup(medians["expanded"], medians["collapsed"])
    print(
        f"  {label:<12} expanded {medians['expanded'] * 1e3:8.2f} ms   collapsed {medians['collapsed'] * 1e3:8.2f} ms"
        f"   speedup {ratio:5.2f}x"
    )
    return ratio


def print_macs(model: nn.Module, collapsed: nn.Module, example: torch.Tensor) -> float:
    """Print MACs per sample of both forms; return the theoretical speedup (expanded / collapsed MACs)."""
    with expanded_eval(model):
        expanded_macs = count_macs(model, example)
    collapsed_macs = count_macs(collapsed, example)
    ratio = expanded_macs / collapsed_macs
    batch = example.shape[0]
    print(
        f"  MACs/sample  expanded {expanded_macs / batch / 1e6:8.2f} M   collapsed "
        f"{collapsed_macs / batch / 1e6:8.2f} M   theoretical ratio {ratio:5.2f}x"
    )
    return ratio


def print_graphs(model: nn.Module, expanded_onnx: bytes, collapsed_onnx: bytes) -> None:
    """Print the arithmetic ops of both graphs, the expanded one also after onnxruntime's optimiser."""
    layers = chain_layers(model)
    before = compute_ops(onnx.load_from_string(expanded_onnx))
    after = optimized_compute_ops(expanded_onnx)
    fused = "FUSED (fewer than the chain)" if sum(after.values()) < layers else "not fused"
    print(f"  expanded ONNX, {layers} chain layers: exported {describe(before)}; after ORT_ENABLE_ALL "
          f"{describe(after)} -> {fused}")
    print(f"  collapsed ONNX: exported {describe(compute_ops(onnx.load_from_string(collapsed_onnx)))}")


def time_onnx(expanded_onnx: bytes, collapsed_onnx: bytes, example: torch.Tensor) -> float:
    """Check that the two graphs agree, time them interleaved in onnxruntime; return the speedup."""
    feed = {INPUT_NAME: example.numpy()}
    sessions = {"expanded": ort_session(expanded_onnx), "collapsed": ort_session(collapsed_onnx)}
    outputs = {name: session.run(None, feed)[0] for name, session in sessions.items()}
    diff, relative = max_abs_diff(outputs["expanded"], outputs["collapsed"])
    print(f"  ONNX expanded vs collapsed: max |diff| {diff:.2e} (relative to max |output| {relative:.2e})")
    medians = interleaved_medians(
        {name: functools.partial(session.run, None, feed) for name, session in sessions.items()}, ROUNDS, warmup=WARMUP
    )
    return print_timings("onnxruntime", medians)


def time_torch(model: nn.Module, collapsed: nn.Module, example: torch.Tensor) -> float:
    """Time torch eager, the expanded chain against the collapse, interleaved; return the speedup."""
    with expanded_eval(model), torch.inference_mode():
        medians = interleaved_medians(
            {"expanded": lambda: model(example), "collapsed": lambda: collapsed(example)}, ROUNDS, warmup=WARMUP
        )
    return print_timings("torch eager", medians)


def run_case(case: Case) -> Result:
    print(f"\n{case.name}, batch {case.batch}, sample {list(case.sample_shape)}")
    torch.manual_seed(0)
    model = case.build().eval()
    collapsed = collapse_model(model)
    example = torch.randn(case.batch, *case.sample_shape)
    with expanded_eval(model):
        expanded_onnx = export_onnx_bytes(model, case.sample_shape)
    collapsed_onnx = export_onnx_bytes(collapsed, case.sample_shape)
    mac_ratio = print_macs(model, collapsed, example)
    print_graphs(model, expanded_onnx, collapsed_onnx)
    return Result(
        case.name, mac_ratio, time_onnx(expanded_onnx, collapsed_onnx, example), time_torch(model, collapsed, example)
    )


def main(names: list[str]) -> None:
    """Run every case, or those whose name contains one of ``names`` (case-insensitive)."""
    torch.set_num_threads(THREADS)
    print(machine_summary())
    print(f"onnxruntime: CPUExecutionProvider, ORT_ENABLE_ALL, intra_op_num_threads={THREADS}; torch threads "
          f"{torch.get_num_threads()}; medians of {ROUNDS} interleaved rounds after {WARMUP} warm-up calls")
    chosen = [c for c in CASES if not names or any(n.lower() in c.name.lower() for n in names)]
    results = [run_case(case) for case in chosen]
    print("\nsummary: speedup of the collapsed model (expanded time / collapsed time)")
    print(f"  {'model':<60} {'MAC ratio':>9} {'onnxruntime':>11} {'torch':>7}")
    for r in results:
        print(f"  {r.name:<60} {r.mac_ratio:8.2f}x {r.ort_speedup:10.2f}x {r.torch_speedup:6.2f}x")
    for r in results:
        if r.name.startswith("MLP"):
            verdict = "met" if r.ort_speedup >= MLP_TARGET else "NOT met"
            print(f"target: MLP in onnxruntime >= {MLP_TARGET:.0f}x (MAC limit {r.mac_ratio:.0f}x): "
                  f"{r.ort_speedup:.2f}x, {verdict}")


if __name__ == "__main__":
    main(sys.argv[1:])

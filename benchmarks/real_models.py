"""Real model code: the collapse error and the deployment speedup of transformers / diffusers models.

Run from the repository root (a few minutes)::

    python benchmarks/real_models.py            # every model of the test zoo
    python benchmarks/real_models.py llama vit  # the models whose name contains one of these

Each model of ``tests/zoo/zoo_models.py`` (tiny configs, random weights, nothing downloaded) is
overparameterized at depth 4 with batch-norm (bias-free layers stay plain, as by default), trained
for two AdamW steps so batch-norm statistics and weights are not at their initial values, and
collapsed with ``collapse_model``. It prints, per model:

- the collapse error: max |collapsed - expanded| / max |expanded| over every output tensor, on 8
  seeded samples, with both models in float32 and again in float64;
- the deployment speedup in torch eager (``inference_mode``, 2 threads): the expanded model (every
  EP layer running its chain) against the collapsed plain model, timed interleaved, medians;
- the EP layers and the parameters of both forms.

What to look for: float64 errors at rounding level (about 1e-15), float32 errors about 1e-6
(float32 rounding through the model); speedups above 1 wherever the linear layers dominate the
time, approaching the parameter ratio for MLP-heavy models, smaller where attention or
convolutions on large maps dominate.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
from _timing import interleaved_medians, machine_summary, speedup

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "zoo"))

import zoo_models  # noqa: E402

import epcli  # noqa: E402
from epcli.checkpoint.inputs import tensor_leaves  # noqa: E402

DEPTH = 4
SAMPLES = 8


def _batch(specs: tuple[epcli.InputSpec, ...], size: int, seed: int, dtype: torch.dtype) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [spec.sample(size, generator, dtype=dtype) for spec in specs]


def _error(expanded: torch.nn.Module, collapsed: torch.nn.Module, batch: list[torch.Tensor]) -> float:
    with torch.inference_mode(), epcli.convert.expanded_eval(expanded):
        reference = dict(tensor_leaves(expanded(*batch)))
        got = dict(tensor_leaves(collapsed(*batch)))
    return max(
        float((got[path].double() - value.double()).abs().max()) / (float(value.abs().max()) or 1.0)
        for path, value in reference.items()
    )


def measure(name: str) -> str:
    entry = zoo_models.ZOO[name]
    torch.manual_seed(1)
    model = epcli.overparameterize(entry.plain(), depth=DEPTH, batch_norm=True, **entry.options).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(2):
        leaves = tensor_leaves(model(*_batch(entry.inputs, 4, step, torch.float32)))
        sum(t.float().square().mean() for _, t in leaves if t.is_floating_point()).backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    layers = len(epcli.plan_overparameterize(entry.plain(), depth=DEPTH, batch_norm=True, **entry.options).replaced)
    collapsed = epcli.collapse_model(model)
    error32 = _error(model, collapsed, _batch(entry.inputs, SAMPLES, 7, torch.float32))
    model64 = copy.deepcopy(model).double()
    error64 = _error(model64, epcli.collapse_model(model64), _batch(entry.inputs, SAMPLES, 7, torch.float64))
    batch = _batch(entry.inputs, SAMPLES, 8, torch.float32)

    def run(module: torch.nn.Module) -> object:
        with torch.inference_mode():
            return module(*batch)

    with epcli.convert.expanded_eval(model):
        times = interleaved_medians({"expanded": lambda: run(model), "collapsed": lambda: run(collapsed)}, rounds=15)
    params = (sum(p.numel() for p in model.parameters()), sum(p.numel() for p in collapsed.parameters()))
    return (
        f"| {name} | {layers} | {params[0]:,} -> {params[1]:,} | {error32:.1e} | {error64:.1e} | "
        f"{times['expanded'] * 1e3:.2f} -> {times['collapsed'] * 1e3:.2f} ms | "
        f"**{speedup(times['expanded'], times['collapsed']):.2f}x** |"
    )


def main(patterns: list[str]) -> None:
    torch.set_num_threads(2)
    print(machine_summary())
    print(f"depth {DEPTH}, batch-norm, 2 AdamW steps; errors relative to the output's scale; torch eager, batch {SAMPLES}")
    print("| model | EP layers | params expanded -> collapsed | float32 error | float64 error | eager latency | speedup |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, entry in zoo_models.ZOO.items():
        if entry.options.get("allow_new_bias") or (patterns and not any(p in name for p in patterns)):
            continue
        print(measure(name), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])

"""Does EP training make a model more compressible? The same MLP trained with EP layers and plainly, compressed.

Run from the repository root (a few minutes on 2 cores; needs scikit-learn)::

    python benchmarks/compress_digits.py

Data, scaling and the training loop are ``sample_checkpoints/make_samples.py``'s (sklearn's 8x8 digits, pixels / 16,
AdamW with weight decay 1e-4 and a cosine schedule, seeded); the training split is cut once more into a training
part and a validation part. Two models of one architecture, 64 -> 512 -> 512 -> 10 with ReLUs:

* EP: ``EPLinear(64, 512, depth=4)``, ``EPLinear(512, 512, depth=4)``, ``EPLinear(512, 10, depth=2)``;
* plain: ``nn.Linear`` layers of the same shapes;

trained with the same seed, epochs and learning rate. Each is compressed at budgets from a grid, the whole-model
error measured on 512 training samples, twice: whitened by those samples (what ``compress_model`` does with
calibration data) and by plain SVD of the weights (which sees only the weights' own spectra, where EP training is
claimed to act); the budget reported per model is the largest
whose *validation* accuracy is within 0.5 points of the uncompressed model's, and its *test* accuracy is printed
beside it (the test split chooses nothing). It prints:

1. the EP model expanded / collapsed / compressed: test accuracy, parameters, MACs per sample, and onnxruntime
   latency (CPU, all optimisations, one thread, as torch trains here: on a shared 2-core machine more threads
   spin against other processes; medians of interleaved rounds) at batch 1 and 256;
2. per model: the effective rank of each collapsed layer, and per budget the parameters and MACs kept and the
   validation / test accuracy; then both models at their chosen budgets, side by side.
"""

from __future__ import annotations

import functools
import sys
import time
from pathlib import Path

import onnxruntime as ort
import torch
from _timing import interleaved_medians, machine_summary
from deployment_latency import count_macs
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "sample_checkpoints"))
from make_samples import SEED, accuracy, digits_split, train  # noqa: E402

from epcli import EPLinear, collapse_model  # noqa: E402
from epcli.convert import expanded_eval  # noqa: E402
from epcli.onnx.export import INPUT_NAME, export_onnx_bytes  # noqa: E402
from epcli.verification.compare import VerifySettings  # noqa: E402
from epcli.verification.compress import compress_against, reference_outputs  # noqa: E402

HIDDEN = 512
EPOCHS = 60
LEARNING_RATE = 3e-3
VALIDATION = 270
CALIBRATION = 512
BUDGETS = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5)
ACCURACY_LOSS = 0.005
THREADS = 1
ROUNDS = 30


def ep_mlp() -> nn.Module:
    return nn.Sequential(
        EPLinear(64, HIDDEN, depth=4), nn.ReLU(),
        EPLinear(HIDDEN, HIDDEN, depth=4), nn.ReLU(),
        EPLinear(HIDDEN, 10, depth=2),
    )


def plain_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 10))


def test_accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    with expanded_eval(model), torch.no_grad():
        return accuracy(model(x), y)


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def macs(model: nn.Module) -> int:
    with expanded_eval(model):
        return count_macs(model, torch.zeros(1, 64))


def session(model: bytes) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = THREADS
    options.log_severity_level = 3
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def latencies(graphs: dict[str, bytes], x: Tensor) -> dict[int, dict[str, float]]:
    """Milliseconds per run of each graph at batch 1 and 256, interleaved medians."""
    sessions = {name: session(graph) for name, graph in graphs.items()}
    out = {}
    for batch in (1, 256):
        feed = {INPUT_NAME: x[:batch].numpy()}
        medians = interleaved_medians(
            {name: functools.partial(s.run, None, feed) for name, s in sessions.items()}, ROUNDS, warmup=3, calls=20
        )
        out[batch] = {name: seconds * 1e3 for name, seconds in medians.items()}
    return out


def sweep(
    name: str, model: nn.Module, calibration: Tensor, val: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor],
    *, whiten: bool,
):
    """Compress at every budget (error measured on the calibration samples; truncation whitened by them or plain
    SVD); print the table; return the uncompressed test accuracy and the chosen (budget, model, result, test acc)."""
    base_val, base_test = test_accuracy(model, *val), test_accuracy(model, *test)
    settings = VerifySettings(samples=len(calibration), batch_size=256, dtype="float64")
    reference = reference_outputs(model, calibration, None, settings)
    runs = []
    for budget in BUDGETS:
        start = time.perf_counter()
        compressed, result = compress_against(reference, model, max_error=budget, whiten=whiten)
        runs.append((budget, compressed, result, time.perf_counter() - start))
    first = runs[0][2]
    ranks = ", ".join(f"{layer.path}: {layer.effective_rank:.1f} of {layer.full_rank}" for layer in first.layers)
    print(f"\n{name}, {first.method}: uncompressed val {base_val:.2%}, test {base_test:.2%}; "
          f"effective rank per layer {ranks}")
    print(f"  {'budget':>6} {'error':>7} {'ranks':>22} {'params':>15} {'MACs':>15} {'val acc':>8} {'test acc':>8} "
          f"{'time':>6}")
    chosen = None
    for budget, compressed, result, seconds in runs:
        ranks = "/".join("-" if layer.rank is None else str(layer.rank) for layer in result.layers)
        val_acc, test_acc = test_accuracy(compressed, *val), test_accuracy(compressed, *test)
        print(f"  {budget:>6g} {result.model_max_rel_error:>7.3f} {ranks:>22} "
              f"{result.params_after:>7,} ({result.params_after / result.params_before:4.0%}) "
              f"{result.macs_after:>7,} ({result.macs_after / result.macs_before:4.0%}) "
              f"{val_acc:>8.2%} {test_acc:>8.2%} {seconds:>5.1f}s")
        if val_acc >= base_val - ACCURACY_LOSS:
            chosen = (budget, compressed, result, test_acc)
    return base_test, chosen


def main() -> None:
    torch.set_num_threads(THREADS)
    print(machine_summary())
    x_train, y_train, x_test, y_test, _ = digits_split()
    x_fit, y_fit = x_train[:-VALIDATION], y_train[:-VALIDATION]
    val, test = (x_train[-VALIDATION:], y_train[-VALIDATION:]), (x_test, y_test)
    print(f"digits: {len(x_fit)} training, {len(val[0])} validation, {len(x_test)} test samples; "
          f"MLP 64 -> {HIDDEN} -> {HIDDEN} -> 10, {EPOCHS} epochs, lr {LEARNING_RATE:g}, seed {SEED}")
    models = {}
    for name, build in (("EP", ep_mlp), ("plain", plain_mlp)):
        torch.manual_seed(SEED)
        start = time.perf_counter()
        models[name] = train(build(), x_fit, y_fit, epochs=EPOCHS, lr=LEARNING_RATE)
        print(f"trained {name} in {time.perf_counter() - start:.0f} s")
    calibration = x_fit[:CALIBRATION]

    results = {
        (name, method): sweep(name, model, calibration, val, test, whiten=method == "whitened")
        for method in ("whitened", "svd")
        for name, model in models.items()
    }

    ep = models["EP"]
    collapsed = collapse_model(ep)
    _, chosen = results["EP", "whitened"]
    print(f"\nEP model, deployed (budget chosen on validation: accuracy within {ACCURACY_LOSS:.1%} points)")
    if chosen is None:
        print("  no budget kept the validation accuracy; nothing to deploy compressed")
        return
    budget, compressed, result, _ = chosen
    with expanded_eval(ep):
        graphs = {"expanded": export_onnx_bytes(ep, (64,))}
    graphs["collapsed"] = export_onnx_bytes(collapsed, (64,))
    graphs["compressed"] = export_onnx_bytes(compressed, (64,))
    timing = latencies(graphs, x_test)
    forms = {"expanded": ep, "collapsed": collapsed, "compressed": compressed}
    print(f"  {'form':<11} {'test acc':>8} {'params':>9} {'MACs':>9} {'ORT b=1 ms':>11} {'ORT b=256 ms':>13}")
    for form, model in forms.items():
        print(f"  {form:<11} {test_accuracy(model, *test):>8.2%} {params(model):>9,} {macs(model):>9,} "
              f"{timing[1][form]:>11.4f} {timing[256][form]:>13.4f}")
    print(f"  compressed at --max-error {budget:g}: MACs {macs(compressed) / macs(collapsed):.0%} of the collapse")

    print(f"\nEP vs plain at their chosen budgets (validation accuracy within {ACCURACY_LOSS:.1%} points)")
    for (name, method), (base_test, picked) in results.items():
        if picked is None:
            print(f"  {name:<6} {method:<9} no budget in {BUDGETS} kept the validation accuracy")
            continue
        budget, _, result, test_acc = picked
        print(f"  {name:<6} {method:<9} budget {budget:<5g} params {result.params_after:>7,} / {result.params_before:,} "
              f"({result.params_after / result.params_before:.0%}), MACs {result.macs_after / result.macs_before:.0%}; "
              f"test accuracy {base_test:.2%} -> {test_acc:.2%}")


if __name__ == "__main__":
    main()

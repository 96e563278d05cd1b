"""Train the sample checkpoints on scikit-learn's 8x8 digits and write them with their record.

Run from the repository root (needs the ``samples`` extra, i.e. scikit-learn)::

    python sample_checkpoints/make_samples.py            # rewrites the shipped files
    python sample_checkpoints/make_samples.py --out DIR  # somewhere else

Everything is seeded and single-threaded, so on one machine the files are
byte-identical run after run; another CPU type (other SIMD kernels) or torch version
rounds differently, and training amplifies that into different weights of about the
same accuracy. The digits data ships inside scikit-learn's wheel: nothing is
downloaded. ``samples.json`` records, per file, its sha256, the test accuracy of the
expanded model (EP layers running their expanded chains) and of the collapsed model;
how the data was split (with the test indices, so the split can be checked without
relying on scikit-learn's algorithm staying the same) and scaled; and the machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import sklearn
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor, nn

import epcli
from epcli import EPConv2d, EPLinear
from epcli.convert import expanded_eval

HERE = Path(__file__).resolve().parent
SPLIT = {"test_size": 0.25, "random_state": 0, "stratify": True}
PIXEL_SCALE = 16.0
"""Digits pixels are 0..16; models see pixels / 16."""
SEED = 0


def digits_split() -> tuple[Tensor, Tensor, Tensor, Tensor, list[int]]:
    """(x_train, y_train, x_test, y_test, test indices into load_digits()); x is float32 [N, 64] scaled to [0, 1]."""
    data = load_digits()
    train, test = train_test_split(
        np.arange(len(data.target)), test_size=SPLIT["test_size"], random_state=SPLIT["random_state"],
        stratify=data.target,
    )
    as_x = lambda i: torch.tensor(data.data[i] / PIXEL_SCALE, dtype=torch.float32)  # noqa: E731
    as_y = lambda i: torch.tensor(data.target[i], dtype=torch.long)  # noqa: E731
    return as_x(train), as_y(train), as_x(test), as_y(test), [int(i) for i in test]


def cpu_model() -> str:
    """The CPU's model name (Linux), else what the platform module knows: part of what makes training reproducible."""
    cpuinfo = Path("/proc/cpuinfo")
    found = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.M) if cpuinfo.exists() else None
    return found.group(1).strip() if found else platform.processor() or platform.machine()


def mlp() -> nn.Module:
    """Identity skips and batch-norm in a square EP layer, a learnable skip in the 64 -> 10 head."""
    return nn.Sequential(
        EPLinear(64, 64, depth=4, batch_norm=True, residual=True),  # identity skips 0->2, 2->4
        nn.ReLU(),
        nn.Dropout(0.1),
        EPLinear(64, 10, depth=2, width=2, residual=True, residual_mode="learn"),  # projected skip 0->2
    )


def cnn() -> nn.Module:
    """A learnable skip with batch-norm, then an identity skip through a stride-2 layer."""
    return nn.Sequential(
        EPConv2d(1, 16, [3, 1, 3], padding=2, batch_norm=True, residual=True, residual_mode="learn"),  # 8x8 -> 8x8
        nn.ReLU(),
        EPConv2d(16, 16, [3, 3], padding=1, stride=2, residual=True),  # identity skip 0->2, 8x8 -> 3x3
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 3 * 3, 10),
    )


def expanded_logits(model: nn.Module, x: Tensor) -> Tensor:
    """Eval-mode logits with every EP layer running its expanded chain (not its cached collapse)."""
    with expanded_eval(model), torch.no_grad():
        return model(x)


def accuracy(logits: Tensor, y: Tensor) -> float:
    return float((logits.argmax(dim=1) == y).float().mean())


def train(model: nn.Module, x: Tensor, y: Tensor, *, epochs: int, lr: float) -> nn.Module:
    generator = torch.Generator().manual_seed(SEED)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(x), generator=generator).split(64):
            optimizer.zero_grad()
            loss_fn(model(x[batch]), y[batch]).backward()
            optimizer.step()
        schedule.step()
    return model.eval()


SAMPLES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], int, float]] = {
    # file: (builder, per-sample input shape, epochs, learning rate)
    "digits_mlp.pt": (mlp, (64,), 40, 3e-3),
    "digits_cnn.safetensors": (cnn, (1, 8, 8), 30, 3e-3),
}


def make(out: Path) -> dict[str, object]:
    torch.set_num_threads(1)  # reductions in a fixed order: byte-identical files on one machine
    x_train, y_train, x_test, y_test, test_indices = digits_split()
    records = []
    for name, (build, shape, epochs, lr) in SAMPLES.items():
        torch.manual_seed(SEED)
        model = train(build(), x_train.reshape(-1, *shape), y_train, epochs=epochs, lr=lr)
        path = epcli.save_checkpoint(model, out / name, input_shape=shape)
        inputs = x_test.reshape(-1, *shape)  # [N, 64] -> [N, *shape]
        with torch.no_grad():
            collapsed = epcli.collapse_model(model)(inputs)
        records.append(
            {
                "file": name,
                "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                "bytes": path.stat().st_size,
                "input_shape": list(shape),
                "test_accuracy": round(accuracy(expanded_logits(model, inputs), y_test), 6),
                "collapsed_test_accuracy": round(accuracy(collapsed, y_test), 6),
                "test_samples": len(y_test),
                "epochs": epochs,
                "learning_rate": lr,
            }
        )
    record = {
        "dataset": "sklearn.datasets.load_digits (8x8 digits, shipped inside scikit-learn)",
        "split": {**SPLIT, "function": "sklearn.model_selection.train_test_split", "test_indices": test_indices},
        "preprocessing": f"pixels / {PIXEL_SCALE:g}, float32; reshaped to each sample's input_shape",
        "seed": SEED,
        "epcli_version": epcli.__version__,
        "torch_version": str(torch.__version__),
        # the same torch build on the same CPU type trains to the same weights; elsewhere only the accuracy carries over
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_model": cpu_model(),
        "numpy_version": np.__version__,
        "sklearn_version": sklearn.__version__,
        "samples": records,
    }
    one_line = lambda m: "[" + ", ".join(re.findall(r"\d+", m.group())) + "]"  # noqa: E731
    text = re.sub(r"\[[\d,\s]+\]", one_line, json.dumps(record, indent=2))  # lists of ints on one line
    (out / "samples.json").write_text(text + "\n")
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE, help="output directory (default: next to this script)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    record = make(args.out)
    for sample in record["samples"]:  # type: ignore[union-attr]
        print(f"{sample['file']}: test accuracy {sample['test_accuracy']:.4f}, {sample['bytes']} bytes")


if __name__ == "__main__":
    main()

"""ONNX outputs are named by their tensors' paths in the model's output (``output``, ``output.logits``,
``output[0]``), whatever their count, so a one-tensor ``ModelOutput``, dict or ``(logits, None)`` exports and
verifies like any other model; inputs of one number per sample (a timestep) export too."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from epcli import EPLinear, InputSpec, overparameterize, save_checkpoint
from epcli.checkpoint.inputs import Leaves, tensor_leaves
from epcli.jobs.export import export_file
from epcli.jobs.verify import verify_files
from epcli.onnx.export import OnnxSession, export_onnx_bytes, serialize_onnx
from epcli.verification.compare import VerifySettings, compare_outputs

SETTINGS = VerifySettings(samples=8, batch_size=4)


class Nested(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = EPLinear(4, 3, depth=2)

    def forward(self, x: Tensor) -> dict[str, object]:
        y = self.body(x)
        return {"b": y, "loss": None, "c": (2 * y, None)}


def test_outputs_are_named_by_path_and_come_back_by_path(tmp_path: Path):
    model = Nested().eval()
    data = export_onnx_bytes(model, (4,))
    proto = onnx.load_from_string(data)
    assert [o.name for o in proto.graph.output] == ["output.b", "output.c[0]"]
    x = torch.randn(5, 4)
    got = OnnxSession(data)(x)
    assert isinstance(got, Leaves)
    expected = tensor_leaves(model(x))
    assert [path for path, _ in tensor_leaves(got)] == [path for path, _ in expected] == [".b", ".c[0]"]
    for (_, want), (_, have) in zip(expected, tensor_leaves(got), strict=True):
        torch.testing.assert_close(have, want.detach(), rtol=1e-5, atol=1e-5)

    for output, name in zip(proto.graph.output, ["logits", "extra"], strict=True):  # another exporter's names
        proto.graph.node.append(onnx.helper.make_node("Identity", [output.name], [name]))
        output.name = name
    foreign = OnnxSession(serialize_onnx(proto))
    assert foreign.output_paths is None and isinstance(foreign(x), tuple)
    comparisons = compare_outputs("<model>", "model", "onnxruntime", model, foreign, [InputSpec((4,))], SETTINGS)
    assert [c.name for c in comparisons] == ["<model>.b", "<model>.c[0]"] and all(c.passed for c in comparisons)


# ---- nanoGPT: forward returns (logits, loss) and loss is None without targets -------------------------------------
class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = (z.reshape(b, t, 2, c // 2).transpose(1, 2) for z in self.qkv(self.ln(x)).split(c, 2))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, c)
        x = x + self.proj(attended)
        return x + self.mlp(x)


class NanoGPT(nn.Module):
    def __init__(self, vocab: int = 13, dim: int = 8, context: int = 6) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.wpe = nn.Embedding(context, dim)
        self.block = Block(dim)
        self.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, ids: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        x = self.wte(ids) + self.wpe(torch.arange(ids.shape[1], device=ids.device))
        logits = self.lm_head(self.ln_f(self.block(x)))
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss


def _export_and_verify(factory: Callable[[], nn.Module], inputs: list[InputSpec], tmp_path: Path) -> list[str]:
    """save_checkpoint -> export --onnx -> verify OUT.onnx; both pass. Returns the model comparisons' names."""
    torch.manual_seed(0)
    path = save_checkpoint(factory().eval(), tmp_path / "model.safetensors", inputs=inputs)
    onnx_path = tmp_path / "model.onnx"
    exported = export_file(path, onnx_path=onnx_path, safetensors_path=None, settings=SETTINGS, model_factory=factory)
    assert exported.passed and onnx_path.is_file(), exported
    verified = verify_files(path, onnx_path, SETTINGS, model_factory=factory)
    assert verified.report.passed, verified.report
    names = [c.name for c in verified.report.comparisons if c.scope == "model"]
    assert names == [c.name for c in exported.onnx.report.comparisons if c.scope == "model"]
    return names


def test_a_nanogpt_returning_logits_and_none_exports_and_verifies(tmp_path: Path):
    def factory() -> nn.Module:
        return overparameterize(NanoGPT(), depth=2, include=["block.*"])

    names = _export_and_verify(factory, [InputSpec((6,), torch.int64, 0, 13)], tmp_path)
    assert names == ["<model>[0]"]


class Denoiser(nn.Module):
    """Takes a sample and one timestep per sample (shape [batch]), as a diffusion model does."""

    def __init__(self) -> None:
        super().__init__()
        self.time = nn.Embedding(10, 6)
        self.body = EPLinear(6, 6, depth=3)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.body(x + self.time(t))


def test_a_per_sample_scalar_input_exports_and_verifies(tmp_path: Path):
    names = _export_and_verify(Denoiser, [InputSpec((6,)), InputSpec((), torch.int64, 0, 10)], tmp_path)
    assert names == ["<model>"]
    inputs = onnx.load(str(tmp_path / "model.onnx")).graph.input
    assert [len(i.type.tensor_type.shape.dim) for i in inputs] == [2, 1]  # [batch, 6] and [batch]


@pytest.mark.slow
def test_a_transformers_bert_exports_and_verifies(tmp_path: Path):
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=16, num_labels=3,
    )

    def factory() -> nn.Module:
        return overparameterize(BertForSequenceClassification(config), depth=2, include=["bert.encoder.*", "classifier"])

    names = _export_and_verify(factory, [InputSpec((8,), torch.int64, 0, 64)], tmp_path)
    assert names == ["<model>.logits"]

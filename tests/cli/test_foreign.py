"""Checkpoints epcli did not write (plain / trainer-dict / DDP-prefixed ``.pt``, Hugging Face folders, plain and
sharded, and ``torch.distributed.checkpoint`` directories) through every command, with the EP configs from the
user's factory and the inputs from ``--input-shape`` / ``--input``; ``verify --inputs`` on the user's samples.

The files are written here with the libraries users train with (``torch.save``, ``safetensors``, DCP without a
process group); the factory module sits in a directory of its own, imported in-process by a unique name.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

MODULE = '''
import torch
from torch import nn
import torch.nn.functional as F
from epcli import EPLinear


class Net(nn.Module):
    """A float input and a tuple output."""

    def __init__(self, hidden=5):
        super().__init__()
        self.a = EPLinear(6, hidden, depth=3, batch_norm=True)
        self.head = nn.Linear(hidden, 2)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.head(h), {"hidden": h}


class Tokens(nn.Module):
    """Token ids in, logits out; the output projection is tied to the embedding."""

    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(17, 8)
        self.mix = EPLinear(8, 8, depth=2)
        self.lm_head = nn.Linear(8, 17, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, ids):
        return self.lm_head(F.gelu(self.mix(self.wte(ids))))


def build():
    torch.manual_seed(0)
    return Net()


def wider():
    return Net(hidden=7)


def tokens():
    torch.manual_seed(0)
    return Tokens()
'''


@pytest.fixture(scope="module")
def foreign(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("foreign")
    name = f"epcli_foreign_{abs(hash(str(root))) % 10**8}"
    (root / f"{name}.py").write_text(MODULE)
    sys.path.insert(0, str(root))
    module = __import__(name)
    net = module.build().eval()
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():  # trained-looking batch-norm statistics, so the collapse has something to fold
        for key, buffer in net.named_buffers():
            if key.endswith("running_mean"):
                buffer.copy_(torch.randn(buffer.shape, generator=generator) * 0.3)
    state = net.state_dict()
    torch.save(state, root / "plain.pt")
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}, "step": 7, "lr": [0.1]}, root / "trainer.pt")
    (root / "hf").mkdir()
    save_file(dict(state), str(root / "hf" / "model.safetensors"), metadata={"format": "pt"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": dict(state), "step": 7}, checkpoint_id=str(root / "dcp"), no_dist=True)
    tokens = module.tokens().eval()
    stored = {k: v for k, v in tokens.state_dict().items() if k != "lm_head.weight"}  # tied: stored once, as HF does
    (root / "gpt").mkdir()
    keys = sorted(stored)
    shards = {"model-00001-of-00002.safetensors": keys[:2], "model-00002-of-00002.safetensors": keys[2:]}
    for shard, names in shards.items():
        save_file({k: stored[k].contiguous() for k in names}, str(root / "gpt" / shard), metadata={"format": "pt"})
    index = {
        "metadata": {"total_size": sum(t.numel() * t.element_size() for t in stored.values())},
        "weight_map": {k: shard for shard, names in shards.items() for k in names},
    }
    (root / "gpt" / "model.safetensors.index.json").write_text(json.dumps(index))
    x = torch.randn(10, 6, generator=generator)
    np.savez(root / "samples.npz", x.numpy())
    np.savez(root / "wrong.npz", torch.randn(4, 5).numpy())
    yield SimpleNamespace(root=root, net=net, factory=f"{name}:build", wider=f"{name}:wider", tokens=f"{name}:tokens")
    sys.path.remove(str(root))


FLOAT = ("--input-shape", "6")


@pytest.mark.parametrize(
    ("source", "extra"),
    [("plain.pt", ()), ("trainer.pt", ("--state-key", "model")), ("hf", ()), ("dcp", ("--state-key", "model"))],
)
def test_verify_each_foreign_format(foreign: SimpleNamespace, invoke, source: str, extra: tuple[str, ...]):
    run = invoke("verify", foreign.root / source, "--model", foreign.factory, *FLOAT, *extra, "--samples", "8",
                 "--json")
    assert run.returncode == 0, run.describe()
    document = json.loads(run.stdout)
    names = [c["name"] for c in document["comparisons"]]
    assert names == ["a", "<model>[0]", "<model>[1].hidden"], names  # every tensor of the tuple output
    assert document["passed"] and document["model_check_skipped"] is None
    if source == "trainer.pt":
        assert any("'module.'" in note and "stripped" in note for note in document["notes"]), document["notes"]


def test_collapse_a_trainer_dict_in_a_subprocess(foreign: SimpleNamespace, run_epcli, tmp_path: Path):
    out = tmp_path / "net.collapsed.safetensors"
    run = run_epcli("collapse", foreign.root / "trainer.pt", "--model", foreign.factory, *FLOAT,
                    "--state-key", "model", "-o", out, "--json", cwd=foreign.root)
    assert run.returncode == 0, run.describe()
    document = json.loads(run.stdout)
    assert document["model_max_abs_error"] < 1e-5 and [layer["path"] for layer in document["layers"]] == ["a"]
    from epcli import load_checkpoint

    collapsed = load_checkpoint(out, model_factory=foreign.factory)
    x = torch.randn(3, 6)
    with torch.no_grad():
        expected, got = foreign.net(x), collapsed.model(x)  # type: ignore[misc]
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-5)


def test_verify_a_hf_folder_and_a_dcp_directory_in_subprocesses(foreign: SimpleNamespace, run_epcli_many):
    path = os.pathsep.join([str(foreign.root), os.environ.get("PYTHONPATH", "")])
    common = ("--model", foreign.factory, *FLOAT, "--samples", "8")
    runs = run_epcli_many(
        [("verify", foreign.root / "hf", *common), ("verify", foreign.root / "dcp", *common, "--state-key", "model")],
        envs=[{"PYTHONPATH": path}] * 2,
    )
    for run in runs:
        assert run.returncode == 0, run.describe()
        assert "all 3 comparisons passed" in " ".join((run.stdout + run.stderr).split()), run.describe()


def test_a_bad_factory_fails_before_any_work(foreign: SimpleNamespace, invoke, tmp_path: Path):
    out = tmp_path / "never.safetensors"
    for factory in (f"{foreign.factory.split(':')[0]}:missing", foreign.wider):
        run = invoke("collapse", foreign.root / "hf", "--model", factory, *FLOAT, "-o", out)
        assert run.returncode == 3, run.describe()
        assert "collapsing" not in run.stderr and not out.exists()
    run = invoke("collapse", foreign.root / "hf", "--model", f"{foreign.factory.split(':')[0]}:missing", *FLOAT)
    assert "has no attribute 'missing'" in " ".join(run.stderr.split())


def test_inspect_and_export_a_dcp_directory(foreign: SimpleNamespace, invoke, tmp_path: Path):
    args = ("--model", foreign.factory, *FLOAT, "--state-key", "model")
    run = invoke("inspect", foreign.root / "dcp", *args, "--json")
    assert run.returncode == 0, run.describe()
    assert [layer["path"] for layer in json.loads(run.stdout)["layers"]] == ["a"]
    out = tmp_path / "dcp.safetensors"
    run = invoke("export", foreign.root / "dcp", *args, "--safetensors", out)
    assert run.returncode == 0 and out.is_file(), run.describe()


def test_token_model_from_a_sharded_hf_folder_with_a_tied_head(foreign: SimpleNamespace, invoke, tmp_path: Path):
    args = ("--model", foreign.tokens, "--input", "int64[5]:0:17")
    run = invoke("verify", foreign.root / "gpt", *args, "--samples", "8", "--json")
    assert run.returncode == 0, run.describe()
    document = json.loads(run.stdout)
    assert [c["name"] for c in document["comparisons"]] == ["mix", "<model>"]
    assert any("lm_head.weight = wte.weight" in note for note in document["notes"]), document["notes"]
    out = tmp_path / "gpt.safetensors"
    run = invoke("collapse", foreign.root / "gpt", *args, "-o", out, "--json")
    assert run.returncode == 0, run.describe()
    assert json.loads(run.stdout)["model_max_abs_error"] < 1e-5
    run = invoke("verify", foreign.root / "gpt", out, *args, "--samples", "8")
    assert run.returncode == 0, run.describe()


def test_verify_on_the_users_samples(foreign: SimpleNamespace, invoke):
    run = invoke("verify", foreign.root / "hf", "--model", foreign.factory, *FLOAT,
                 "--inputs", foreign.root / "samples.npz", "--json")
    assert run.returncode == 0, run.describe()
    document = json.loads(run.stdout)
    assert document["samples"] == 10 and document["passed"]  # the file's 10 samples, not --samples' 64
    assert [c["name"] for c in document["comparisons"] if c["scope"] == "model"] == ["<model>[0]", "<model>[1].hidden"]
    run = invoke("verify", foreign.root / "hf", "--model", foreign.factory, *FLOAT,
                 "--inputs", foreign.root / "wrong.npz")
    assert run.returncode == 3
    assert "the input has shape [4, 5]; the model takes [batch, 6]" in " ".join(run.stderr.split())


@pytest.mark.parametrize(
    ("args", "expected", "code"),
    [
        ((), "has no epcli metadata (it holds a plain state_dict of", 3),
        (("--model", "FACTORY"), "its model's input is unknown; give it with --input-shape", 2),
        (("--model", "WIDER", "--input-shape", "6"), "wider' does not fit the file: layer 'a' (EPLinear): a.", 3),
        (("--input-shape", "6", "--input", "float32[6]", "--model", "FACTORY"), "not both", 2),
        (("--model", "FACTORY", "--input-shape", "int64[6]"), "use --input", 2),
        (("--model", "FACTORY", "--input", "int64[6]"), "needs its range of values; write DTYPE[D1,...]:LOW:HIGH", 2),
    ],
)
def test_foreign_errors_say_what_to_give(
    foreign: SimpleNamespace, invoke, args: tuple[str, ...], expected: str, code: int
):
    """A file that does not fit is an input error (3); a missing or contradictory option a usage error (2)."""
    args = tuple({"FACTORY": foreign.factory, "WIDER": foreign.wider}.get(a, a) for a in args)
    run = invoke("verify", foreign.root / "plain.pt", *args)
    assert run.returncode == code, run.describe()
    message = " ".join(run.stderr.split())
    assert expected in message, message
    if not args:
        assert "--model module:function" in message and "--input-shape" in message
    if foreign.wider in args:  # the keys or shapes that differ are named
        assert "has shape [5, 6], expected [7, 6]" in message, message


def test_token_model_end_to_end_save_collapse_verify_export(foreign: SimpleNamespace, invoke, tmp_path: Path):
    """A decoder with tied embeddings taking token ids: save -> collapse -> verify -> export --onnx."""
    import onnxruntime

    from epcli import InputSpec, save_checkpoint

    tokens = __import__(foreign.tokens.split(":")[0]).tokens().eval()
    path = save_checkpoint(tokens, tmp_path / "gpt.safetensors", inputs=[InputSpec((5,), torch.int64, 0, 17)])
    model = ("--model", foreign.tokens)
    run = invoke("collapse", path, *model, "-o", tmp_path / "gpt.collapsed.safetensors")
    assert run.returncode == 0, run.describe()
    run = invoke("verify", path, tmp_path / "gpt.collapsed.safetensors", *model, "--samples", "8")
    assert run.returncode == 0, run.describe()
    run = invoke("export", path, *model, "--onnx", tmp_path / "gpt.onnx", "--samples", "8", "--json")
    assert run.returncode == 0, run.describe()
    run = invoke("verify", path, tmp_path / "gpt.onnx", *model, "--samples", "8")  # the artifact, int64 input
    assert run.returncode == 0, run.describe()
    session = onnxruntime.InferenceSession(str(tmp_path / "gpt.onnx"), providers=["CPUExecutionProvider"])
    (only,) = session.get_inputs()
    assert only.type == "tensor(int64)" and only.shape[1:] == [5]
    ids = torch.randint(0, 17, (3, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = tokens(ids)
    got = torch.from_numpy(session.run(None, {only.name: ids.numpy()})[0])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_a_tuple_output_exports_to_onnx_and_verifies_leaf_by_leaf(foreign: SimpleNamespace, invoke, tmp_path):
    """One ONNX output per tensor of the model's (tuple, dict) output, each compared under its own name."""
    onnx_path = tmp_path / "net.onnx"
    run = invoke("export", foreign.root / "hf", "--model", foreign.factory, *FLOAT, "--onnx", onnx_path, "--json")
    assert run.returncode == 0, run.describe()
    export_names = [c["name"] for c in json.loads(run.stdout)["onnx"]["comparisons"] if c["scope"] == "model"]
    assert export_names == ["<model>[0]", "<model>[1].hidden"]

    run = invoke("verify", foreign.root / "hf", onnx_path, "--model", foreign.factory, *FLOAT, "--json")
    assert run.returncode == 0, run.describe()
    document = json.loads(run.stdout)
    assert [c["name"] for c in document["comparisons"] if c["scope"] == "model"] == export_names
    assert document["passed"]

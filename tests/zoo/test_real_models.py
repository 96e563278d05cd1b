"""Real model code end to end: transformers / diffusers models and a nanoGPT-style GPT through every step.

Per model: ``overparameterize`` -> two AdamW steps -> ``save_checkpoint(inputs=...)`` -> ``epcli inspect /
collapse / verify / verify ARTIFACT / export --onnx / verify OUT.onnx`` with ``--model`` -> the collapsed
file loaded with ``strict=True`` into the *original* class and compared with the expanded model -> the
Hugging Face folder route (``save_pretrained``, then ``epcli verify DIR/``). A few models run by default;
``--exhaustive`` runs the whole zoo.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import epcli
from epcli.checkpoint.inputs import tensor_leaves

# skipped without the libraries, which are imported only by the tests that build their models: a worker that runs
# none of them never imports them (diffusers only for the UNet, run with --exhaustive)
pytestmark = pytest.mark.skipif(
    not all(importlib.util.find_spec(name) for name in ("transformers", "diffusers")),
    reason="needs transformers and diffusers (the test extra)",
)

HERE = Path(__file__).resolve().parent
DEFAULT = ("nanogpt", "gpt2")
"""The models of the default run (fast, and between them: a print in __init__, a (logits, None) output, a
ModelOutput with a cache beside the logits, transformers' Conv1D, tied embeddings); the rest run with
--exhaustive."""
FLOAT32_TOLERANCE = 1e-4  # scale-relative: max |deployed - expanded| <= 1e-4 * max |expanded|


def _zoo() -> Any:
    import zoo_models

    return zoo_models


@pytest.fixture
def zoo(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.syspath_prepend(str(HERE))
    return _zoo()


def _names() -> list[Any]:
    import sys

    sys.path.insert(0, str(HERE))
    try:
        names = [name for name, entry in _zoo().ZOO.items() if not entry.options.get("allow_new_bias")]
    finally:
        sys.path.remove(str(HERE))
    return [name if name in DEFAULT else pytest.param(name, marks=pytest.mark.slow) for name in names]


def _cli(*args: Any) -> tuple[int, Any, str]:
    """``epcli ARGS --json`` in-process: exit code, the one JSON document on stdout, stderr."""
    from typer.testing import CliRunner

    from epcli.cli.app import app

    result = CliRunner().invoke(app, [str(a) for a in (*args, "--json")])
    try:
        document = json.loads(result.stdout)
    except json.JSONDecodeError as e:
        raise AssertionError(f"stdout of epcli {args} is not one JSON document: {result.stdout[:300]!r}") from e
    return result.exit_code, document, result.stderr


def _trained(zoo: Any, name: str) -> torch.nn.Module:
    model = zoo.expanded(name).train()
    inputs = zoo.ZOO[name].inputs
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(2):
        leaves = tensor_leaves(model(*_batch(inputs, 2, seed=step)))
        sum(t.float().square().mean() for _, t in leaves if t.is_floating_point()).backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def _batch(specs: Any, size: int, *, seed: int) -> list[torch.Tensor]:
    """Seeded random inputs (constant ones would put the models' norms on a zero variance)."""
    generator = torch.Generator().manual_seed(seed)
    return [spec.sample(size, generator, dtype=torch.float32) for spec in specs]


def _outputs(model: torch.nn.Module, batch: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return dict(tensor_leaves(model(*batch)))


@pytest.mark.parametrize("name", _names())
def test_every_step_on_a_real_model(zoo: Any, name: str, tmp_path: Path):
    entry = zoo.ZOO[name]
    model = _trained(zoo, name)
    checkpoint = epcli.save_checkpoint(model, tmp_path / "ck.safetensors", inputs=list(entry.inputs))
    factory = ("--model", f"zoo_models:ep_{name}")

    code, doc, err = _cli("inspect", checkpoint, *factory)
    assert code == 0, err
    code, doc, err = _cli("collapse", checkpoint, "-o", tmp_path / "c.safetensors", *factory)
    assert code == 0, err
    for artifact in ((), (tmp_path / "c.safetensors",)):
        code, doc, err = _cli("verify", checkpoint, *artifact, *factory)
        assert (code, doc["passed"], doc["model_check_skipped"]) == (0, True, None), err
    code, doc, err = _cli(
        "verify", checkpoint, tmp_path / "c.safetensors", *factory, "--plain-model", f"zoo_models:plain_{name}"
    )
    assert (code, doc["passed"], doc["deploy_changes"]) == (0, True, {}), err
    assert any(c["name"].startswith("<deployed>") for c in doc["comparisons"])

    code, doc, err = _cli("export", checkpoint, "--onnx", tmp_path / "m.onnx", *factory)
    if entry.onnx is None:
        assert code == 0, err
        code, doc, err = _cli("verify", checkpoint, tmp_path / "m.onnx", *factory)
        assert (code, doc["passed"]) == (0, True), err
    else:
        assert code == 3 and "cannot trace" in doc["error"]["message"], (entry.onnx, doc)

    # the deployment: the collapsed file in the class the user started from, strictly
    deployed = entry.plain()
    deployed.load_state_dict(load_file(tmp_path / "c.safetensors"), strict=True)
    batch = _batch(entry.inputs, 3, seed=7)
    with epcli.convert.expanded_eval(model):
        expected = _outputs(model, batch)
    got = _outputs(deployed.eval(), batch)
    assert set(got) == set(expected)
    for path, reference in expected.items():
        scale = float(reference.abs().max()) or 1.0
        error = float((got[path] - reference).abs().max())
        assert error <= FLOAT32_TOLERANCE * scale, f"{path}: max |deployed - expanded| {error:.3g}, scale {scale:.3g}"


@pytest.mark.parametrize("name", [n for n in ("bert", "gpt2", "llama", "vit") if n in DEFAULT] + [
    pytest.param(n, marks=pytest.mark.slow) for n in ("bert", "gpt2", "llama", "vit") if n not in DEFAULT
])
def test_a_hugging_face_folder_verifies_with_the_users_factory(zoo: Any, name: str, tmp_path: Path):
    """``save_pretrained`` of the EP model (transformers' own layout and key names), then ``epcli verify DIR/``."""
    model = _trained(zoo, name)
    model.save_pretrained(tmp_path / "hf")
    specs = [a for spec in zoo.ZOO[name].inputs for a in ("--input", str(spec))]
    code, doc, err = _cli("verify", f"{tmp_path / 'hf'}/", "--model", f"zoo_models:ep_{name}", *specs)
    assert (code, doc["passed"], doc["model_check_skipped"]) == (0, True, None), err


def test_batch_norm_on_bias_free_layers_is_named_and_caught_by_the_deployment_check(zoo: Any, tmp_path: Path):
    """Llama's projections have no bias; batch-norm's shift folds into one. Kept by default (converting nothing
    warns); with ``allow_new_bias=True`` every report names the changed layers, and ``--plain-model`` (Llama's
    own class) refuses the artifact, where a loader that drops unexpected keys would deploy a wrong model."""
    plain = zoo.ZOO["llama"].plain
    with pytest.warns(UserWarning):
        kept = epcli.overparameterize(plain(), depth=2, batch_norm=True)
    assert not epcli.plan_overparameterize(kept, depth=2).changed

    torch.manual_seed(1)
    model = epcli.overparameterize(plain(), depth=2, batch_norm=True, allow_new_bias=True).eval()
    changed = [c.path for c in epcli.plan_overparameterize(plain(), depth=2, batch_norm=True, allow_new_bias=True).changed]
    assert changed and all("proj" in path or path == "lm_head" for path in changed)
    checkpoint = epcli.save_checkpoint(model, tmp_path / "ck.safetensors", inputs=list(zoo.ZOO["llama"].inputs))
    factory = ("--model", "zoo_models:ep_llama_bn")

    code, doc, err = _cli("collapse", checkpoint, "-o", tmp_path / "c.safetensors", *factory)
    assert code == 0, err
    assert sorted(doc["deploy_changes"]) == sorted(changed)
    assert all("adds a bias" in changes[0] for changes in doc["deploy_changes"].values())
    code, doc, err = _cli("verify", checkpoint, tmp_path / "c.safetensors", *factory)
    assert (code, doc["passed"], sorted(doc["deploy_changes"])) == (0, True, sorted(changed))
    assert any("cannot load the collapsed file strictly" in note for note in doc["notes"])

    code, doc, err = _cli(
        "verify", checkpoint, tmp_path / "c.safetensors", *factory, "--plain-model", "zoo_models:plain_llama"
    )
    assert code != 0 and doc["passed"] is not True
    message = doc["error"]["message"]
    assert "does not load strictly into --plain-model 'zoo_models:plain_llama'" in message
    assert "unexpected keys" in message and "adds a bias" in message

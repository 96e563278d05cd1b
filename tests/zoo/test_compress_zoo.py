"""``epcli compress`` on real model code: every model of the zoo, through a ``--model`` factory.

Per model: the EP model saved -> ``epcli compress CKPT --model zoo_models:ep_<name>`` (in-process: what is tested is
the compression of real model code, not the process, whose exit codes and streams tests/cli checks) -> the
compressed file rebuilt from the same factory (the recorded layers factored at the recorded ranks) and measured
again here against the expanded model -> ``epcli verify CKPT COMPRESSED --model ...``. nanoGPT and GPT-2 run by
default (GPT-2's layers are transformers' ``Conv1D``); ``--exhaustive`` runs the whole zoo.

The zoo's weights are random (nothing is trained), so their spectra are flat and no layer saves parameters
within 1%: the budget here is 30%, where every model has layers worth factoring. What is tested is that the
whole model stays within the budget it was given, as recorded, re-measured and verified, not a useful ratio.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import epcli
from epcli.checkpoint.inputs import random_inputs, tensor_leaves
from epcli.convert import expanded_eval
from epcli.layers.lowrank import LowRankConv, LowRankLinear

# skipped without the libraries, which are imported only by the tests that build their models (diffusers only for
# the UNet, run with --exhaustive)
pytestmark = pytest.mark.skipif(
    not all(importlib.util.find_spec(name) for name in ("transformers", "diffusers")),
    reason="needs transformers and diffusers (the test extra)",
)

HERE = Path(__file__).resolve().parent
LOW_RANK = (LowRankLinear, LowRankConv)
DEFAULT = ("nanogpt", "gpt2")
BUDGET = 0.3
"""--max-error: max |compressed - expanded| / max |expanded| over every output of the calibration samples."""
FLOAT_TOLERANCE = 1e-5
"""Relative: the file's float32 model re-measured here differs from the float32 candidate compress measured only
by the order of float operations."""
NEW_INPUTS_MARGIN = 1.5
"""Inputs compress never saw may move the error: it must stay within 1.5x the budget on them (the budget holds on
the calibration samples, not for every input)."""


def _names() -> list[Any]:
    sys.path.insert(0, str(HERE))
    try:
        import zoo_models

        names = list(zoo_models.ZOO)
    finally:
        sys.path.remove(str(HERE))
    return [name if name in DEFAULT else pytest.param(name, marks=pytest.mark.slow) for name in names]


@pytest.fixture
def zoo(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.syspath_prepend(str(HERE))
    import zoo_models

    return zoo_models


def _compress(checkpoint: Path, output: Path, factory: str) -> dict[str, Any]:
    """``epcli compress ... --json`` in-process (the ``zoo`` fixture puts zoo_models on sys.path): the JSON document."""
    code, document, stderr = _cli("compress", checkpoint, "-o", output, "--model", factory, "--max-error", BUDGET)
    assert code == document["exit_code"], stderr
    return document


def _model_error(expanded: torch.nn.Module, compressed: torch.nn.Module, batches: list[tuple[torch.Tensor, ...]]) -> float:
    """max |compressed - expanded| / max |expanded| per output tensor, the largest over the outputs; the expanded
    model in float64, the compressed one in its own dtype (float32), as a user runs it."""
    dtype = next(compressed.parameters()).dtype
    got: dict[str, list[torch.Tensor]] = {}
    want: dict[str, list[torch.Tensor]] = {}
    with torch.no_grad(), expanded_eval(expanded):
        for batch in batches:
            for path, tensor in tensor_leaves(expanded(*batch)):
                want.setdefault(path, []).append(tensor.double())
            cast = [t.to(dtype) if t.is_floating_point() else t for t in batch]
            for path, tensor in tensor_leaves(compressed(*cast)):
                got.setdefault(path, []).append(tensor.double())
    assert set(got) == set(want) and want
    errors = []
    for path in want:
        reference, candidate = torch.cat(want[path]), torch.cat(got[path])
        errors.append(float((candidate - reference).abs().max() / reference.abs().max()))
    return max(errors)


@pytest.mark.parametrize("name", _names())
def test_compress_stays_within_the_budget(zoo: Any, name: str, tmp_path: Path):
    specs = list(zoo.ZOO[name].inputs)
    factory = f"zoo_models:ep_{name}"
    checkpoint = epcli.save_checkpoint(zoo.expanded(name).eval(), tmp_path / "ck.safetensors", inputs=specs)
    output = tmp_path / "small.safetensors"

    document = _compress(checkpoint, output, factory)

    assert document["exit_code"] == 0, document["error"]
    assert document["files"] == [str(output)]
    ranks = {layer["path"]: layer["rank"] for layer in document["layers"] if layer["rank"] is not None}
    assert ranks and document["macs_after"] < document["macs_before"]
    assert document["params_after"] < document["params_before"]
    assert document["model_max_rel_error"] <= BUDGET

    # the file rebuilt from the factory: the recorded layers are epcli's low-rank modules at the recorded ranks
    compressed = epcli.load_checkpoint(output, model_factory=factory)
    record = compressed.metadata["provenance"]["compression"]
    assert {path: entry["rank"] for path, entry in record["layers"].items() if entry["rank"]} == ranks
    modules = dict(compressed.model.named_modules())
    assert all(isinstance(modules[path], LOW_RANK) and modules[path].rank == rank for path, rank in ranks.items())
    assert sum(t.numel() for t in compressed.state_dict.values()) < sum(
        info.numel() for info in epcli.collapse_model(zoo.expanded(name)).state_dict().values()
    )

    # measured again here: on the samples compress drew (seed 0), then on samples it never saw
    expanded = epcli.load_checkpoint(checkpoint, model_factory=factory).model.to(torch.float64)
    calibration = list(random_inputs(specs, 64, 64, 0, dtype=torch.float64))
    error = _model_error(expanded, compressed.model, calibration)
    assert math.isclose(error, document["model_max_rel_error"], rel_tol=FLOAT_TOLERANCE), (error, document)
    assert error <= BUDGET * (1 + FLOAT_TOLERANCE)
    unseen = _model_error(expanded, compressed.model, list(random_inputs(specs, 64, 32, 1234, dtype=torch.float64)))
    assert unseen <= NEW_INPUTS_MARGIN * BUDGET, unseen

    code, verified, stderr = _cli("verify", checkpoint, output, "--model", factory)
    assert (code, verified["passed"], verified["max_error"], verified["atol"]) == (0, True, BUDGET, None), stderr
    assert verified["pass_rule"].startswith("max |compressed - expanded| / max |expanded| <= max_error")
    assert [c["scope"] for c in verified["comparisons"]] == ["model"] * len(verified["comparisons"])


def _cli(*args: Any) -> tuple[int, Any, str]:
    """``epcli ARGS --json`` in-process (this process has imported the model's library already)."""
    from typer.testing import CliRunner

    from epcli.cli.app import app

    result = CliRunner().invoke(app, [str(a) for a in (*args, "--json")])
    return result.exit_code, json.loads(result.stdout), result.stderr

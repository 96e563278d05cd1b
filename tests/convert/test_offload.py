"""Offloaded layers and compress with a scratch store: a layer whose weight waits on disk runs as before, holds
no copy of it in between, never yields a silently wrong output when read by mistake, and comes back whole; the
compression found with every weight and factor parked is the one found in memory."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

from epcli.convert.compress import ParkedFactors, layer_plans
from epcli.convert.offload import is_offloaded, offload, offloaded_weight, restore
from epcli.errors import UsageError
from epcli.storage.scratch import ScratchTensors
from epcli.verification.compare import VerifySettings
from epcli.verification.compress import compress_against, reference_outputs


def _model() -> nn.Module:
    """Layers of low effective rank (rank 3 plus noise), as EP training leaves them: compressible."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2), nn.Flatten(),
        nn.Linear(8 * 6 * 6, 40), nn.ReLU(), nn.Linear(40, 10, bias=False),
    ).eval()
    with torch.no_grad():
        for layer in model:
            if isinstance(layer, (nn.Linear, nn.Conv2d)):
                rows = layer.weight.shape[0]
                low = torch.randn(rows, 3) @ torch.randn(3, layer.weight[0].numel())
                layer.weight.copy_((low + 0.01 * torch.randn_like(low)).reshape(layer.weight.shape))
    return model


def test_an_offloaded_layer_runs_as_before_and_holds_no_copy_between_runs(tmp_path):
    model, x = _model(), torch.randn(4, 3, 8, 8)
    want, weight = model(x), model[4].weight.detach().clone()
    parameter = model[4].weight
    with ScratchTensors(tmp_path) as store:
        offload(model[4], store)
        offload(model[4], store)  # once only
        assert is_offloaded(model[4]) and model[4].weight is parameter  # ties and identities hold
        assert model[4].weight.untyped_storage().nbytes() <= 8  # one NaN seen through stride-0 views
        assert torch.isnan(model[4].weight).all()  # read by mistake: NaN, never a silently wrong output
        assert torch.equal(model(x), want)
        assert model[4].weight.untyped_storage().nbytes() <= 8  # freed after the forward
        assert torch.equal(offloaded_weight(model[4]), weight)
        twin = copy.deepcopy(model)  # shares the store, reads into its own parameter
        assert torch.equal(twin(x), want) and twin[4].weight is not parameter
        restore(model[4])
        assert not is_offloaded(model[4]) and torch.equal(model[4].weight, weight)
        assert not model[4]._forward_pre_hooks and not model[4]._forward_hooks
        assert not model[4]._forward_hooks_always_called
        assert torch.equal(model(x), want)


def test_a_forward_that_raises_frees_the_weight(tmp_path):
    layer = nn.Linear(5, 3)
    with ScratchTensors(tmp_path) as store:
        offload(layer, store)
        with pytest.raises(RuntimeError):
            layer(torch.randn(2, 4))  # wrong width
        assert layer.weight.untyped_storage().nbytes() <= 8


def test_a_layer_used_twice_reads_its_weight_for_each_use(tmp_path):
    shared = nn.Linear(6, 6)
    model = nn.Sequential(shared, nn.Tanh(), shared).eval()
    x = torch.randn(3, 6)
    want = model(x)
    with ScratchTensors(tmp_path) as store:
        offload(shared, store)
        assert torch.equal(model(x), want)


@pytest.mark.parametrize("whiten", [False, True], ids=["svd", "whitened"])
def test_compress_with_a_scratch_store_finds_what_it_finds_in_memory(tmp_path, whiten):
    """Same ranks, errors and outputs; factors parked while searching; every layer whole again at the end, and
    nothing left in the directory."""
    batches = [(torch.randn(16, 3, 8, 8),) for _ in range(2)]
    settings = VerifySettings(samples=32, batch_size=16, dtype="float32")
    reference = reference_outputs(_model(), batches, None, settings)
    in_memory, expected = compress_against(reference, _model(), max_error=0.2, whiten=whiten)
    with ScratchTensors(tmp_path) as store:
        model = _model()
        plans = layer_plans(model, reference.batches, whiten=whiten, scratch=store)
        assert all(isinstance(f, ParkedFactors) for plan in plans.values() for f in plan.factors)
        parked, result = compress_against(reference, model, max_error=0.2, whiten=whiten, consume=True, scratch=store)
        assert store.nbytes > 0
    assert os.listdir(tmp_path) == []
    assert result.factored and result.ranks == expected.ranks and result.threshold == expected.threshold
    assert result.model_max_rel_error == pytest.approx(expected.model_max_rel_error, rel=1e-4)
    assert [layer.error for layer in result.layers] == pytest.approx([layer.error for layer in expected.layers])
    assert not any(is_offloaded(module) for module in parked.modules())
    assert all(torch.isfinite(p).all() for p in parked.parameters())
    with torch.no_grad():
        torch.testing.assert_close(parked(batches[0][0]), in_memory(batches[0][0]), rtol=1e-5, atol=1e-5)


def test_a_layer_that_is_not_finite_is_named():
    model = _model()
    with torch.no_grad():
        model[4].weight[0, 0] = torch.inf
    with pytest.raises(UsageError, match="layer '4': the weight .* not finite; only a finite model can be compressed"):
        layer_plans(model, [(torch.randn(2, 3, 8, 8),)], whiten=False)

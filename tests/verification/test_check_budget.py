"""One memory budget for a check (MAX_CHECK_BYTES): the samples and expected outputs held, plus a batch times the
bytes of every module's output on one sample. Batches are cut to fit it; what cannot fit with a batch of one is
refused, naming the input and the budget, before anything big is allocated. Inputs a model rejects (ids beyond
its embedding) are named with their range."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import epcli
from epcli import EPConv1d, EPLinear, InputSpec
from epcli.errors import ModelInputError, UsageError
from epcli.limits import MAX_CHECK_BYTES
from epcli.verification.compare import VerifySettings, fit_batch
from epcli.verification.model_check import expanded_outputs

WIDE = (InputSpec((100_000, 16)),)


def test_fit_batch_cuts_the_batch_to_the_room_left_and_refuses_what_cannot_fit():
    settings = VerifySettings(samples=10, batch_size=32)
    assert fit_batch(settings, run_bytes=1, held_bytes=0, what="x").batch_size == 32
    fitted = fit_batch(settings, run_bytes=MAX_CHECK_BYTES // 8, held_bytes=MAX_CHECK_BYTES // 20, what="x")
    assert fitted.batch_size == 4  # half the budget is held, the rest takes 4 samples
    with pytest.raises(ModelInputError, match=r"a check on input_shape=\[1, 2\] needs 0 MiB to hold the inputs and "
                       r"outputs of 1 sample and 768 MiB per sample .* even with one sample; give a smaller input"):
        fit_batch(settings, run_bytes=MAX_CHECK_BYTES, held_bytes=2**17, what="input_shape=[1, 2]")


def test_fit_batch_says_how_many_samples_fit_when_the_count_is_the_cause():
    """Fewer samples would fit: the count is the caller's (--samples, or the --inputs file), a usage error (2);
    one sample that cannot fit is the input's (ModelInputError, 3) -- neither is a subclass of the other."""
    settings = VerifySettings(samples=10, batch_size=32)
    with pytest.raises(UsageError, match=r"needs 480 MiB to hold the inputs and outputs of 10 samples and 384 MiB "
                       r"per sample .*; give fewer samples \(--samples, or fewer in the --inputs file\): 8 fit"):
        fit_batch(settings, run_bytes=MAX_CHECK_BYTES // 2, held_bytes=MAX_CHECK_BYTES // 16, what="x")
    assert not issubclass(ModelInputError, UsageError) and not issubclass(UsageError, ModelInputError)


def test_a_wide_input_runs_in_smaller_batches():
    model = nn.Sequential(EPLinear(16, 16, depth=2))
    expected = expanded_outputs(model, WIDE, VerifySettings(samples=8, batch_size=8))
    assert expected.batch_size < 8 and sum(b[0].shape[0] for b in expected.batches) == 8
    assert max(b[0].shape[0] for b in expected.batches) == expected.batch_size


def test_an_input_that_cannot_fit_is_refused_before_anything_runs():
    model = nn.Sequential(EPConv1d(1, 1, 3, depth=2, padding=1))
    with pytest.raises(ModelInputError, match=r"input_shape=\[1, 67108864\] needs .* memory budget of 768 MiB"):
        expanded_outputs(model, (InputSpec((1, 2**26)),), VerifySettings(samples=64))


class _Tokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(17, 8)
        self.mix = EPLinear(8, 8, depth=2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.mix(self.wte(ids))


def test_ids_beyond_the_embedding_are_named_with_their_range():
    spec = InputSpec((4,), torch.int64, 0, 2**53)
    with pytest.raises(ModelInputError, match=r"the model rejected its inputs \(inputs=\[int64\[4\]:0:9.0072e\+15\].*"
                       r"IndexError: index out of range"):
        expanded_outputs(_Tokens(), (spec,), VerifySettings(samples=4))


def test_ids_of_a_dtype_the_model_does_not_take_are_named():
    spec = InputSpec((4,), torch.int8, 0, 17)
    with pytest.raises(ModelInputError, match=r"the model rejected its inputs \(inputs=\[int8\[4\]:0:17\].*CharTensor"):
        expanded_outputs(_Tokens(), (spec,), VerifySettings(samples=4))


@pytest.mark.slow
def test_memory_of_checks_on_wide_and_long_inputs_in_subprocesses(tmp_path: Path, run_bounded):
    torch.manual_seed(0)
    epcli.save_checkpoint(nn.Sequential(EPLinear(16, 16, depth=2)), tmp_path / "wide.pt", input_shape=[100_000, 16])
    epcli.save_checkpoint(nn.Sequential(EPConv1d(1, 1, 3, depth=2, padding=1)), tmp_path / "long.pt",
                          input_shape=[1, 2**26])
    assert (tmp_path / "wide.pt").stat().st_size < 10_000
    run = run_bounded("verify", tmp_path / "wide.pt", "--samples", "12")  # 150 MiB held, batches of 7
    assert run.returncode == 0, run.stderr
    assert run.max_rss < 1.5 * 2**30, run.max_rss
    for command in (("verify",), ("collapse", "-o", tmp_path / "long.safetensors")):
        run = run_bounded(command[0], tmp_path / "long.pt", *command[1:])
        # the checkpoint's own input specs: an unusable input (3), not a usage error
        assert run.returncode == 3 and "memory budget of 768 MiB" in run.message, run.stderr
        assert "input [1, 67108864]" in run.message or "input_shape=[1, 67108864]" in run.message
        assert run.max_rss < 1.5 * 2**30 and run.seconds < 60

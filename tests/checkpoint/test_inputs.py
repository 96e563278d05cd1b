"""Input specs (epcli.checkpoint.inputs): parsing, validation, seeded inputs, output leaves; files with several inputs and
tuple / dict / dataclass outputs round-trip and verify leaf by leaf."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import Tensor, nn

from epcli import (
    CheckpointError,
    ConfigError,
    EpcliError,
    EPLinear,
    InputSpec,
    ModelInputError,
    load_checkpoint,
    save_checkpoint,
)
from epcli.checkpoint.inputs import describe_inputs, parse_input, random_inputs, tensor_leaves
from epcli.convert import collapse_state_dict
from epcli.verification.compare import VerifySettings, random_batches
from epcli.verification.model_check import verify_checkpoint


@pytest.mark.parametrize(
    ("text", "spec"),
    [
        ("3,8,8", InputSpec((3, 8, 8))),
        ("float64[4]", InputSpec((4,), torch.float64)),
        ("int64[16]:0:50257", InputSpec((16,), torch.int64, 0, 50257)),
        ("float32[2]:-1:1", InputSpec((2,), torch.float32, -1.0, 1.0)),
        ("bool[5]", InputSpec((5,), torch.bool)),
        ("int64[]:0:1000", InputSpec((), torch.int64, 0, 1000)),  # one number per sample: a timestep
        ("float32[]", InputSpec(())),
    ],
)
def test_parse_input(text: str, spec: InputSpec):
    assert parse_input(text) == spec
    assert parse_input(str(spec)) == spec  # str() writes the same syntax back


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("int64[16]", "needs its range"),
        ("int64[16]:5:5", "low < high"),
        ("int8[4]:0:1000", "does not fit int8"),
        ("complex64[4]", "is not one of"),
        ("float32[0]", "ints >= 1"),
        ("int64[4]:0.5:3", "must be numbers"),
        ("float32(3)", "not understood"),
    ],
)
def test_bad_input_specs_say_what_to_write(text: str, match: str):
    with pytest.raises(ConfigError, match=match):
        parse_input(text)


def test_a_dtype_given_by_name_says_to_pass_the_torch_dtype():
    """The string ``"int64"`` is not ``torch.int64``: the message must not list ``int64`` as if it were accepted."""
    with pytest.raises(ConfigError, match=r"must be a torch dtype, one of .*torch\.int64.*; got the string 'int64'"):
        InputSpec((16,), "int64", 0, 100)  # type: ignore[arg-type]


def test_random_inputs_are_seeded_typed_and_in_range():
    specs = [InputSpec((3,)), InputSpec((6,), torch.int64, 5, 9)]
    first = list(random_inputs(specs, 10, 4, 7, dtype=torch.float64))
    again = list(random_inputs(specs, 10, 4, 7, dtype=torch.float64))
    assert [b[0].shape[0] for b in first] == [4, 4, 2]
    for (x, ids), (x2, ids2) in zip(first, again, strict=True):
        assert x.dtype == torch.float64 and ids.dtype == torch.int64
        assert torch.equal(x, x2) and torch.equal(ids, ids2)
        assert int(ids.min()) >= 5 and int(ids.max()) <= 8
    ids = torch.cat([b[1] for b in first])
    assert set(ids.unique().tolist()) == {5, 6, 7, 8}  # 60 draws from 4 values hit every one


def test_one_float_spec_draws_what_input_shape_drew():
    # the values earlier versions drew for an input_shape: randn in float64 from one seeded generator, then cast
    settings = VerifySettings(samples=5, batch_size=3, seed=11)
    generator = torch.Generator().manual_seed(11)
    expected = [torch.randn((n, 2, 3), generator=generator, dtype=torch.float64).float() for n in (3, 2)]
    for got, want in zip(random_batches((2, 3), settings), expected, strict=True):
        assert torch.equal(got, want)


@dataclass
class Pair:
    hidden: Tensor
    skipped: int


def test_tensor_leaves_are_named_by_path():
    a, b, c = torch.zeros(1), torch.ones(1), torch.full((1,), 2.0)
    output = (a, {"logits": b, "not an id": c, "none": None}, [Pair(a, 3)])
    assert [path for path, _ in tensor_leaves(output)] == ["[0]", "[1].logits", "[1]['not an id']", "[2][0].hidden"]
    assert tensor_leaves(a) == [("", a)]


class TwoHeads(nn.Module):
    """Token ids and a float feature vector in; a tuple and a dict out."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.body = EPLinear(6, 6, depth=3)
        self.side = EPLinear(4, 6, depth=2)
        self.head = nn.Linear(6, 3)

    def forward(self, ids: Tensor, features: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        hidden = self.body(self.embed(ids)).mean(1) + self.side(features)
        return hidden, {"scores": self.head(hidden)}


SPECS = [InputSpec((5,), torch.int64, 0, 11), InputSpec((4,))]


@pytest.fixture(scope="module")
def two_heads() -> nn.Module:
    torch.manual_seed(0)
    return TwoHeads().eval()


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_several_inputs_and_a_tuple_output_round_trip_and_verify(two_heads: nn.Module, tmp_path: Path, suffix: str):
    path = save_checkpoint(two_heads, tmp_path / f"heads{suffix}", inputs=SPECS)
    loaded = load_checkpoint(path, model_factory=TwoHeads)
    assert loaded.inputs == tuple(SPECS) and loaded.input_shape == (5,)
    assert loaded.layer_input_shapes == {"body": (5, 6), "side": (4,)}
    assert loaded.metadata["format_version"] == 2
    report = verify_checkpoint(loaded, VerifySettings(samples=6, batch_size=4, dtype="float64"))
    names = [c.name for c in report.comparisons]
    assert names == ["body", "side", "<model>[0]", "<model>[1].scores"], names
    assert report.passed and all(c.samples == 6 for c in report.comparisons)
    assert 0 < report.comparisons[-1].max_abs_error < 1e-12  # compared, not skipped: a collapse rounds


def test_a_collapse_that_changes_one_output_leaf_fails_that_leaf(two_heads: nn.Module, tmp_path: Path):
    path = save_checkpoint(two_heads, tmp_path / "h.safetensors", inputs=SPECS)
    loaded = load_checkpoint(path, model_factory=TwoHeads)
    state = collapse_state_dict(loaded.state_dict, loaded.ep_layers)
    state["head.bias"] = state["head.bias"] + 1e-3  # only the dict leaf moves
    report = verify_checkpoint(loaded, VerifySettings(samples=4), collapsed_state=state)  # float32 weights
    assert [c.name for c in report.failures] == ["<model>[1].scores"]


def test_plain_input_files_stay_format_version_1(tmp_path: Path):
    model = nn.Sequential(EPLinear(4, 3, depth=2))
    path = save_checkpoint(model, tmp_path / "plain.safetensors", input_shape=(4,))
    with safe_open(str(path), "pt") as f:
        document = json.loads(f.metadata()["epcli"])
    assert document["format_version"] == 1 and "inputs" not in document
    assert load_checkpoint(path).inputs == (InputSpec((4,)),)


class Timed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.time = nn.Embedding(10, 4)
        self.body = EPLinear(4, 3, depth=2)

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        return self.body(self.time(t) + x)


TIMED = [InputSpec((), torch.int64, 0, 10), InputSpec((4,))]


def test_a_per_sample_scalar_input_round_trips_and_a_plain_file_cannot_claim_one(tmp_path: Path, rewrite):
    path = save_checkpoint(Timed().eval(), tmp_path / "timed.safetensors", inputs=TIMED)
    loaded = load_checkpoint(path, model_factory=Timed)
    assert loaded.inputs == tuple(TIMED) and loaded.input_shape == ()
    assert loaded.metadata["input_shape"] == [] and loaded.metadata["inputs"][0]["shape"] == []
    assert verify_checkpoint(loaded, VerifySettings(samples=4)).passed
    assert describe_inputs([InputSpec(())]) == "inputs=[float32[]]"  # no --input-shape spells a scalar

    def plain(document: dict) -> None:
        del document["inputs"]
        document["format_version"] = 1

    rewrite(path, metadata=plain)
    with pytest.raises(CheckpointError, match=r"input_shape must be the shape of one sample.*non-empty list"):
        load_checkpoint(path, model_factory=Timed)


def test_integer_inputs_are_required_for_an_embedding(two_heads: nn.Module, tmp_path: Path):
    with pytest.raises(ModelInputError, match=r"inputs=\[InputSpec"):  # the model rejects float inputs
        save_checkpoint(two_heads, tmp_path / "x.safetensors", input_shape=(5,))
    with pytest.raises(ConfigError, match="exactly one of input_shape"):
        save_checkpoint(two_heads, tmp_path / "x.safetensors", input_shape=(5,), inputs=SPECS)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda d: d.update(input_shape=[6]), r"input_shape \[6\] is not the shape of inputs\[0\] \[5\]"),
        (lambda d: d["inputs"][0].update(dtype="complex64"), r"inputs\[0\]: dtype must be one of"),
        (lambda d: d["inputs"][0].update(high=None), r"inputs\[0\]: InputSpec: give both low and high"),
        (lambda d: d.update(inputs=[]), "inputs must be a non-empty list"),
        (lambda d: d.update(format_version=1), r"unknown keys \['inputs'\]"),  # a v1 file has no inputs
    ],
)
def test_bad_inputs_in_a_file_are_refused(two_heads: nn.Module, tmp_path: Path, edit, match: str):
    path = save_checkpoint(two_heads, tmp_path / "h.pt", inputs=SPECS)
    content = torch.load(path, weights_only=True)
    document = json.loads(content["epcli_metadata"])
    edit(document)
    content["epcli_metadata"] = json.dumps(document)
    torch.save(content, path)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(path, model_factory=TwoHeads)


@pytest.mark.parametrize(
    ("tensors", "match"),
    [
        ({"a": torch.zeros(2, 5, dtype=torch.int64), "b": torch.zeros(2, 4)}, "name them input_0 .. input_1"),
        ({"input_0": torch.zeros(2, 5), "input_1": torch.zeros(2, 4)}, "input 0 has dtype float32, but the model"),
        ({"input_0": torch.full((2, 5), 11), "input_1": torch.zeros(2, 4)}, r"values 11..11, outside .*\[0, 11\)"),
        ({"input_0": torch.zeros(2, 5, dtype=torch.int64), "input_1": torch.zeros(3, 4)}, "different batch sizes"),
        ({"input_0": torch.zeros(2, 5, dtype=torch.int64)}, "holds 1 tensor .* takes 2 inputs"),
    ],
)
def test_samples_that_do_not_fit_the_specs_are_named(tmp_path: Path, tensors: dict[str, Tensor], match: str):
    from safetensors.torch import save_file

    from epcli.verification.samples import read_samples

    path = tmp_path / "samples.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(EpcliError, match=match):
        read_samples(path, SPECS)


def test_samples_from_npz_and_pt_are_read_in_order(tmp_path: Path):
    import numpy as np

    from epcli.verification.samples import read_samples

    ids, x = torch.randint(0, 11, (3, 5)), torch.randn(3, 4)
    np.savez(tmp_path / "s.npz", ids.numpy(), x.numpy())  # arr_0, arr_1
    torch.save({"input_1": x, "input_0": ids.int()}, tmp_path / "s.pt")
    for name in ("s.npz", "s.pt"):
        got = read_samples(tmp_path / name, SPECS)
        assert torch.equal(got[0], ids) and got[0].dtype == torch.int64 and torch.equal(got[1], x)

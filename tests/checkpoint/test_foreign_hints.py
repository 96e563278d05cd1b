"""A foreign file that does not fit the factory's model says what it looks like: the prefix every key shares
(``--state-key``), or the file's closest keys to the missing ones."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from epcli import InputSpec, overparameterize
from epcli.checkpoint.load import open_checkpoint
from epcli.errors import CheckpointError

INPUTS = [InputSpec((6,))]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.ModuleDict({"attention": nn.ModuleDict({"query": nn.Linear(6, 6), "key": nn.Linear(6, 6)})})
        self.head = nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        attention = self.encoder["attention"]
        return self.head(attention["query"](x) + attention["key"](x))


def build() -> nn.Module:
    return overparameterize(Net(), depth=2)


def test_a_dcp_directory_of_a_trainer_dict_says_which_state_key(tmp_path: Path):
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": build().state_dict(), "step": 7}, checkpoint_id=str(tmp_path / "run"), no_dist=True)
    with pytest.raises(CheckpointError) as caught:
        open_checkpoint(tmp_path / "run", model_factory=build, inputs=INPUTS)
    message = str(caught.value)
    assert "the file has 0" in message
    assert "every key in the file starts with 'model.'" in message and "--state-key 'model'" in message
    opened = open_checkpoint(tmp_path / "run", model_factory=build, inputs=INPUTS, state_key="model")
    assert set(opened.ep_layers) == {"encoder.attention.query", "encoder.attention.key", "head"}


def test_renamed_keys_show_the_closest_file_keys(tmp_path: Path):
    renames = {"encoder.attention.query.": "enc.attn.q_proj.", "encoder.attention.key.": "enc.attn.k_proj."}
    state = {}
    for key, value in build().state_dict().items():
        for old, new in renames.items():
            key = key.replace(old, new)
        state[key] = value
    save_file(state, tmp_path / "renamed.safetensors")
    with pytest.raises(CheckpointError) as caught:
        open_checkpoint(tmp_path / "renamed.safetensors", model_factory=build, inputs=INPUTS)
    message = str(caught.value)
    pairs = re.findall(r"'(encoder[^']*)' ~ '([^']*)'", message)
    assert len(pairs) == 3, message
    for model_key, file_key in pairs:  # each missing key next to its own renamed tensor
        assert file_key == model_key.replace("encoder.attention.query.", "enc.attn.q_proj."), message
    assert "--state-key" not in message


def test_echoed_keys_are_bounded_and_escaped(tmp_path: Path):
    state = {f"\x1b]0;owned\x07{'x' * 500}.{key}": value for key, value in build().state_dict().items()}
    save_file(state, tmp_path / "hostile.safetensors")
    with pytest.raises(CheckpointError) as caught:
        open_checkpoint(tmp_path / "hostile.safetensors", model_factory=build, inputs=INPUTS)
    message = str(caught.value)
    assert "\x1b" not in message and "x" * 200 not in message and "characters)" in message


@pytest.mark.slow
def test_a_vit_file_with_the_names_transformers_writes_is_read_under_the_models_names(tmp_path: Path):
    """transformers' save_pretrained writes ViT's keys under older names; its own renaming maps them back."""
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=8, patch_size=4,
        num_labels=3,
    )

    def factory() -> nn.Module:
        return overparameterize(ViTForImageClassification(config), depth=2, include=["vit.layers.*"])

    torch.manual_seed(0)
    model = factory()
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as stored_file:
        assert "vit.encoder.layer.0.attention.attention.query.layer_dict.0.0.weight" in stored_file.keys()
        stored = stored_file.get_tensor("vit.encoder.layer.0.attention.attention.query.layer_dict.0.0.weight")
    opened = open_checkpoint(tmp_path / "model.safetensors", model_factory=factory, inputs=[InputSpec((3, 8, 8))])
    assert any("names transformers' save_pretrained writes for ViTForImageClassification" in n for n in opened.notes)
    read = opened.read(["vit.layers.0.attention.q_proj.layer_dict.0.0.weight"])
    assert torch.equal(read["vit.layers.0.attention.q_proj.layer_dict.0.0.weight"], stored)

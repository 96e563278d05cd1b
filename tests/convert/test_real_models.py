"""``overparameterize`` on models people really have: transformers models built from tiny configs (random weights,
nothing downloaded).

GPT-2 is built from transformers' ``Conv1D`` (weight stored ``[in, out]``), Llama's projections are bias-free,
Whisper's code reads ``conv1.stride[0]``, Wav2Vec2's positional conv is weight-normed (parametrized). For each: what
the plan says, and that the collapse loads strictly into the original class and computes what the expanded model
does. Tolerances: float64 1e-9, float32 1e-4, relative to the largest |output| (float32 rounding accumulates
through the chain and the attention).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from epcli.convert import collapse_model, collapse_state_dict, expanded_eval, overparameterize, plan_overparameterize
from epcli.layers import EPConv1d, EPLinear
from epcli.layers.registry import find_ep_layers

transformers = pytest.importorskip("transformers")

TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4}


def _close(actual: Tensor, expected: Tensor, dtype: torch.dtype) -> None:
    scale = TOLERANCE[dtype] * float(expected.abs().max())
    torch.testing.assert_close(actual, expected, rtol=TOLERANCE[dtype], atol=scale)


def _gpt2_config() -> Any:
    return transformers.GPT2Config(
        n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16, bos_token_id=0, eos_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )


def _own_weights(model: nn.Module) -> set[str]:
    """Paths of the modules holding parameters themselves (a weight-normed conv: the conv, not its parametrization)."""
    return {
        path for path, module in model.named_modules()
        if ".parametrizations" not in path
        and (next(module.parameters(recurse=False), None) is not None or hasattr(module, "parametrizations"))
    }


# ---- GPT-2: transformers' Conv1D ----------------------------------------------------------------------------------
def test_gpt2_plan_converts_every_conv1d_and_says_why_the_rest_is_kept() -> None:
    model = transformers.GPT2LMHeadModel(_gpt2_config())
    plan = plan_overparameterize(model, depth=2)
    replaced = {c.path: c.kind for c in plan.replaced}
    assert replaced == {
        f"transformer.h.0.{name}": "Conv1D" for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    }
    kept = {c.path: c.reason or "" for c in plan.kept}
    assert {c.path for c in plan.conversions} == _own_weights(model)  # every module holding weights is listed
    assert "not a linear or convolution layer" in kept["transformer.wte"]
    assert "not a linear or convolution layer" in kept["transformer.h.0.ln_1"]
    assert "shared with 'transformer.wte' (tied)" in kept["lm_head"]
    assert not plan.changed


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_gpt2_trains_and_its_collapse_loads_strictly_into_gpt2(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    config = _gpt2_config()
    model = transformers.GPT2LMHeadModel(config).to(dtype)
    ep = overparameterize(model, depth=3, batch_norm=True, residual=True, residual_mode="learn")
    layers = find_ep_layers(ep)
    assert len(layers) == 4 and all(isinstance(layer, EPLinear) and layer.nf == layer.weight.shape[1] for layer in
                                     layers.values())
    tokens = torch.randint(0, config.vocab_size, (4, 12))
    optimizer = torch.optim.AdamW(ep.parameters(), lr=1e-2)
    ep.train()
    for _ in range(3):
        optimizer.zero_grad()
        ep(tokens, labels=tokens).loss.backward()
        optimizer.step()

    with torch.no_grad(), expanded_eval(ep):
        expected = ep(tokens).logits
    collapsed = collapse_model(ep)
    assert not find_ep_layers(collapsed)
    assert all(type(collapsed.get_submodule(path)).__name__ == "Conv1D" for path in layers)
    state = collapse_state_dict(ep.state_dict(), {path: layer.config for path, layer in layers.items()})
    fresh = transformers.GPT2LMHeadModel(config).to(dtype)
    fresh.load_state_dict(state, strict=True)
    with torch.no_grad():
        _close(collapsed(tokens).logits, expected, dtype)
        _close(fresh.eval()(tokens).logits, expected, dtype)
        _close(ep.eval()(tokens).logits, expected, dtype)  # the EP model's own collapsed eval forward


def test_gpt2_file_collapses_without_user_code_into_conv1d_layout(tmp_path: Path) -> None:
    """The config records the layout, so collapsing the file (no model code) writes what GPT-2 loads strictly."""
    from safetensors.torch import load_file

    from epcli.checkpoint.inputs import InputSpec
    from epcli.checkpoint.save import save_checkpoint
    from epcli.jobs.collapse import collapse_file

    torch.manual_seed(0)
    config = _gpt2_config()
    ep = overparameterize(transformers.GPT2LMHeadModel(config), depth=2, batch_norm=True).eval()
    source = save_checkpoint(ep, tmp_path / "gpt2.safetensors", inputs=[InputSpec((8,), torch.int64, 0, 64)])
    result = collapse_file(source, tmp_path / "plain.safetensors")
    assert len(result.layers) == 4 and all(layer.max_rel_error < 1e-6 for layer in result.layers)
    fresh = transformers.GPT2LMHeadModel(config)
    fresh.load_state_dict(load_file(tmp_path / "plain.safetensors"), strict=True)
    tokens = torch.randint(0, config.vocab_size, (2, 8))
    with torch.no_grad(), expanded_eval(ep):
        _close(fresh.eval()(tokens).logits, ep(tokens).logits, torch.float32)


# ---- Llama: bias-free projections under batch_norm ------------------------------------------------------------
def _llama() -> nn.Module:
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
        vocab_size=64, max_position_embeddings=32, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    return transformers.LlamaForCausalLM(config)


PROJECTIONS = 8  # q, k, v, o, gate, up, down and lm_head: all bias-free


def test_llama_bias_free_layers_are_kept_under_batch_norm_with_the_reason() -> None:
    model = _llama()
    plan = plan_overparameterize(model, batch_norm=True)
    bias_free = [c for c in plan.kept if c.kind == "Linear"]
    assert len(bias_free) == PROJECTIONS and not plan.replaced
    assert all("adds a bias" in (c.reason or "") and "allow_new_bias=True" in (c.reason or "") for c in bias_free)
    with pytest.warns(UserWarning, match="converted nothing.*allow_new_bias=True"):
        ep = overparameterize(model, batch_norm=True)
    assert not find_ep_layers(ep)
    plain = overparameterize(model)  # without batch-norm the collapse has the original architecture
    assert all(not layer.deploy_changes and "replaced_bias" not in layer.config.to_dict()
               for layer in find_ep_layers(plain).values())


def test_llama_opt_in_lists_the_changed_architecture() -> None:
    torch.manual_seed(0)
    model = _llama()
    plan = plan_overparameterize(model, batch_norm=True, allow_new_bias=True)
    assert len(plan.changed) == len(plan.replaced) == PROJECTIONS
    assert all("adds a bias" in c.changes[0] for c in plan.changed)
    ep = overparameterize(model, batch_norm=True, allow_new_bias=True)
    layers = find_ep_layers(ep)
    assert all(layer.deploy_changes and layer.config.replaced_bias is False for layer in layers.values())
    state = collapse_state_dict(ep.state_dict(), {path: layer.config for path, layer in layers.items()})
    new_biases = sorted(key for key in state if key.endswith(".bias"))
    assert new_biases == sorted(f"{path}.bias" for path in layers)
    with pytest.raises(RuntimeError, match="Unexpected key"):  # what the plan warned about
        _llama().load_state_dict(state, strict=True)


# ---- Whisper: model code reads conv attributes ----------------------------------------------------------------
def test_whisper_reads_the_conv_stride_tuple_and_collapses() -> None:
    torch.manual_seed(0)
    config = transformers.WhisperConfig(
        d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=32, decoder_ffn_dim=32, num_mel_bins=8, max_source_positions=16, max_target_positions=16,
        vocab_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
    )
    model = transformers.WhisperModel(config).double()
    ep = overparameterize(model, depth=2).eval()
    assert isinstance(ep.encoder.conv1, EPConv1d) and ep.encoder.conv2.stride == (2,)
    features, decoder_ids = torch.randn(2, 8, 32, dtype=torch.float64), torch.tensor([[1, 5, 7]] * 2)
    with torch.no_grad():
        with expanded_eval(ep):
            expected = ep(input_features=features, decoder_input_ids=decoder_ids).last_hidden_state
        actual = collapse_model(ep)(input_features=features, decoder_input_ids=decoder_ids).last_hidden_state
    _close(actual, expected, torch.float64)


# ---- Wav2Vec2: a weight-normed (parametrized) conv ------------------------------------------------------------
def test_wav2vec2_parametrized_conv_is_kept_with_the_reason() -> None:
    config = transformers.Wav2Vec2Config(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, conv_dim=(8, 8),
        conv_stride=(2, 2), conv_kernel=(3, 3), num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2,
    )
    model = transformers.Wav2Vec2Model(config)
    plan = plan_overparameterize(model)
    entries = {c.path: c for c in plan.conversions}
    positional = entries["encoder.pos_conv_embed.conv"]
    assert positional.kind == "ParametrizedConv1d" and not positional.replaced
    assert "parametrized weight" in (positional.reason or "") and "remove_parametrizations" in (positional.reason or "")
    assert positional.params_before == sum(p.numel() for p in model.encoder.pos_conv_embed.conv.parameters())
    assert not any(".parametrizations" in path for path in entries)  # listed once, as the conv
    assert set(entries) == _own_weights(model)
    ep = overparameterize(model)
    assert type(ep.encoder.pos_conv_embed.conv) is type(model.encoder.pos_conv_embed.conv)
    assert isinstance(ep.feature_extractor.conv_layers[0].conv, EPConv1d)


# ---- nothing to convert ------------------------------------------------------------------------------------------
def test_converting_nothing_warns_why() -> None:
    with pytest.warns(UserWarning, match=r"'0' \(Embedding\): Embedding is not a linear or convolution layer"):
        overparameterize(nn.Sequential(nn.Embedding(5, 4), nn.LayerNorm(4)))
    with pytest.warns(UserWarning, match="holds no weights"):
        overparameterize(nn.Sequential(nn.ReLU()))
    with pytest.warns(UserWarning, match="matches an exclude pattern"):
        overparameterize(nn.Sequential(nn.Linear(2, 2)), exclude=["0"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        overparameterize(nn.Sequential(nn.Linear(2, 2)))  # converts: no warning

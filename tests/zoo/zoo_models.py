"""Tiny models of the libraries people use, built from configs (random weights, nothing downloaded).

Each entry gives the plain model (the class a user deploys) and the model's inputs. The EP model is
``overparameterize(plain(), ...)`` with the entry's options; ``ep_<name>`` is its factory for
``--model zoo_models:ep_<name>`` (the skeleton epcli fills from the checkpoint), ``plain_<name>`` the
deployment class for ``--plain-model``. Models whose ``forward`` does not take its inputs positionally in
the order given are subclassed (state-dict keys unchanged), as a user would wrap them for export.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import epcli
from epcli import InputSpec

VOCAB = 64


@dataclass(frozen=True)
class Entry:
    plain: Callable[[], nn.Module]
    inputs: tuple[InputSpec, ...]
    options: dict[str, Any] = field(default_factory=dict)
    onnx: str | None = None  # why the torch exporter cannot trace the *plain* model (None: it can)


def _seeded(build: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        torch.manual_seed(0)
        return build().eval()

    return make


def _bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=VOCAB,
        max_position_embeddings=32, num_labels=3,
    ))


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(
        n_layer=1, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=16, bos_token_id=0, eos_token_id=0,
    ))


def _llama(tied: bool) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from transformers import LlamaConfig, LlamaForCausalLM

        return LlamaForCausalLM(LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
            vocab_size=VOCAB, max_position_embeddings=32, tie_word_embeddings=tied, bos_token_id=0, eos_token_id=0,
        ))

    return build


def _vit() -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    return ViTForImageClassification(ViTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=16,
        patch_size=8, num_labels=3,
    ))


def _wav2vec2() -> nn.Module:
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    return Wav2Vec2Model(Wav2Vec2Config(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, conv_dim=(16, 16),
        conv_stride=(5, 4), conv_kernel=(10, 4), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
        vocab_size=VOCAB, do_stable_layer_norm=True, feat_extract_norm="layer",
    ))


def _whisper() -> nn.Module:
    from transformers import WhisperConfig, WhisperModel

    class Whisper(WhisperModel):
        def forward(self, input_features: torch.Tensor, decoder_input_ids: torch.Tensor) -> Any:  # type: ignore[override]
            return super().forward(input_features=input_features, decoder_input_ids=decoder_input_ids, use_cache=False)

    return Whisper(WhisperConfig(
        d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=8, max_source_positions=16, max_target_positions=16,
        vocab_size=VOCAB, pad_token_id=0, bos_token_id=0, eos_token_id=0, decoder_start_token_id=0,
    ))


def _t5() -> nn.Module:
    from transformers import T5Config, T5Model

    class T5(T5Model):
        def forward(self, input_ids: torch.Tensor, decoder_input_ids: torch.Tensor) -> Any:  # type: ignore[override]
            return super().forward(input_ids=input_ids, decoder_input_ids=decoder_input_ids, use_cache=False)

    return T5(T5Config(
        d_model=32, d_kv=16, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=2, vocab_size=VOCAB,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=0,
    ))


def _clip() -> nn.Module:
    from transformers import CLIPConfig, CLIPModel

    return CLIPModel(CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "vocab_size": VOCAB, "max_position_embeddings": 16},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 16, "patch_size": 8},
        projection_dim=16,
    ))


def _unet() -> nn.Module:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )


class _Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.c_attn, self.c_proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.c_fc, self.mlp_proj = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, steps, width = x.shape
        q, k, v = (
            t.view(batch, steps, self.heads, width // self.heads).transpose(1, 2)  # [B, heads, T, width / heads]
            for t in self.c_attn(self.ln_1(x)).split(width, dim=2)
        )
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(y.transpose(1, 2).contiguous().view(batch, steps, width))
        return x + self.mlp_proj(nn.functional.gelu(self.c_fc(self.ln_2(x))))


class NanoGPT(nn.Module):
    """nanoGPT's habits: prints in ``__init__``, ties ``lm_head`` to the token embedding, returns ``(logits, None)``."""

    def __init__(self, width: int = 32, layers: int = 1, heads: int = 2, block_size: int = 16) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(VOCAB, width), nn.Embedding(block_size, width)
        self.h = nn.ModuleList(_Block(width, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, VOCAB, bias=False)
        self.wte.weight = self.lm_head.weight
        print(f"number of parameters: {sum(p.numel() for p in self.parameters()) / 1e6:.2f}M")

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x)), None


def _ids(length: int) -> InputSpec:
    return InputSpec((length,), torch.int64, 0, VOCAB)


ZOO: dict[str, Entry] = {
    "nanogpt": Entry(_seeded(NanoGPT), (_ids(8),)),
    "bert": Entry(_seeded(_bert), (_ids(8),)),
    "gpt2": Entry(_seeded(_gpt2), (_ids(8),)),
    "llama": Entry(_seeded(_llama(tied=False)), (_ids(8),)),
    "llama_tied": Entry(_seeded(_llama(tied=True)), (_ids(8),)),
    "llama_bn": Entry(_seeded(_llama(tied=False)), (_ids(8),), {"batch_norm": True, "allow_new_bias": True}),
    "vit": Entry(_seeded(_vit), (InputSpec((3, 16, 16)),)),
    "wav2vec2": Entry(_seeded(_wav2vec2), (InputSpec((400,)),)),
    "whisper": Entry(_seeded(_whisper), (InputSpec((8, 32)), _ids(4)), {"exclude": ["*conv*"]}),
    "t5": Entry(_seeded(_t5), (_ids(8), _ids(4)), onnx="the torch ONNX exporter cannot trace T5's plain model"),
    "clip": Entry(_seeded(_clip), (_ids(8), InputSpec((3, 16, 16)))),
    "unet": Entry(
        _seeded(_unet), (InputSpec((4, 8, 8)), InputSpec((), torch.int64, 0, 1000), InputSpec((4, 32)))
    ),
}


def expanded(name: str) -> nn.Module:
    """The EP model of ``name`` (seeded: the same layers every call)."""
    entry = ZOO[name]
    torch.manual_seed(1)
    return epcli.overparameterize(entry.plain(), depth=2, **entry.options)


def __getattr__(attribute: str) -> Callable[[], nn.Module]:
    """``ep_<name>`` and ``plain_<name>``: the factories the command line names."""
    kind, _, name = attribute.partition("_")
    if name in ZOO and kind == "ep":
        return lambda: expanded(name)
    if name in ZOO and kind == "plain":
        return ZOO[name].plain
    raise AttributeError(attribute)

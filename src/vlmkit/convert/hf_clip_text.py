"""CLIP / SigLIP text towers (`text_model.` inside CLIPModel / SiglipModel) <-> vlmkit TextEncoder.

Both are pre-norm transformers with learned positions; CLIP's attention is causal, SigLIP's
is not.
"""
from __future__ import annotations

from typing import Any

from vlmkit.config import ConfigError, TextConfig
from vlmkit.convert.hf_clip_layout import encoder_rules, kind_of
from vlmkit.convert.hf_io import ConversionError
from vlmkit.convert.keymap import ACTS_TO_HF, Rule, act_from_hf, pair, weight_bias

# transformers' defaults (configuration_clip.py / configuration_siglip.py), as for the vision tower.
TEXT_DEFAULTS: dict[str, dict[str, Any]] = {
    "clip": dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                 num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu",
                 layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=49406, eos_token_id=49407),
    "siglip": dict(vocab_size=32000, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12, max_position_embeddings=64, hidden_act="gelu_pytorch_tanh",
                   layer_norm_eps=1e-6, projection_size=None),
}


def text_config_from_hf(hf_text: dict, model_type: str) -> TextConfig:
    """A CLIP or SigLIP text config (missing keys take transformers' defaults) -> TextConfig."""
    kind = kind_of(model_type)
    hf = {**TEXT_DEFAULTS[kind], **hf_text}
    try:
        return TextConfig(
            vocab_size=hf["vocab_size"], width=hf["hidden_size"], depth=hf["num_hidden_layers"],
            heads=hf["num_attention_heads"], mlp_dim=hf["intermediate_size"],
            max_positions=hf["max_position_embeddings"], type_vocab_size=0,
            act=act_from_hf(hf["hidden_act"], "text_config.hidden_act"),
            norm_eps=float(hf["layer_norm_eps"]), max_length=hf["max_position_embeddings"],
            layout="pre_norm", causal=kind == "clip",
            # SigLIP is trained on fixed-length text whose padding is attended to (see TextConfig).
            mask_padding=kind == "clip",
        )
    except ConfigError as e:
        raise ConversionError(f"{kind} text_config: {e}") from None


def text_config_to_hf(cfg: TextConfig) -> dict:
    """TextConfig -> a CLIPTextConfig dict (the tower alone; export writes CLIP only)."""
    return {"model_type": "clip_text_model", "vocab_size": cfg.vocab_size, "hidden_size": cfg.width,
            "intermediate_size": cfg.mlp_dim, "num_hidden_layers": cfg.depth, "num_attention_heads": cfg.heads,
            "max_position_embeddings": cfg.max_positions, "hidden_act": ACTS_TO_HF[cfg.act],
            "layer_norm_eps": cfg.norm_eps}


def text_rules(cfg: TextConfig) -> list[Rule]:
    """The tower's tensors, keys relative to `text_model.` / `text.`."""
    D = cfg.width
    return ([pair("word_embed.weight", "embeddings.token_embedding.weight", (cfg.vocab_size, D)),
             pair("pos_embed.weight", "embeddings.position_embedding.weight", (cfg.max_positions, D))]
            + encoder_rules(cfg.depth, D, cfg.mlp_dim) + weight_bias("norm", "final_layer_norm", (D,)))

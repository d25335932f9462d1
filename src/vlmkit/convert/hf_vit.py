"""Hugging Face `ViTModel` (google/vit layout) <-> vlmkit VisionTransformer.

vlmkit's own towers (a class token, no pre-norm, biased patch embedding, pre-norm blocks,
a final LayerNorm) have exactly the layout of the original ViT, so this is the format a
vlmkit-trained vision tower is exported in when it is not CLIP- or SigLIP-shaped;
`LlavaForConditionalGeneration` builds any vision tower through `AutoModel`, ViT included.

Keys are those `save_pretrained` writes (`encoder.layer.{i}.attention.attention.query`...),
which is also what `from_pretrained` reads.
"""
from __future__ import annotations

import torch

from vlmkit.config import VisionConfig
from vlmkit.convert.hf_io import ConversionError
from vlmkit.convert.keymap import (ACTS_TO_HF, Rule, act_from_hf, block_rules, pair, prefixed, to_ours, to_theirs,
                                   weight_bias)

_BLOCK_NAMES = {"q": "attention.attention.query", "k": "attention.attention.key", "v": "attention.attention.value",
                "attn.out": "attention.output.dense", "norm1": "layernorm_before", "norm2": "layernorm_after",
                "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}
_UNUSED = ("pooler.dense.weight", "pooler.dense.bias")  # ViTModel's tanh pooler; LLaVA never calls it


def vit_config_from_hf(hf: dict) -> VisionConfig:
    size, patch = hf.get("image_size", 224), hf.get("patch_size", 16)
    if not isinstance(size, int) or not isinstance(patch, int):
        raise ConversionError(f"ViT image_size {size!r} / patch_size {patch!r}: only square sizes are supported")
    return VisionConfig(
        image_size=size, patch_size=patch, channels=hf.get("num_channels", 3),
        width=hf.get("hidden_size", 768), depth=hf.get("num_hidden_layers", 12),
        heads=hf.get("num_attention_heads", 12), mlp_dim=hf.get("intermediate_size", 3072),
        class_token=True, norm_pre=False, patch_bias=True,
        act=act_from_hf(hf.get("hidden_act", "gelu"), "vision_config.hidden_act"),
        norm_eps=hf.get("layer_norm_eps", 1e-12),
    )


def vit_config_to_hf(cfg: VisionConfig) -> dict:
    if not cfg.class_token or cfg.norm_pre or not cfg.patch_bias:
        raise ConversionError("a ViT-layout export needs vision.class_token=true, norm_pre=false, patch_bias=true; "
                              f"this tower has class_token={cfg.class_token}, norm_pre={cfg.norm_pre}, "
                              f"patch_bias={cfg.patch_bias}")
    return {"model_type": "vit", "image_size": cfg.image_size, "patch_size": cfg.patch_size,
            "num_channels": cfg.channels, "hidden_size": cfg.width, "num_hidden_layers": cfg.depth,
            "num_attention_heads": cfg.heads, "intermediate_size": cfg.mlp_dim,
            "hidden_act": ACTS_TO_HF[cfg.act], "layer_norm_eps": cfg.norm_eps, "qkv_bias": True}


def _rules(cfg: VisionConfig) -> list[Rule]:
    """qkv_bias=false checkpoints leave the Q/K/V biases out: vlmkit's attention always has one,
    and zero is the same function."""
    D, C, p, N = cfg.width, cfg.channels, cfg.patch_size, cfg.grid ** 2
    return ([pair("class_token", "embeddings.cls_token", (1, 1, D)),
             pair("pos_embed", "embeddings.position_embeddings", (1, N + 1, D)),
             *weight_bias("patch_embed", "embeddings.patch_embeddings.projection", (D, C, p, p))]
            + block_rules(cfg.depth, "encoder.layer", _BLOCK_NAMES, D, cfg.mlp_dim, optional_qkv_bias=True)
            + weight_bias("norm", "layernorm", (D,)))


def map_vit_state(src: dict[str, torch.Tensor], cfg: VisionConfig, prefix: str = "") -> dict[str, torch.Tensor]:
    """HF ViT tensors under `prefix` -> VisionTransformer keys, popped from `src`."""
    out = to_ours(prefixed(_rules(cfg), theirs=prefix), src, "ViT")
    for key in _UNUSED:
        src.pop(prefix + key, None)
    return out


def vit_state_to_hf(state: dict[str, torch.Tensor], cfg: VisionConfig, prefix: str = "") -> dict[str, torch.Tensor]:
    """VisionTransformer state -> HF ViTModel tensors under `prefix` (the unused pooler as zeros)."""
    out = to_theirs(prefixed(_rules(cfg), theirs=prefix), state, "VisionTransformer")
    # Written so `from_pretrained` reports no missing keys; LLaVA reads hidden states, not the pooler.
    out[prefix + "pooler.dense.weight"] = torch.zeros(cfg.width, cfg.width)
    out[prefix + "pooler.dense.bias"] = torch.zeros(cfg.width)
    return out

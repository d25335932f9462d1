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

ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "quick_gelu": "quick_gelu"}
_EXPORT_ACT = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "quick_gelu": "quick_gelu"}
_UNUSED = ("pooler.dense.weight", "pooler.dense.bias")  # ViTModel's tanh pooler; LLaVA never calls it


def vit_config_from_hf(hf: dict) -> VisionConfig:
    act = hf.get("hidden_act", "gelu")
    if act not in ACTIVATIONS:
        raise ConversionError(f"ViT hidden_act {act!r} is not supported; supported: {sorted(ACTIVATIONS)}")
    size, patch = hf.get("image_size", 224), hf.get("patch_size", 16)
    if not isinstance(size, int) or not isinstance(patch, int):
        raise ConversionError(f"ViT image_size {size!r} / patch_size {patch!r}: only square sizes are supported")
    return VisionConfig(
        image_size=size, patch_size=patch, channels=hf.get("num_channels", 3),
        width=hf.get("hidden_size", 768), depth=hf.get("num_hidden_layers", 12),
        heads=hf.get("num_attention_heads", 12), mlp_dim=hf.get("intermediate_size", 3072),
        class_token=True, norm_pre=False, patch_bias=True, act=ACTIVATIONS[act],
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
            "hidden_act": _EXPORT_ACT[cfg.act], "layer_norm_eps": cfg.norm_eps, "qkv_bias": True}


def _pairs(cfg: VisionConfig):
    """(vlmkit key, HF key) for every tensor but the fused Q/K/V."""
    yield "class_token", "embeddings.cls_token"
    yield "pos_embed", "embeddings.position_embeddings"
    yield "patch_embed.weight", "embeddings.patch_embeddings.projection.weight"
    yield "patch_embed.bias", "embeddings.patch_embeddings.projection.bias"
    for i in range(cfg.depth):
        s, d = f"encoder.layer.{i}.", f"blocks.{i}."
        for part in ("weight", "bias"):
            yield d + f"norm1.{part}", s + f"layernorm_before.{part}"
            yield d + f"attn.out.{part}", s + f"attention.output.dense.{part}"
            yield d + f"norm2.{part}", s + f"layernorm_after.{part}"
            yield d + f"mlp.fc1.{part}", s + f"intermediate.dense.{part}"
            yield d + f"mlp.fc2.{part}", s + f"output.dense.{part}"
    yield "norm.weight", "layernorm.weight"
    yield "norm.bias", "layernorm.bias"


def map_vit_state(src: dict[str, torch.Tensor], cfg: VisionConfig, prefix: str = "") -> dict[str, torch.Tensor]:
    """HF ViT tensors under `prefix` -> VisionTransformer keys, popped from `src`."""
    def take(key: str) -> torch.Tensor:
        try:
            return src.pop(prefix + key)
        except KeyError:
            raise ConversionError(f"ViT checkpoint is missing tensor {prefix + key}") from None

    out = {ours: take(theirs) for ours, theirs in _pairs(cfg)}
    for i in range(cfg.depth):
        s = f"encoder.layer.{i}.attention.attention."
        out[f"blocks.{i}.attn.qkv.weight"] = torch.cat([take(s + f"{n}.weight") for n in ("query", "key", "value")])
        if prefix + s + "query.bias" in src:
            out[f"blocks.{i}.attn.qkv.bias"] = torch.cat([take(s + f"{n}.bias") for n in ("query", "key", "value")])
        else:  # qkv_bias=false: vlmkit's attention always has a bias, and zero is the same function
            out[f"blocks.{i}.attn.qkv.bias"] = torch.zeros(3 * cfg.width)
    for key in _UNUSED:
        src.pop(prefix + key, None)
    return out


def vit_state_to_hf(state: dict[str, torch.Tensor], cfg: VisionConfig, prefix: str = "") -> dict[str, torch.Tensor]:
    """VisionTransformer state -> HF ViTModel tensors under `prefix` (the unused pooler as zeros)."""
    out = {prefix + theirs: state[ours] for ours, theirs in _pairs(cfg)}
    for i in range(cfg.depth):
        s = prefix + f"encoder.layer.{i}.attention.attention."
        for part in ("weight", "bias"):
            for name, chunk in zip(("query", "key", "value"), state[f"blocks.{i}.attn.qkv.{part}"].chunk(3)):
                out[s + f"{name}.{part}"] = chunk
    # Written so `from_pretrained` reports no missing keys; LLaVA reads hidden states, not the pooler.
    out[prefix + "pooler.dense.weight"] = torch.zeros(cfg.width, cfg.width)
    out[prefix + "pooler.dense.bias"] = torch.zeros(cfg.width)
    return out

"""CLIP / SigLIP vision towers (`CLIPVisionModel`, `SiglipVisionModel`, and the towers inside
CLIPModel, SiglipModel and LLaVA) <-> vlmkit VisionTransformer.

CLIP's tower has a class token, a LayerNorm before the blocks (`pre_layrnorm`) and no
patch-embedding bias; SigLIP's has none of the first two and does have the bias. Keys are
taken relative to a prefix (`vision_model.` in CLIPModel / SiglipModel and in a standalone
tower). SigLIP's pooling head (`head.*`) is a dual-encoder part (`hf_clip`), not read here.
"""
from __future__ import annotations

from typing import Any

import torch

from vlmkit.config import ConfigError, VisionConfig
from vlmkit.convert.hf_clip_layout import ARCHITECTURES, encoder_rules, kind_of
from vlmkit.convert.hf_io import ConversionError
from vlmkit.convert.keymap import ACTS_TO_HF, Rule, act_from_hf, pair, prefixed, take, to_ours, to_theirs, weight_bias

# transformers' defaults (configuration_clip.py / configuration_siglip.py): a config.json
# saved by transformers omits keys that equal them, so a missing key means this value.
VISION_DEFAULTS: dict[str, dict[str, Any]] = {
    "clip": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 num_channels=3, image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5),
    "siglip": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   num_channels=3, image_size=224, patch_size=16, hidden_act="gelu_pytorch_tanh",
                   layer_norm_eps=1e-6, vision_use_head=True),
}


def _square(value: Any, name: str) -> int:
    """HF allows [h, w] sizes; vlmkit towers are square."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ConversionError(f"vision_config.{name} {list(value)} is not square; only square sizes are supported")
        value = value[0]
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConversionError(f"vision_config.{name} {value!r} is not an integer")
    return value


def vision_config_from_hf(hf_vision: dict, model_type: str) -> VisionConfig:
    """A CLIP or SigLIP vision config (missing keys take transformers' defaults) -> VisionConfig.

    `model_type` is "clip" / "siglip" or the sub-config's "clip_vision_model" /
    "siglip_vision_model".
    """
    kind = kind_of(model_type)
    hf = {**VISION_DEFAULTS[kind], **hf_vision}
    try:
        return VisionConfig(
            image_size=_square(hf["image_size"], "image_size"), patch_size=_square(hf["patch_size"], "patch_size"),
            channels=hf["num_channels"], width=hf["hidden_size"], depth=hf["num_hidden_layers"],
            heads=hf["num_attention_heads"], mlp_dim=hf["intermediate_size"],
            class_token=kind == "clip", norm_pre=kind == "clip", patch_bias=kind == "siglip",
            act=act_from_hf(hf["hidden_act"], "vision_config.hidden_act"), norm_eps=float(hf["layer_norm_eps"]),
        )
    except ConfigError as e:
        raise ConversionError(f"{kind} vision_config: {e}") from None


def vision_config_to_hf(cfg: VisionConfig, model_type: str) -> dict:
    """VisionConfig -> a CLIPVisionConfig / SiglipVisionConfig dict (the tower alone).

    A SigLIP config leaves `vision_use_head` at transformers' default (True); set it to False
    where no pooling head is written.
    """
    kind = kind_of(model_type)
    _check_vision_layout(cfg, kind, exporting=True)
    return {"model_type": f"{kind}_vision_model", "hidden_size": cfg.width, "intermediate_size": cfg.mlp_dim,
            "num_hidden_layers": cfg.depth, "num_attention_heads": cfg.heads, "num_channels": cfg.channels,
            "image_size": cfg.image_size, "patch_size": cfg.patch_size, "hidden_act": ACTS_TO_HF[cfg.act],
            "layer_norm_eps": cfg.norm_eps}


def _check_vision_layout(cfg: VisionConfig, kind: str, exporting: bool) -> None:
    """The fields that keep a tower out of `kind`'s layout -> ConversionError naming them.

    On export a patch-embedding bias is no obstacle for CLIP (it is folded into the position
    embeddings) nor its absence for SigLIP (a zero bias is written).
    """
    want = {"class_token": kind == "clip", "norm_pre": kind == "clip"}
    if not exporting:
        want["patch_bias"] = kind == "siglip"
    wrong = [f"vision.{k} = {str(getattr(cfg, k)).lower()}" for k, v in want.items() if getattr(cfg, k) != v]
    if wrong:
        layout = ("CLIP's vision tower has a class token and a LayerNorm before the blocks (pre_layrnorm)"
                  if kind == "clip" else "SigLIP's vision tower has no class token and no LayerNorm before the blocks")
        raise ConversionError(f"{', '.join(wrong)} does not fit the {kind} layout: {layout}")


def _rules(cfg: VisionConfig, kind: str) -> list[Rule]:
    """A tower in exactly `kind`'s layout."""
    D, C, p, N = cfg.width, cfg.channels, cfg.patch_size, cfg.grid ** 2
    rules = [pair("patch_embed.weight", "embeddings.patch_embedding.weight", (D, C, p, p))]
    if kind == "clip":
        rules += [pair("class_token", "embeddings.class_embedding", (D,), (1, 1, D)),
                  pair("pos_embed", "embeddings.position_embedding.weight", (N + 1, D), (1, N + 1, D)),
                  *weight_bias("norm_pre", "pre_layrnorm", (D,))]
    else:
        rules += [pair("patch_embed.bias", "embeddings.patch_embedding.bias", (D,)),
                  pair("pos_embed", "embeddings.position_embedding.weight", (N, D), (1, N, D))]
    return rules + encoder_rules(cfg.depth, D, cfg.mlp_dim) + weight_bias("norm", "post_layernorm", (D,))


def map_vision_state(src: dict[str, torch.Tensor], cfg: VisionConfig, prefix: str,
                     model_type: str) -> dict[str, torch.Tensor]:
    """HF vision-tower tensors under `prefix` (e.g. "vision_model.") -> VisionTransformer keys.

    Pops what it uses from `src` (and the unused `embeddings.position_ids` buffer), so the
    caller can check what is left. SigLIP's pooling head (`{prefix}head.*`) is left in `src`.
    """
    kind = kind_of(model_type)
    _check_vision_layout(cfg, kind, exporting=False)
    src.pop(prefix + "embeddings.position_ids", None)
    return to_ours(prefixed(_rules(cfg, kind), theirs=prefix), src, ARCHITECTURES[kind])


def vision_state_to_hf(state: dict[str, torch.Tensor], cfg: VisionConfig, prefix: str,
                       model_type: str) -> dict[str, torch.Tensor]:
    """VisionTransformer tensors -> HF vision-tower tensors under `prefix` (inverse of map_vision_state).

    CLIP has no patch-embedding bias: conv(x) + b + pos equals conv_nobias(x) + (pos + b) at
    every patch position, so b is folded into the patch positions (not the class position).
    SigLIP always has one: a tower without it gets a zero bias. Both are exact.
    """
    kind = kind_of(model_type)
    _check_vision_layout(cfg, kind, exporting=True)
    state = dict(state)
    if kind == "clip" and cfg.patch_bias:
        bias = take(state, "patch_embed.bias", (cfg.width,), "VisionTransformer")
        pos = state["pos_embed"].clone()
        pos[:, 1:] += bias  # index 0 is the class token's position: the conv never touches it
        state["pos_embed"] = pos
    elif kind == "siglip" and not cfg.patch_bias:
        state["patch_embed.bias"] = state["patch_embed.weight"].new_zeros(cfg.width)
    return to_theirs(prefixed(_rules(cfg, kind), theirs=prefix), state, "VisionTransformer")

"""CLIP and SigLIP (Hugging Face): the model types that name their two layouts, and the
encoder layers both towers share (`encoder.layers.i`, with Q, K and V kept apart)."""
from __future__ import annotations

from vlmkit.convert.hf_io import ConversionError
from vlmkit.convert.keymap import Rule, block_rules

SUPPORTED_MODEL_TYPES = ("clip", "siglip")
# Sub-config model types (what LLaVA's vision_config says) name the same layouts.
_MODEL_TYPE_ALIASES = {"clip_vision_model": "clip", "clip_text_model": "clip",
                       "siglip_vision_model": "siglip", "siglip_text_model": "siglip"}
ARCHITECTURES = {"clip": "CLIPModel", "siglip": "SiglipModel"}
_BLOCK_NAMES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                "attn.out": "self_attn.out_proj", "norm1": "layer_norm1", "norm2": "layer_norm2",
                "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}


def kind_of(model_type: str) -> str:
    """"clip" or "siglip": the layout a model type or sub-config model type names."""
    kind = _MODEL_TYPE_ALIASES.get(model_type, model_type)
    if kind not in SUPPORTED_MODEL_TYPES:
        raise ConversionError(f"model_type {model_type!r} is not supported; supported: "
                              f"{', '.join(SUPPORTED_MODEL_TYPES)} (or {', '.join(_MODEL_TYPE_ALIASES)})")
    return kind


def encoder_rules(depth: int, width: int, mlp_dim: int) -> list[Rule]:
    """HF `encoder.layers.i` (CLIP and SigLIP name them alike) <-> vlmkit `blocks.i`."""
    return block_rules(depth, "encoder.layers", _BLOCK_NAMES, width, mlp_dim)

"""Hugging Face CLIP / SigLIP (`CLIPModel`, `SiglipModel`) <-> vlmkit DualEncoder.

Import reads `clip` and `siglip` directories into a DualEncoder config, state dict,
tokenizer and image transform; export writes a CLIP-shaped DualEncoder as a `CLIPModel`
directory. The two towers are mapped by `hf_clip_vision` and `hf_clip_text` (LLaVA reuses
the vision tower); this module adds what joins them: the projections, SigLIP's attention-
pooling head, the logit scale and bias, and the side files.

HF key prefixes: the towers sit under `vision_model.` and `text_model.`, SigLIP's pooling
head under `vision_model.head.` (vlmkit `vision_head.`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vlmkit.config import ConfigError, DualEncoderConfig
from vlmkit.convert import hf_io
from vlmkit.convert.hf_clip_layout import ARCHITECTURES, SUPPORTED_MODEL_TYPES, kind_of
from vlmkit.convert.hf_clip_text import TEXT_DEFAULTS, text_config_from_hf, text_config_to_hf, text_rules
from vlmkit.convert.hf_clip_vision import (VISION_DEFAULTS, map_vision_state, vision_config_from_hf,
                                           vision_config_to_hf, vision_state_to_hf)
from vlmkit.convert.hf_io import ConversionError
from vlmkit.convert.keymap import Rule, check, pair, prefixed, reject_unexpected, to_ours, to_theirs, weight_bias

# transformers' defaults for the top-level config (the towers' are in their modules).
MODEL_DEFAULTS: dict[str, dict[str, Any]] = {"clip": dict(projection_dim=512, logit_scale_init_value=2.6592),
                                             "siglip": dict()}


# ----------------------------------------------------------------------------- key rules
def _rules(cfg: DualEncoderConfig, kind: str) -> list[Rule]:
    """Every CLIPModel / SiglipModel tensor but the vision tower's, prefixes included."""
    v, t, E = cfg.vision, cfg.text, cfg.embed_dim
    rules = prefixed(text_rules(t), "text.", "text_model.")
    if kind == "clip":
        return rules + [pair("vision_proj.weight", "visual_projection.weight", (E, v.width)),
                        pair("text_proj.weight", "text_projection.weight", (E, t.width)),
                        pair("logit_scale", "logit_scale", ())]
    D, M = v.width, v.mlp_dim
    head = [pair("probe", "probe", (1, 1, D)),
            pair("qkv.weight", "attention.in_proj_weight", (3 * D, D)),
            pair("qkv.bias", "attention.in_proj_bias", (3 * D,)),
            *weight_bias("out", "attention.out_proj", (D, D)), *weight_bias("norm", "layernorm", (D,)),
            *weight_bias("mlp.fc1", "mlp.fc1", (M, D)), *weight_bias("mlp.fc2", "mlp.fc2", (D, M))]
    return rules + prefixed(head, "vision_head.", "vision_model.head.") + [
        *weight_bias("text_proj", "text_model.head", (E, t.width)),
        pair("logit_scale", "logit_scale", (1,), ()),
        pair("logit_bias", "logit_bias", (1,), ()),
    ]


# ----------------------------------------------------------------------------- dual encoder config
def _sub_config(hf: dict, part: str, defaults: dict[str, Any]) -> dict:
    """text_config / vision_config with transformers' defaults filled in.

    Old CLIP config files also carry `text_config_dict` / `vision_config_dict`, which
    transformers lets win over `text_config` / `vision_config`; so do we.
    """
    sub = {**(hf.get(f"{part}_config") or {}), **(hf.get(f"{part}_config_dict") or {})}
    return {**defaults, **sub}


def dual_encoder_config_from_hf(hf: dict, logit_scale: float | None = None,
                                logit_bias: float | None = None) -> DualEncoderConfig:
    """A CLIPModel / SiglipModel config.json -> DualEncoderConfig.

    `logit_scale` (the checkpoint's value) sets init_logit_scale and lifts max_logit_scale
    to it: transformers does not clamp at inference, so the imported value must not be.
    """
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConversionError(f"model_type {model_type!r} is not a dual encoder this converter reads; "
                              f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    kind = model_type
    hv, ht = _sub_config(hf, "vision", VISION_DEFAULTS[kind]), _sub_config(hf, "text", TEXT_DEFAULTS[kind])
    vision, text = vision_config_from_hf(hv, kind), text_config_from_hf(ht, kind)
    top = {**MODEL_DEFAULTS[kind], **hf}
    defaults = DualEncoderConfig()
    if logit_scale is None:
        logit_scale = float(top.get("logit_scale_init_value", defaults.init_logit_scale))
    options: dict[str, Any] = dict(
        init_logit_scale=logit_scale, max_logit_scale=max(defaults.max_logit_scale, logit_scale))
    if kind == "clip":
        options.update(embed_dim=top["projection_dim"], vision_pool="cls", text_pool="eos", loss="infonce")
    else:
        if not hv["vision_use_head"]:
            raise ConversionError("vision_config.vision_use_head = false: this SigLIP has no pooling head, so "
                                  "it gives no image embedding; only its vision tower can be used "
                                  "(map_vision_state)")
        projection = ht.get("projection_size") or ht["hidden_size"]
        if projection != vision.width:
            raise ConversionError(f"text_config.projection_size {projection} differs from vision_config.hidden_size "
                                  f"{vision.width}: SigLIP compares the two embeddings directly")
        options.update(embed_dim=projection, vision_pool="map", text_pool="last", text_proj_bias=True,
                       loss="siglip")
        if logit_bias is not None:
            options["init_logit_bias"] = logit_bias
    try:
        return DualEncoderConfig(vision=vision, text=text, **options)
    except ConfigError as e:
        raise ConversionError(f"{kind} config: {e}") from None


# ----------------------------------------------------------------------------- import
def load_hf_dual_encoder(path: str | Path):
    """Read a CLIPModel / SiglipModel directory.

    Returns (DualEncoderConfig, DualEncoder state dict, Tokenizer or None, ImageTransform or
    None): the tokenizer when the directory has a `tokenizer.json` (SigLIP's SentencePiece
    `spiece.model` alone is not read), the transform when it has `preprocessor_config.json`.
    """
    path = hf_io.resolve_source(path)
    hf = hf_io.read_config(path)
    kind = hf.get("model_type")
    if kind not in SUPPORTED_MODEL_TYPES:
        raise ConversionError(f"{path}: model_type {kind!r} is not a dual encoder this converter reads; "
                              f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    dual_encoder_config_from_hf(hf)  # a config we cannot map fails before any weights are read
    weights = hf_io.read_weights(path)
    scale, bias = weights.get("logit_scale"), weights.get("logit_bias")
    cfg = dual_encoder_config_from_hf(hf, _scalar(scale), _scalar(bias))
    state = map_dual_encoder_state(weights, cfg, kind)
    return cfg, state, _tokenizer(path, kind), _transform(path)


def _scalar(tensor: torch.Tensor | None) -> float | None:
    return float(tensor.reshape(-1)[0]) if tensor is not None and tensor.numel() == 1 else None


def map_dual_encoder_state(weights: dict[str, torch.Tensor], cfg: DualEncoderConfig,
                           model_type: str) -> dict[str, torch.Tensor]:
    """Every CLIPModel / SiglipModel tensor -> DualEncoder state; leftovers are an error."""
    kind = kind_of(model_type)
    src = dict(weights)
    state = {f"vision.{k}": v for k, v in map_vision_state(src, cfg.vision, "vision_model.", kind).items()}
    state.update(to_ours(_rules(cfg, kind), src, ARCHITECTURES[kind]))
    src.pop("text_model.embeddings.position_ids", None)  # a buffer older transformers saved; nothing learned
    reject_unexpected(src, ARCHITECTURES[kind])
    return state


def _tokenizer(path: Path, kind: str):
    if not (path / "tokenizer.json").is_file():
        return None
    from vlmkit.data.tokenizer import Tokenizer

    try:
        tokenizer = Tokenizer.from_pretrained(path)
    except ValueError as e:
        raise ConversionError(f"{path}: tokenizer not usable ({e})") from None
    # SigLIP was trained on texts padded to the full length and pools the last position.
    tokenizer.pad_to_max_length = kind == "siglip"
    return tokenizer


def _transform(path: Path):
    preprocessor = hf_io.read_image_processor(path)
    if preprocessor is None:
        return None
    from vlmkit.convert.hf_processor import image_transform_from_hf

    return image_transform_from_hf(preprocessor)


def import_hf_dual_encoder(path: str | Path, out_dir: str | Path) -> Path:
    """Convert a CLIPModel / SiglipModel directory into a vlmkit checkpoint directory."""
    from vlmkit.checkpoint import load_model, save_checkpoint
    from vlmkit.models.dual_encoder import DualEncoder

    cfg, state, tokenizer, transform = load_hf_dual_encoder(path)
    model = DualEncoder(cfg)
    check(state, model.state_dict(), "DualEncoder")
    model.load_state_dict(state)
    out = save_checkpoint(out_dir, model, "dual_encoder", cfg.to_dict(), tokenizer,
                          preprocessor=transform.to_dict() if transform is not None else None)
    load_model(out)  # the written weights load strictly into the model the config describes
    return out


# ----------------------------------------------------------------------------- export
def clip_blockers(cfg: DualEncoderConfig) -> list[str]:
    """Why a DualEncoder is not a CLIPModel: one line per blocking field (empty: exportable)."""
    t = cfg.text
    checks = [
        (cfg.vision.class_token, "vision.class_token = false (CLIP pools a class token)"),
        (cfg.vision.norm_pre, "vision.norm_pre = false (CLIP normalises the embeddings before the blocks)"),
        (cfg.vision_pool == "cls", f"vision_pool = {cfg.vision_pool!r} (CLIP pools the class token: 'cls')"),
        (t.layout == "pre_norm", f"text.layout = {t.layout!r} (CLIP's text tower is 'pre_norm')"),
        (t.causal, "text.causal = false (CLIP's text attention is causal)"),
        (t.mask_padding, "text.mask_padding = false (CLIP masks the padding)"),
        (cfg.text_pool == "eos", f"text_pool = {cfg.text_pool!r} (CLIP pools the EOS token: 'eos')"),
        (not cfg.text_proj_bias, "text_proj_bias = true (CLIP's projections have no bias)"),
        (cfg.loss != "siglip", "loss = 'siglip' (its logit_bias has no place in CLIPModel)"),
    ]
    return [message for ok, message in checks if not ok]


def save_hf_clip(model_or_checkpoint_dir, out_dir: str | Path, tokenizer=None,
                 eos_token_id: int | None = None) -> Path:
    """Write a CLIP-shaped DualEncoder (or vlmkit checkpoint directory) as a CLIPModel directory.

    CLIPModel pools the text at `text_config.eos_token_id`, so that id must be known: from
    `tokenizer` (or the checkpoint's), or given as `eos_token_id`. A logit scale above
    max_logit_scale is written clamped, as vlmkit uses it (transformers does not clamp).
    """
    model, tokenizer, transform = _export_source(model_or_checkpoint_dir, tokenizer)
    cfg: DualEncoderConfig = model.cfg
    blockers = clip_blockers(cfg)
    if blockers:
        raise ConversionError("this DualEncoder is not CLIP-shaped: " + "; ".join(blockers))
    if tokenizer is not None:
        eos_token_id = tokenizer.sep_id if eos_token_id is None else eos_token_id
    if eos_token_id is None:
        raise ConversionError("CLIPModel pools the text at text_config.eos_token_id: give a tokenizer "
                              "or eos_token_id")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    scale = min(float(state["logit_scale"]), cfg.max_logit_scale)
    state["logit_scale"] = torch.tensor(scale, dtype=state["logit_scale"].dtype)
    vision = {k[len("vision."):]: state.pop(k) for k in [k for k in state if k.startswith("vision.")]}
    weights = vision_state_to_hf(vision, cfg.vision, "vision_model.", "clip")
    weights.update(to_theirs(_rules(cfg, "clip"), state, "DualEncoder"))
    config = _clip_config(cfg, scale, tokenizer, eos_token_id)
    side_files: dict[str, Any] = {}
    if tokenizer is not None:
        side_files["tokenizer.json"] = tokenizer.backend.to_str(pretty=True)
        side_files["tokenizer_config.json"] = _hf_tokenizer_config(tokenizer, cfg.text.max_positions)
    if transform is not None:
        from vlmkit.convert.hf_processor import image_processor_to_hf

        side_files["preprocessor_config.json"] = image_processor_to_hf(transform, "clip")
    return hf_io.write_dir(out_dir, config, weights, side_files)


def _export_source(source, tokenizer):
    """(model, tokenizer, ImageTransform or None) from a DualEncoder or a checkpoint directory."""
    if isinstance(source, torch.nn.Module):
        if not isinstance(getattr(source, "cfg", None), DualEncoderConfig):
            raise ConversionError(f"{type(source).__name__} is not a DualEncoder; only dual encoders "
                                  "export to CLIPModel")
        return source, tokenizer, None
    from vlmkit.data.images import ImageTransform
    from vlmkit.data.tokenizer import Tokenizer

    path = Path(source)
    model = hf_io.load_vlmkit(path, "dual_encoder")
    if tokenizer is None and (path / "tokenizer.json").is_file():
        tokenizer = Tokenizer.from_pretrained(path)
    transform = None
    if (path / "preprocessor.json").is_file():
        transform = ImageTransform.from_dict(hf_io.read_json(path, "preprocessor.json"))
    return model, tokenizer, transform


def _clip_config(cfg: DualEncoderConfig, logit_scale: float, tokenizer, eos_token_id: int) -> dict:
    t, E = cfg.text, cfg.embed_dim
    text = {**text_config_to_hf(t), "projection_dim": E, "eos_token_id": eos_token_id}
    if tokenizer is not None:
        text.update(bos_token_id=tokenizer.cls_id, pad_token_id=tokenizer.pad_id)
    vision = {**vision_config_to_hf(cfg.vision, "clip"), "projection_dim": E}
    return {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": E,
            "logit_scale_init_value": logit_scale, "text_config": text, "vision_config": vision,
            "dtype": "float32"}


def _hf_tokenizer_config(tokenizer, max_positions: int) -> dict:
    """transformers reads tokenizer.json as it is; the names tell it which ids are special."""
    names = tokenizer.special_tokens
    return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": names["cls_token"],
            "eos_token": names["sep_token"], "pad_token": names["pad_token"], "unk_token": names["unk_token"],
            "model_max_length": max_positions}

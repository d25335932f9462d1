"""Hugging Face CLIP / SigLIP (`CLIPModel`, `SiglipModel`) <-> vlmkit DualEncoder.

Import reads `clip` and `siglip` directories into a DualEncoder config, state dict,
tokenizer and image transform; export writes a CLIP-shaped DualEncoder as a `CLIPModel`
directory. The vision-tower pieces (`vision_config_from_hf`, `map_vision_state`,
`vision_state_to_hf`, `vision_config_to_hf`) are public because the LLaVA converter reuses
them for its CLIP or SigLIP tower.

Every tensor is described once, in a table of (HF key, vlmkit key, shapes) entries that both
directions read, so import and export cannot drift apart. Import checks each HF tensor's
shape against the config before using it, so an error names the HF key and both shapes.
HF keeps Q, K and V apart (`q_proj`, `k_proj`, `v_proj`); vlmkit fuses them (`attn.qkv`),
concatenated in q, k, v order.

HF key prefixes: `CLIPModel` / `SiglipModel` hold the towers under `vision_model.` and
`text_model.`; a standalone `CLIPVisionModel` / `SiglipVisionModel` also uses
`vision_model.`. SigLIP's pooling head (`vision_model.head.*`) is a dual-encoder part and is
not read by `map_vision_state`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vlmkit.config import ConfigError, DualEncoderConfig, TextConfig, VisionConfig
from vlmkit.convert import hf_io
from vlmkit.convert.hf_io import ConversionError

SUPPORTED_MODEL_TYPES = ("clip", "siglip")
# Sub-config model types (what LLaVA's vision_config says) name the same layouts.
_MODEL_TYPE_ALIASES = {"clip_vision_model": "clip", "clip_text_model": "clip",
                       "siglip_vision_model": "siglip", "siglip_text_model": "siglip"}
ACTS_FROM_HF = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_new": "gelu_tanh",
                "gelu_pytorch_tanh": "gelu_tanh"}
ACTS_TO_HF = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}
# Buffers that older transformers versions saved; they hold nothing learned.
IGNORED = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")

# transformers' defaults (configuration_clip.py / configuration_siglip.py): a config.json
# saved by transformers omits keys that equal them, so a missing key means this value.
HF_DEFAULTS: dict[tuple[str, str], dict[str, Any]] = {
    ("clip", "vision"): dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                             num_attention_heads=12, num_channels=3, image_size=224, patch_size=32,
                             hidden_act="quick_gelu", layer_norm_eps=1e-5),
    ("clip", "text"): dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                           num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu",
                           layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=49406, eos_token_id=49407),
    ("clip", "model"): dict(projection_dim=512, logit_scale_init_value=2.6592),
    ("siglip", "vision"): dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                               num_attention_heads=12, num_channels=3, image_size=224, patch_size=16,
                               hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, vision_use_head=True),
    ("siglip", "text"): dict(vocab_size=32000, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                             num_attention_heads=12, max_position_embeddings=64, hidden_act="gelu_pytorch_tanh",
                             layer_norm_eps=1e-6, projection_size=None),
    ("siglip", "model"): dict(),
}
_ARCHITECTURE = {"clip": "CLIPModel", "siglip": "SiglipModel"}


# ----------------------------------------------------------------------------- key tables
@dataclass(frozen=True)
class _Pair:
    """One HF tensor <-> one vlmkit tensor: the same numbers, shapes may differ by reshaping."""

    hf: str
    ours: str
    hf_shape: tuple[int, ...]
    our_shape: tuple[int, ...]


@dataclass(frozen=True)
class _Fused:
    """Several HF tensors (q, k, v) <-> one vlmkit tensor, concatenated along dim 0."""

    hf: tuple[str, ...]
    ours: str
    part_shape: tuple[int, ...]


def _same(hf: str, ours: str, shape: tuple[int, ...]) -> _Pair:
    return _Pair(hf, ours, shape, shape)


def _norm(hf: str, ours: str, width: int) -> list[_Pair]:
    return [_same(f"{hf}.{p}", f"{ours}.{p}", (width,)) for p in ("weight", "bias")]


def _prefixed(entries: list, hf_prefix: str, our_prefix: str) -> list:
    out = []
    for e in entries:
        if isinstance(e, _Fused):
            out.append(_Fused(tuple(hf_prefix + k for k in e.hf), our_prefix + e.ours, e.part_shape))
        else:
            out.append(_Pair(hf_prefix + e.hf, our_prefix + e.ours, e.hf_shape, e.our_shape))
    return out


def _block_entries(depth: int, width: int, mlp_dim: int) -> list:
    """HF `encoder.layers.i` (CLIP and SigLIP name them alike) <-> vlmkit `blocks.i`."""
    D, M = width, mlp_dim
    entries: list = []
    for i in range(depth):
        s, d = f"encoder.layers.{i}.", f"blocks.{i}."
        for part, shape in (("weight", (D, D)), ("bias", (D,))):
            entries.append(_Fused(tuple(f"{s}self_attn.{n}_proj.{part}" for n in "qkv"), f"{d}attn.qkv.{part}", shape))
        for hf, ours, weight in (("self_attn.out_proj", "attn.out", (D, D)), ("layer_norm1", "norm1", (D,)),
                                 ("layer_norm2", "norm2", (D,)), ("mlp.fc1", "mlp.fc1", (M, D)),
                                 ("mlp.fc2", "mlp.fc2", (D, M))):
            entries.append(_same(f"{s}{hf}.weight", f"{d}{ours}.weight", weight))
            entries.append(_same(f"{s}{hf}.bias", f"{d}{ours}.bias", (weight[0],)))
    return entries


def _vision_entries(cfg: VisionConfig, kind: str) -> list:
    """A tower in exactly `kind`'s layout (CLIP: class token, pre-norm, no patch bias)."""
    D, C, p, N = cfg.width, cfg.channels, cfg.patch_size, cfg.grid ** 2
    entries: list = [_same("embeddings.patch_embedding.weight", "patch_embed.weight", (D, C, p, p))]
    if kind == "clip":
        entries += [_Pair("embeddings.class_embedding", "class_token", (D,), (1, 1, D)),
                    _Pair("embeddings.position_embedding.weight", "pos_embed", (N + 1, D), (1, N + 1, D)),
                    *_norm("pre_layrnorm", "norm_pre", D)]
    else:
        entries += [_same("embeddings.patch_embedding.bias", "patch_embed.bias", (D,)),
                    _Pair("embeddings.position_embedding.weight", "pos_embed", (N, D), (1, N, D))]
    return entries + _block_entries(cfg.depth, D, cfg.mlp_dim) + _norm("post_layernorm", "norm", D)


def _text_entries(cfg: TextConfig) -> list:
    D = cfg.width
    return ([_same("embeddings.token_embedding.weight", "word_embed.weight", (cfg.vocab_size, D)),
             _same("embeddings.position_embedding.weight", "pos_embed.weight", (cfg.max_positions, D))]
            + _block_entries(cfg.depth, D, cfg.mlp_dim) + _norm("final_layer_norm", "norm", D))


def _dual_entries(cfg: DualEncoderConfig, kind: str) -> list:
    """Every tensor of a CLIPModel / SiglipModel, prefixes included."""
    v, t, E = cfg.vision, cfg.text, cfg.embed_dim
    entries = _prefixed(_vision_entries(v, kind), "vision_model.", "vision.")
    entries += _prefixed(_text_entries(t), "text_model.", "text.")
    if kind == "clip":
        return entries + [_same("visual_projection.weight", "vision_proj.weight", (E, v.width)),
                          _same("text_projection.weight", "text_proj.weight", (E, t.width)),
                          _same("logit_scale", "logit_scale", ())]
    D, M = v.width, v.mlp_dim
    head = [_same("probe", "probe", (1, 1, D)),
            _same("attention.in_proj_weight", "qkv.weight", (3 * D, D)),
            _same("attention.in_proj_bias", "qkv.bias", (3 * D,)),
            _same("attention.out_proj.weight", "out.weight", (D, D)),
            _same("attention.out_proj.bias", "out.bias", (D,)),
            *_norm("layernorm", "norm", D),
            _same("mlp.fc1.weight", "mlp.fc1.weight", (M, D)), _same("mlp.fc1.bias", "mlp.fc1.bias", (M,)),
            _same("mlp.fc2.weight", "mlp.fc2.weight", (D, M)), _same("mlp.fc2.bias", "mlp.fc2.bias", (D,))]
    return entries + _prefixed(head, "vision_model.head.", "vision_head.") + [
        _same("text_model.head.weight", "text_proj.weight", (E, t.width)),
        _same("text_model.head.bias", "text_proj.bias", (E,)),
        _Pair("logit_scale", "logit_scale", (1,), ()),
        _Pair("logit_bias", "logit_bias", (1,), ()),
    ]


def _take(src: dict[str, torch.Tensor], key: str, shape: tuple[int, ...], what: str) -> torch.Tensor:
    if key not in src:
        raise ConversionError(f"{what} checkpoint is missing tensor {key} (expected shape {list(shape)})")
    tensor = src.pop(key)
    if tuple(tensor.shape) != shape:
        raise ConversionError(f"{what} tensor {key} has shape {list(tensor.shape)}, the config expects {list(shape)}")
    return tensor


def _import(src: dict[str, torch.Tensor], entries: list, what: str) -> dict[str, torch.Tensor]:
    """Pop every entry's HF tensors from `src` (checking shapes) -> vlmkit tensors."""
    out = {}
    for e in entries:
        if isinstance(e, _Fused):
            out[e.ours] = torch.cat([_take(src, k, e.part_shape, what) for k in e.hf])
        else:
            out[e.ours] = _take(src, e.hf, e.hf_shape, what).reshape(e.our_shape)
    return out


def _export(state: dict[str, torch.Tensor], entries: list, what: str) -> dict[str, torch.Tensor]:
    """vlmkit tensors -> HF tensors; `state` must hold exactly the entries' keys."""
    hf_io.check_state(state, {e.ours: _our_shape(e) for e in entries}, what)
    out = {}
    for e in entries:
        tensor = state[e.ours]
        if isinstance(e, _Fused):
            out.update(zip(e.hf, (part.clone() for part in tensor.chunk(len(e.hf)))))
        else:
            out[e.hf] = tensor.reshape(e.hf_shape)
    return out


def _our_shape(e) -> tuple[int, ...]:
    return (len(e.hf) * e.part_shape[0], *e.part_shape[1:]) if isinstance(e, _Fused) else e.our_shape


# ----------------------------------------------------------------------------- vision tower
def _kind(model_type: str) -> str:
    kind = _MODEL_TYPE_ALIASES.get(model_type, model_type)
    if kind not in SUPPORTED_MODEL_TYPES:
        raise ConversionError(f"model_type {model_type!r} is not supported; supported: "
                              f"{', '.join(SUPPORTED_MODEL_TYPES)} (or {', '.join(_MODEL_TYPE_ALIASES)})")
    return kind


def _act(hf: dict, where: str) -> str:
    act = hf["hidden_act"]
    if act not in ACTS_FROM_HF:
        raise ConversionError(f"{where}.hidden_act {act!r} is not supported; supported: {sorted(ACTS_FROM_HF)}")
    return ACTS_FROM_HF[act]


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
    kind = _kind(model_type)
    hf = {**HF_DEFAULTS[(kind, "vision")], **hf_vision}
    try:
        return VisionConfig(
            image_size=_square(hf["image_size"], "image_size"), patch_size=_square(hf["patch_size"], "patch_size"),
            channels=hf["num_channels"], width=hf["hidden_size"], depth=hf["num_hidden_layers"],
            heads=hf["num_attention_heads"], mlp_dim=hf["intermediate_size"],
            class_token=kind == "clip", norm_pre=kind == "clip", patch_bias=kind == "siglip",
            act=_act(hf, "vision_config"), norm_eps=float(hf["layer_norm_eps"]),
        )
    except ConfigError as e:
        raise ConversionError(f"{kind} vision_config: {e}") from None


def vision_config_to_hf(cfg: VisionConfig, model_type: str) -> dict:
    """VisionConfig -> a CLIPVisionConfig / SiglipVisionConfig dict (the tower alone).

    A SigLIP config leaves `vision_use_head` at transformers' default (True); set it to False
    where no pooling head is written.
    """
    kind = _kind(model_type)
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


def map_vision_state(src: dict[str, torch.Tensor], cfg: VisionConfig, prefix: str,
                     model_type: str) -> dict[str, torch.Tensor]:
    """HF vision-tower tensors under `prefix` (e.g. "vision_model.") -> VisionTransformer keys.

    Pops what it uses from `src` (and the unused `embeddings.position_ids` buffer), so the
    caller can check what is left. SigLIP's pooling head (`{prefix}head.*`) is left in `src`.
    """
    kind = _kind(model_type)
    _check_vision_layout(cfg, kind, exporting=False)
    src.pop(prefix + "embeddings.position_ids", None)
    return _import(src, _prefixed(_vision_entries(cfg, kind), prefix, ""), _ARCHITECTURE[kind])


def vision_state_to_hf(state: dict[str, torch.Tensor], cfg: VisionConfig, prefix: str,
                       model_type: str) -> dict[str, torch.Tensor]:
    """VisionTransformer tensors -> HF vision-tower tensors under `prefix` (inverse of map_vision_state).

    CLIP has no patch-embedding bias: conv(x) + b + pos equals conv_nobias(x) + (pos + b) at
    every patch position, so b is folded into the patch positions (not the class position).
    SigLIP always has one: a tower without it gets a zero bias. Both are exact.
    """
    kind = _kind(model_type)
    _check_vision_layout(cfg, kind, exporting=True)
    state = dict(state)
    if kind == "clip" and cfg.patch_bias:
        bias = _take(state, "patch_embed.bias", (cfg.width,), "VisionTransformer")
        pos = state["pos_embed"].clone()
        pos[:, 1:] += bias  # index 0 is the class token's position: the conv never touches it
        state["pos_embed"] = pos
    elif kind == "siglip" and not cfg.patch_bias:
        state["patch_embed.bias"] = state["patch_embed.weight"].new_zeros(cfg.width)
    return _export(state, _prefixed(_vision_entries(cfg, kind), prefix, ""), "VisionTransformer")


# ----------------------------------------------------------------------------- dual encoder config
def _sub_config(hf: dict, kind: str, part: str) -> dict:
    """text_config / vision_config with transformers' defaults filled in.

    Old CLIP config files also carry `text_config_dict` / `vision_config_dict`, which
    transformers lets win over `text_config` / `vision_config`; so do we.
    """
    sub = {**(hf.get(f"{part}_config") or {}), **(hf.get(f"{part}_config_dict") or {})}
    return {**HF_DEFAULTS[(kind, part)], **sub}


def text_config_from_hf(hf_text: dict, model_type: str) -> TextConfig:
    """A CLIP or SigLIP text config (missing keys take transformers' defaults) -> TextConfig."""
    kind = _kind(model_type)
    hf = {**HF_DEFAULTS[(kind, "text")], **hf_text}
    try:
        return TextConfig(
            vocab_size=hf["vocab_size"], width=hf["hidden_size"], depth=hf["num_hidden_layers"],
            heads=hf["num_attention_heads"], mlp_dim=hf["intermediate_size"],
            max_positions=hf["max_position_embeddings"], type_vocab_size=0, act=_act(hf, "text_config"),
            norm_eps=float(hf["layer_norm_eps"]), max_length=hf["max_position_embeddings"],
            layout="pre_norm", causal=kind == "clip",
            # SigLIP is trained on fixed-length text whose padding is attended to (see TextConfig).
            mask_padding=kind == "clip",
        )
    except ConfigError as e:
        raise ConversionError(f"{kind} text_config: {e}") from None


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
    hv, ht = _sub_config(hf, kind, "vision"), _sub_config(hf, kind, "text")
    vision, text = vision_config_from_hf(hv, kind), text_config_from_hf(ht, kind)
    top = {**HF_DEFAULTS[(kind, "model")], **hf}
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
    kind = _kind(model_type)
    src = dict(weights)
    state = _import(src, _dual_entries(cfg, kind), _ARCHITECTURE[kind])
    leftover = sorted(k for k in src if k not in IGNORED)
    if leftover:
        raise ConversionError(f"unexpected {_ARCHITECTURE[kind]} tensors {leftover[:5]}"
                              f"{' ...' if len(leftover) > 5 else ''}: this config has no place for them")
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
    hf_io.check_state(state, model.state_dict(), "DualEncoder")
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
    weights.update(_export(state, [e for e in _dual_entries(cfg, "clip") if not e.ours.startswith("vision.")],
                           "DualEncoder"))
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
    text = {"model_type": "clip_text_model", "vocab_size": t.vocab_size, "hidden_size": t.width,
            "intermediate_size": t.mlp_dim, "num_hidden_layers": t.depth, "num_attention_heads": t.heads,
            "max_position_embeddings": t.max_positions, "hidden_act": ACTS_TO_HF[t.act],
            "layer_norm_eps": t.norm_eps, "projection_dim": E, "eos_token_id": eos_token_id}
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

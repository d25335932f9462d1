"""Hugging Face LLaVA (`LlavaForConditionalGeneration`) <-> vlmkit VisionLanguageModel.

A LLaVA directory is three models in one file plus the glue between them:

* the vision tower (CLIP, SigLIP or plain ViT; mapped by `hf_clip_vision` / `hf_vit`),
* `multi_modal_projector.linear_1 / linear_2` (vlmkit's `mlp` projector, `net.fc1 / net.fc2`),
* the language model (Llama or Qwen2; mapped by `hf_llama`),

and the glue is config: which hidden state feeds the projector (`vision_feature_layer`: HF
counts the embedding output as hidden state 0, vlmkit counts blocks, so a non-negative
layer shifts by one), whether the class token is dropped (`vision_feature_select_strategy`
"default" drops token 0, "full" keeps all), the image token id and how many slots one
image takes. The processor side (image preprocessing, `<image>` expansion, chat template)
travels as processor_config.json / preprocessor_config.json / tokenizer files.

Checkpoints are read with any of the prefixes transformers has used (`model.vision_tower.`,
`vision_tower.vision_model.`, `language_model.model.`, ...) and written in the layout of
the llava-hf checkpoints on the Hub, which transformers, vLLM and SGLang all read.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from vlmkit.config import IMAGE_TOKEN, ProjectorConfig, VisionConfig, VLMConfig
from vlmkit.convert import hf_io
from vlmkit.convert.hf_io import ConversionError
from vlmkit.convert.keymap import Rule, check, pair, reject_unexpected, to_ours, to_theirs

VISION_TYPES = ("clip_vision_model", "siglip_vision_model", "vit")
# LlavaConfig's own defaults for a vision_config that leaves keys out (llava-1.5's CLIP ViT-L/14-336).
_LLAVA_VISION_DEFAULTS = {"model_type": "clip_vision_model", "intermediate_size": 4096, "hidden_size": 1024,
                          "patch_size": 14, "image_size": 336, "num_hidden_layers": 24, "num_attention_heads": 16,
                          "projection_dim": 768}
_LM_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."),
                ("language_model.lm_head.", "lm_head."), ("lm_head.", "lm_head."))
_VISION_PREFIXES = ("model.vision_tower.", "vision_tower.")
_PROJECTOR_PREFIXES = ("model.multi_modal_projector.", "multi_modal_projector.")


# ----------------------------------------------------------------------------- vision towers
def _vision_config_from_hf(hf: dict) -> tuple[VisionConfig, str]:
    model_type = hf.get("model_type", "clip_vision_model")
    if model_type == "vit":
        from vlmkit.convert.hf_vit import vit_config_from_hf

        return vit_config_from_hf(hf), model_type
    if model_type in ("clip_vision_model", "siglip_vision_model"):
        from vlmkit.convert.hf_clip_vision import vision_config_from_hf

        return vision_config_from_hf(hf, model_type), model_type
    raise ConversionError(f"LLaVA vision tower model_type {model_type!r} is not supported; "
                          f"supported: {', '.join(VISION_TYPES)}")


def _map_vision(src: dict, cfg: VisionConfig, model_type: str) -> dict:
    if model_type == "vit":
        from vlmkit.convert.hf_vit import map_vit_state

        return map_vit_state(src, cfg)
    from vlmkit.convert.hf_clip_vision import map_vision_state

    state = map_vision_state(src, cfg, "", model_type)
    for key in [k for k in src if k.startswith("head.")]:  # SigLIP's pooling head: LLaVA reads hidden states
        src.pop(key)
    return state


def export_vision_type(cfg: VisionConfig) -> str:
    """The HF layout that holds this tower exactly: CLIP, SigLIP or the original ViT."""
    if cfg.class_token and cfg.norm_pre:
        return "clip_vision_model"
    if not cfg.class_token and not cfg.norm_pre:
        return "siglip_vision_model"
    if cfg.class_token and cfg.patch_bias:
        return "vit"
    raise ConversionError(f"no Hugging Face vision tower has this layout (class_token={cfg.class_token}, "
                          f"norm_pre={cfg.norm_pre}, patch_bias={cfg.patch_bias})")


def _vision_to_hf(state: dict, cfg: VisionConfig, model_type: str) -> tuple[dict, dict]:
    """(HF vision config, tensors under the llava-hf prefix)."""
    if model_type == "vit":
        from vlmkit.convert.hf_vit import vit_config_to_hf, vit_state_to_hf

        return vit_config_to_hf(cfg), vit_state_to_hf(state, cfg, "vision_tower.")
    from vlmkit.convert.hf_clip_vision import vision_config_to_hf, vision_state_to_hf

    hf = vision_config_to_hf(cfg, model_type)
    if model_type == "siglip_vision_model":
        hf["vision_use_head"] = False  # the pooling head is a dual-encoder part; LLaVA has none
    return hf, vision_state_to_hf(state, cfg, "vision_tower.vision_model.", model_type)


# ----------------------------------------------------------------------------- config
def _feature_layer_to_vlmkit(layer, depth: int) -> int:
    if isinstance(layer, list):
        raise ConversionError(f"vision_feature_layer {layer} (several layers concatenated) is not supported; "
                              "use a single layer")
    if layer == 0:
        raise ConversionError("vision_feature_layer 0 (the patch embeddings, before any block) is not supported")
    ours = layer if layer < 0 else layer - 1  # HF hidden_states[0] is the embedding output
    if not -depth <= ours < depth:
        raise ConversionError(f"vision_feature_layer {layer} is outside a {depth}-layer vision tower")
    return ours


def vlm_config_from_hf(hf: dict, image_token: str = IMAGE_TOKEN) -> tuple[VLMConfig, str]:
    """(VLMConfig, the vision tower's HF model_type) for a LLaVA config.json."""
    from vlmkit.convert.hf_llama import decoder_config_from_hf

    if hf.get("model_type") != "llava":
        raise ConversionError(f"model_type {hf.get('model_type')!r} is not LLaVA; supported: llava")
    vision, vision_type = _vision_config_from_hf({**_LLAVA_VISION_DEFAULTS, **(hf.get("vision_config") or {})})
    decoder = decoder_config_from_hf({"model_type": "llama", **(hf.get("text_config") or {})})
    act = hf.get("projector_hidden_act", "gelu")
    if act != "gelu":
        raise ConversionError(f"projector_hidden_act {act!r} is not supported; supported: gelu")
    strategy = hf.get("vision_feature_select_strategy", "default")
    if strategy not in ("default", "full"):
        raise ConversionError(f"vision_feature_select_strategy {strategy!r}; supported: default, full")
    if strategy == "default" and not vision.class_token:
        raise ConversionError("vision_feature_select_strategy 'default' drops token 0, but this "
                              f"{vision_type} tower has no class token (it would drop a patch); use 'full'")
    cfg = VLMConfig(
        vision=vision, projector=ProjectorConfig(kind="mlp", hidden=decoder.width), decoder=decoder,
        vision_layer=_feature_layer_to_vlmkit(hf.get("vision_feature_layer", -2), vision.depth),
        vision_select="patch" if strategy == "default" else "all",
        image_token=image_token, image_token_id=hf.get("image_token_index", hf.get("image_token_id", 32000)),
    )
    # `image_seq_length` is not read: transformers' LLaVA never does, and configs keep
    # LlavaConfig's default 576 whatever their tower gives; the tower decides the count.
    return cfg, vision_type


# ----------------------------------------------------------------------------- import
def _split_state(src: dict[str, torch.Tensor]) -> tuple[dict, dict, dict]:
    vision, projector, lm, unknown = {}, {}, {}, []
    for key, tensor in src.items():
        if key.startswith(_VISION_PREFIXES):
            rest = key.split("vision_tower.", 1)[1]
            vision[rest.removeprefix("vision_model.")] = tensor
        elif key.startswith(_PROJECTOR_PREFIXES):
            projector["multi_modal_projector." + key.split("multi_modal_projector.", 1)[1]] = tensor
        else:
            for theirs, ours in _LM_PREFIXES:
                if key.startswith(theirs):
                    lm[ours + key[len(theirs):]] = tensor
                    break
            else:
                unknown.append(key)
    reject_unexpected(unknown, "LLaVA")
    return vision, projector, lm


def _projector_rules(cfg: VLMConfig, bias: bool = True) -> list[Rule]:
    """linear_1 / linear_2 <-> the `mlp` projector's net.fc1 / net.fc2.

    multimodal_projector_bias=false (`bias`) leaves the biases out: a zero bias is the same
    map. With it true (LlavaConfig's default) a missing bias is an error, not a silent zero.
    """
    hidden = cfg.projector.hidden or cfg.decoder.width
    rules = []
    for ours, theirs, shape in (("fc1", "linear_1", (hidden, cfg.vision.width)),
                                ("fc2", "linear_2", (cfg.decoder.width, hidden))):
        o, t = f"multi_modal_projector.net.{ours}.", f"multi_modal_projector.{theirs}."
        rules += [pair(o + "weight", t + "weight", shape),
                  pair(o + "bias", t + "bias", shape[:1], optional=not bias,
                       note="the config says multimodal_projector_bias: true")]
    return rules


def load_hf_llava(path: str | Path):
    """A local LLaVA directory -> (VLMConfig, state dict, LMTokenizer, ImageTransform)."""
    from vlmkit.convert.hf_llama import map_decoder_state
    from vlmkit.convert.hf_processor import image_transform_from_hf
    from vlmkit.models.vlm import VisionLanguageModel

    path = Path(path)
    image_processor = hf_io.read_image_processor(path)
    image_token = (hf_io.read_json(path, "processor_config.json") or {}).get("image_token", IMAGE_TOKEN)
    hf = hf_io.read_config(path)
    cfg, vision_type = vlm_config_from_hf(hf, image_token)
    vision, projector, lm = _split_state(hf_io.read_weights(path))
    state = {f"vision_tower.{k}": v for k, v in _map_vision(vision, cfg.vision, vision_type).items()}
    state.update(to_ours(_projector_rules(cfg, hf.get("multimodal_projector_bias", True)), projector, "LLaVA"))
    state.update({f"language_model.{k}": v for k, v in map_decoder_state(lm, cfg.decoder, "model.", "lm_head.weight").items()})
    reject_unexpected([f"vision_tower.{k}" for k in vision] + list(projector) + [f"language_model.{k}" for k in lm],
                      "LLaVA")
    from vlmkit.checkpoint import unique_state_dict

    check(state, unique_state_dict(VisionLanguageModel(cfg)), f"{path} (as a vlmkit VLM)")
    tokenizer = hf_io.read_vlm_tokenizer(path)
    if tokenizer.token_id(image_token) != cfg.image_token_id:
        raise ConversionError(f"the tokenizer maps {image_token!r} to {tokenizer.token_id(image_token)}, "
                              f"the model config says image_token_index {cfg.image_token_id}")
    if image_processor is None:
        raise ConversionError(f"{path}: no preprocessor_config.json or processor_config.json image_processor; "
                              "the image preprocessing cannot be reproduced")
    return cfg, state, tokenizer, image_transform_from_hf(image_processor)


def import_hf_llava(path: str | Path, out: str | Path) -> Path:
    """Write a LLaVA directory as a vlmkit checkpoint (kind "vlm") that `vlmkit.load` serves."""
    from vlmkit.checkpoint import load_weights, save_checkpoint
    from vlmkit.models.vlm import VisionLanguageModel

    cfg, state, tokenizer, transform = load_hf_llava(path)
    model = VisionLanguageModel(cfg)
    model.load_state_dict(state, strict=False)  # tied lm_head is an alias, not a tensor of its own
    save_checkpoint(out, model, "vlm", cfg.to_dict(), tokenizer, preprocessor=transform.to_dict())
    load_weights(VisionLanguageModel(cfg), out)  # read back strictly: what we wrote is complete
    return Path(out)


# ----------------------------------------------------------------------------- export
def save_hf_llava(source, out: str | Path) -> Path:
    """A vlmkit VLM checkpoint directory -> a LLaVA directory for transformers / vLLM / SGLang.

    The `mlp` projector with hidden width = LM width is LLaVA's; `pixel_shuffle` and
    `resampler` have no LLaVA equivalent and are refused. When the image token lies past the
    LM's vocabulary (added to a pretrained tokenizer), the embedding rows are padded with
    zeros up to it and generation_config suppresses it, so HF never samples it either.
    """
    from vlmkit.convert.hf_llama import decoder_config_to_hf, decoder_state_to_hf, hf_tokenizer_files
    from vlmkit.convert.hf_processor import image_processor_to_hf
    from vlmkit.data.images import ImageTransform
    from vlmkit.data.lm_tokenizer import LMTokenizer

    source = Path(source)
    model = hf_io.load_vlmkit(source, "vlm")
    cfg: VLMConfig = model.cfg
    tokenizer = LMTokenizer.from_pretrained(source)
    transform = ImageTransform.from_dict(json.loads((source / "preprocessor.json").read_text()))
    if cfg.vision_layer is None:
        raise ConversionError("vision_layer None (the tower's normalised final tokens) has no LLaVA equivalent "
                              "(LLaVA reads a block's raw output)")
    if (cfg.projector.kind != "mlp" or cfg.projector.linear
            or (cfg.projector.hidden or cfg.decoder.width) != cfg.decoder.width):
        raise ConversionError(f"projector kind {cfg.projector.kind!r} (hidden {cfg.projector.hidden}, linear "
                              f"{cfg.projector.linear}) has no LLaVA "
                              "equivalent; LLaVA needs kind 'mlp' with hidden = the LM width")
    if cfg.image_positions != "sequential":
        raise ConversionError(f"image_positions {cfg.image_positions!r} has no LLaVA equivalent (LLaVA gives each "
                              "image token its own position)")
    if cfg.projector.position_embedding:
        raise ConversionError("projector.position_embedding has no LLaVA equivalent (LLaVA adds nothing to the "
                              "projected image tokens)")
    vision_type = export_vision_type(cfg.vision)
    state = {k: v for k, v in model.state_dict().items()}
    sub = lambda prefix: {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}  # noqa: E731

    decoder_cfg, lm_state = cfg.decoder, sub("language_model.")
    suppress = []
    if cfg.image_token_id >= decoder_cfg.vocab_size:
        pad = cfg.image_token_id + 1 - decoder_cfg.vocab_size
        decoder_cfg = decoder_cfg.replace(vocab_size=cfg.image_token_id + 1)
        lm_state["embed.weight"] = torch.cat([lm_state["embed.weight"], lm_state["embed.weight"].new_zeros(pad, decoder_cfg.width)])
        if not decoder_cfg.tie_embeddings:
            lm_state["lm_head.weight"] = torch.cat([lm_state["lm_head.weight"],
                                                    lm_state["lm_head.weight"].new_zeros(pad, decoder_cfg.width)])
        suppress = list(range(cfg.decoder.vocab_size, decoder_cfg.vocab_size))

    vision_hf, tensors = _vision_to_hf(sub("vision_tower."), cfg.vision, vision_type)
    projector = {k: v for k, v in state.items() if k.startswith("multi_modal_projector.")}
    tensors.update(to_theirs(_projector_rules(cfg), projector, "VisionLanguageModel"))
    tensors.update(decoder_state_to_hf(lm_state, decoder_cfg, "language_model.model.", "language_model.lm_head.weight"))

    special = {"bos_token_id": None, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
    text_hf = decoder_config_to_hf(decoder_cfg, **special)
    strategy = "default" if cfg.vision_select == "patch" and cfg.vision.class_token else "full"
    config = {
        "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
        "vision_config": vision_hf, "text_config": text_hf,
        "image_token_index": cfg.image_token_id, "image_seq_length": cfg.image_tokens,
        "projector_hidden_act": "gelu", "multimodal_projector_bias": True,
        "vision_feature_layer": cfg.vision_layer if cfg.vision_layer < 0 else cfg.vision_layer + 1,
        "vision_feature_select_strategy": strategy,
        "tie_word_embeddings": decoder_cfg.tie_embeddings, "dtype": "float32",
    }
    image_processor = image_processor_to_hf(transform, "siglip" if vision_type == "siglip_vision_model" else "clip")
    processor = {"processor_class": "LlavaProcessor", "image_token": cfg.image_token,
                 "patch_size": cfg.vision.patch_size, "vision_feature_select_strategy": strategy,
                 # the processor adds these to the patch count; "default" then takes the class token off again
                 "num_additional_image_tokens": 1 if cfg.vision.class_token else 0}
    stops = tokenizer.stop_ids
    generation = {"eos_token_id": stops[0] if len(stops) == 1 else list(stops), "pad_token_id": tokenizer.pad_id,
                  "do_sample": False}
    if suppress:
        generation["suppress_tokens"] = suppress
    return hf_io.write_dir(out, config, tensors, {
        **hf_tokenizer_files(tokenizer, extra={"processor_class": "LlavaProcessor"}),
        "generation_config.json": generation,
        "preprocessor_config.json": image_processor,  # older transformers, vLLM
        "processor_config.json": {**processor, "image_processor": image_processor},  # transformers 5
    })

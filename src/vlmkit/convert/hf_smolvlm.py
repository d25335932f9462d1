"""Hugging Face Idefics3 / SmolVLM (`Idefics3ForConditionalGeneration`,
`SmolVLMForConditionalGeneration`) <-> vlmkit VisionLanguageModel.

The family is LLaVA's recipe with three changes, each a vlmkit config choice:

* the vision tower is SigLIP's (`model.vision_model.`) read at its final, normalised
  output (`vision_layer` None); Idefics3's variable-resolution position lookup gives the
  identity for a full tile, which is all the processor ever produces;
* the connector is a pixel shuffle by `scale_factor` and one bias-free Linear
  (`model.connector.modality_projection.proj`: projector kind "pixel_shuffle", `linear`);
* images are split into tiles of the tower's size plus a global view (the image processor:
  a tiled ImageTransform), each image written in the prompt with row/column markers
  (`image_prompt` "idefics3"). The language model is Llama (SmolLM2; `model.text_model.`).

SmolVLM and Idefics3 share the computation; they differ in names and defaults only.
Imports read both; exports write SmolVLM's layout, which transformers, vLLM and
llama.cpp's converter read.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from vlmkit.config import IMAGE_TOKEN, ProjectorConfig, VLMConfig
from vlmkit.convert import hf_io
from vlmkit.convert.hf_io import ConversionError
from vlmkit.convert.keymap import pair, reject_unexpected, to_ours, to_theirs

FAMILIES = {  # model_type -> (architecture, vision model_type, processor class)
    "smolvlm": ("SmolVLMForConditionalGeneration", "smolvlm_vision", "SmolVLMProcessor"),
    "idefics3": ("Idefics3ForConditionalGeneration", "idefics3_vision", "Idefics3Processor"),
}
# Idefics3VisionConfig / SmolVLMVisionConfig defaults, for configs that leave keys out.
_VISION_DEFAULTS = {"hidden_size": 1152, "intermediate_size": 3072, "num_hidden_layers": 12,
                    "num_attention_heads": 16, "num_channels": 3, "image_size": 224, "patch_size": 32,
                    "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6}
_VISION, _TEXT = "model.vision_model.", "model.text_model."
_CONNECTOR = "model.connector.modality_projection.proj.weight"
_PROJECTOR = "multi_modal_projector.net.weight"


def _check_positions(grid: int) -> None:
    """Idefics3 looks a full tile's patch positions up by bucketing fractions i / grid; vlmkit
    counts them 0..grid-1. Run its arithmetic to be sure the two agree for this grid."""
    boundaries = torch.arange(1 / grid, 1.0, 1 / grid)
    fractions = (torch.arange(grid, dtype=torch.float32) * (1.0 / torch.tensor(float(grid)))).clamp(max=1 - 1e-6)
    if not torch.equal(torch.bucketize(fractions, boundaries, right=True), torch.arange(grid)):
        raise ConversionError(f"a {grid}x{grid} patch grid: Idefics3's position lookup is not the identity there")


def vlm_config_from_hf(hf: dict) -> VLMConfig:
    """An Idefics3 / SmolVLM config.json -> VLMConfig."""
    from vlmkit.convert.hf_clip_vision import vision_config_from_hf
    from vlmkit.convert.hf_llama import decoder_config_from_hf

    if hf.get("model_type") not in FAMILIES:
        raise ConversionError(f"model_type {hf.get('model_type')!r} is not Idefics3 / SmolVLM")
    vision = vision_config_from_hf({**_VISION_DEFAULTS, **(hf.get("vision_config") or {})}, "siglip")
    text = hf.get("text_config")
    if not text:
        raise ConversionError("config.json has no text_config; the language model cannot be built")
    # transformers ties lm_head to the embeddings by the top-level switch (default False).
    decoder = decoder_config_from_hf({"model_type": "llama", **text,
                                      "tie_word_embeddings": bool(hf.get("tie_word_embeddings", False))})
    factor = hf.get("scale_factor", 2)
    if not isinstance(factor, int) or isinstance(factor, bool) or factor < 1 or vision.grid % factor:
        raise ConversionError(f"scale_factor {factor!r} must be a positive int dividing the {vision.grid}-patch grid")
    _check_positions(vision.grid)
    return VLMConfig(vision=vision, decoder=decoder,
                     projector=ProjectorConfig(kind="pixel_shuffle", shuffle_factor=factor, linear=True),
                     vision_layer=None, vision_select="patch", image_prompt="idefics3",
                     image_token=IMAGE_TOKEN, image_token_id=hf.get("image_token_id", 128257))


def _connector_rule(cfg: VLMConfig):
    f = cfg.projector.shuffle_factor
    return pair(_PROJECTOR, _CONNECTOR, (cfg.decoder.width, cfg.vision.width * f * f))


def _processor_settings(path: Path) -> tuple[dict, dict]:
    """(image-processor settings, processor settings) from either file layout."""
    processor = hf_io.read_json(path, "processor_config.json") or {}
    image = hf_io.read_image_processor(path)
    if image is None:
        raise ConversionError(f"{path}: no preprocessor_config.json or processor_config.json image_processor; "
                              "the image splitting cannot be reproduced")
    return image, processor


def load_hf_smolvlm(path: str | Path):
    """A local Idefics3 / SmolVLM directory -> (VLMConfig, state dict, LMTokenizer, ImageTransform)."""
    from vlmkit.checkpoint import unique_state_dict
    from vlmkit.convert.hf_clip_vision import map_vision_state
    from vlmkit.convert.hf_llama import map_decoder_state
    from vlmkit.convert.hf_processor import tiled_transform_from_hf
    from vlmkit.convert.keymap import check
    from vlmkit.data.image_prompt import ImagePrompt
    from vlmkit.models.vlm import VisionLanguageModel

    path = Path(path)
    cfg = vlm_config_from_hf(hf_io.read_config(path))
    image_settings, processor = _processor_settings(path)
    transform = tiled_transform_from_hf(image_settings)
    if transform.size != cfg.vision.image_size:
        raise ConversionError(f"max_image_size {transform.size} (the tile side) differs from the vision tower's "
                              f"image_size {cfg.vision.image_size}")
    seq_len = processor.get("image_seq_len", cfg.image_tokens)
    if seq_len != cfg.image_tokens:  # the processor writes this many slots per tile: it must be the model's count
        raise ConversionError(f"processor image_seq_len {seq_len} differs from the model's {cfg.image_tokens} "
                              "tokens per tile ((image_size / patch_size / scale_factor)^2)")

    src = hf_io.read_weights(path)
    state = {f"vision_tower.{k}": v for k, v in map_vision_state(src, cfg.vision, _VISION, "siglip").items()}
    state.update(to_ours([_connector_rule(cfg)], src, "SmolVLM"))
    state.update({f"language_model.{k}": v
                  for k, v in map_decoder_state(src, cfg.decoder, _TEXT, "lm_head.weight").items()})
    reject_unexpected(src, "Idefics3 / SmolVLM")
    check(state, unique_state_dict(VisionLanguageModel(cfg)), f"{path} (as a vlmkit VLM)")

    tokenizer = hf_io.read_vlm_tokenizer(path)
    if tokenizer.token_id(IMAGE_TOKEN) != cfg.image_token_id:
        raise ConversionError(f"the tokenizer maps {IMAGE_TOKEN!r} to {tokenizer.token_id(IMAGE_TOKEN)}, "
                              f"the model config says image_token_id {cfg.image_token_id}")
    try:
        ImagePrompt(tokenizer, cfg.image_prompt, cfg.image_tokens, IMAGE_TOKEN).ids(1, 2)
    except ValueError as e:
        raise ConversionError(f"{path}: {e}") from None
    return cfg, state, tokenizer, transform


def import_hf_smolvlm(path: str | Path, out: str | Path) -> Path:
    """Write an Idefics3 / SmolVLM directory as a vlmkit checkpoint (kind "vlm")."""
    from vlmkit.checkpoint import load_weights, save_checkpoint
    from vlmkit.models.vlm import VisionLanguageModel

    cfg, state, tokenizer, transform = load_hf_smolvlm(path)
    model = VisionLanguageModel(cfg)
    model.load_state_dict(state, strict=False)  # a tied lm_head is an alias, not a tensor of its own
    save_checkpoint(out, model, "vlm", cfg.to_dict(), tokenizer, preprocessor=transform.to_dict())
    load_weights(VisionLanguageModel(cfg), out)  # read back strictly: what we wrote is complete
    return Path(out)


def save_hf_smolvlm(source, out: str | Path) -> Path:
    """A vlmkit VLM checkpoint in this family's layout -> a SmolVLM directory for transformers."""
    from vlmkit.convert.hf_clip_vision import vision_config_to_hf, vision_state_to_hf
    from vlmkit.convert.hf_llama import decoder_config_to_hf, decoder_state_to_hf, hf_tokenizer_files
    from vlmkit.convert.hf_processor import tiled_processor_to_hf
    from vlmkit.data.images import ImageTransform
    from vlmkit.data.lm_tokenizer import LMTokenizer

    source = Path(source)
    model = hf_io.load_vlmkit(source, "vlm")
    cfg: VLMConfig = model.cfg
    p = cfg.projector
    wrong = [what for what, bad in (
        ("image_prompt must be 'idefics3'", cfg.image_prompt != "idefics3"),
        ("the projector must be pixel_shuffle with linear", p.kind != "pixel_shuffle" or not p.linear),
        ("projector.position_embedding must be off", p.position_embedding),
        ("vision_layer must be None (the final, normalised tokens)", cfg.vision_layer is not None),
        ("the vision tower must be SigLIP's layout (no class token, no norm_pre)",
         cfg.vision.class_token or cfg.vision.norm_pre),
        ("image_positions must be 'sequential'", cfg.image_positions != "sequential"),
    ) if bad]
    if wrong:
        raise ConversionError("no SmolVLM layout holds this model: " + "; ".join(wrong))
    tokenizer = LMTokenizer.from_pretrained(source)
    transform = ImageTransform.from_dict(json.loads((source / "preprocessor.json").read_text()))
    state = model.state_dict()
    sub = lambda prefix: {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}  # noqa: E731

    architecture, vision_type, processor_class = FAMILIES["smolvlm"]
    tensors = vision_state_to_hf(sub("vision_tower."), cfg.vision, _VISION, "siglip")
    tensors.update(to_theirs([_connector_rule(cfg)], {_PROJECTOR: state[_PROJECTOR]}, "VisionLanguageModel"))
    tensors.update(decoder_state_to_hf(sub("language_model."), cfg.decoder, _TEXT, "lm_head.weight"))

    vision_hf = {**vision_config_to_hf(cfg.vision, "siglip"), "model_type": vision_type}
    text_hf = decoder_config_to_hf(cfg.decoder, bos_token_id=None, eos_token_id=tokenizer.eos_id,
                                   pad_token_id=tokenizer.pad_id)
    config = {"architectures": [architecture], "model_type": "smolvlm", "vision_config": vision_hf,
              "text_config": text_hf, "scale_factor": p.shuffle_factor, "image_token_id": cfg.image_token_id,
              "tie_word_embeddings": cfg.decoder.tie_embeddings, "pad_token_id": tokenizer.pad_id,
              "dtype": "float32"}
    image_processor = tiled_processor_to_hf(transform)
    processor = {"processor_class": processor_class, "image_seq_len": cfg.image_tokens}
    stops = tokenizer.stop_ids
    generation = {"eos_token_id": stops[0] if len(stops) == 1 else list(stops), "pad_token_id": tokenizer.pad_id,
                  "do_sample": False}
    return hf_io.write_dir(out, config, tensors, {
        **hf_tokenizer_files(tokenizer, extra={"processor_class": processor_class}),
        "generation_config.json": generation,
        "preprocessor_config.json": image_processor,
        "processor_config.json": {**processor, "image_processor": image_processor},
    })

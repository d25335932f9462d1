"""Hugging Face image processor settings (preprocessor_config.json) <-> vlmkit ImageTransform.

Read: CLIPImageProcessor (CLIP, LLaVA-1.5), SiglipImageProcessor and LlavaImageProcessor
without padding, in their torchvision, "Fast" and "Pil" spellings. Written: the CLIP or SigLIP
layout, which AutoImageProcessor reads back. Idefics3ImageProcessor / SmolVLMImageProcessor
(image splitting into tiles and a global view) map onto a tiled ImageTransform both ways. Both directions refuse, naming the key, whatever
would not give the same pixels: ImageTransform makes square images from a fixed recipe, so a
size that follows the input, a non-square output, padding or a filter we lack cannot map.
"""
from __future__ import annotations

from typing import Any

from vlmkit.convert.hf_io import ConversionError
from vlmkit.data.images import ImageTransform

# PIL resampling codes as configs store them (PIL.Image.Resampling values).
_PIL_FILTERS = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}
_PIL_CODES = {name: code for code, name in _PIL_FILTERS.items()}

_OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# A key a config leaves out (or sets to null) takes the class default, so the defaults of
# each class we read are part of its meaning (transformers' class attributes).
_CLIP_DEFAULTS = {
    "do_resize": True, "size": {"shortest_edge": 224}, "resample": 3,
    "do_center_crop": True, "crop_size": {"height": 224, "width": 224},
    "do_rescale": True, "rescale_factor": 1 / 255,
    "do_normalize": True, "image_mean": _OPENAI_CLIP_MEAN, "image_std": _OPENAI_CLIP_STD,
    "do_convert_rgb": True,
}
_DEFAULTS = {
    "CLIPImageProcessor": _CLIP_DEFAULTS,
    "LlavaImageProcessor": {**_CLIP_DEFAULTS, "do_pad": False},
    "SiglipImageProcessor": {
        "do_resize": True, "size": {"height": 224, "width": 224}, "resample": 3,
        "do_center_crop": False, "crop_size": None,
        "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
        "do_convert_rgb": True,
    },
}
_KINDS = {"clip": "CLIPImageProcessor", "siglip": "SiglipImageProcessor"}
# do_* switches whose meaning is covered above; any other one that is on is refused.
_KNOWN_SWITCHES = {"do_resize", "do_center_crop", "do_rescale", "do_normalize", "do_convert_rgb"}


def _processor_class(cfg: dict) -> str:
    name = cfg.get("image_processor_type")
    if name is None and cfg.get("feature_extractor_type"):  # configs older than image processors
        name = cfg["feature_extractor_type"].replace("FeatureExtractor", "ImageProcessor")
    base = str(name)
    for suffix in ("Fast", "Pil"):  # backend spellings of the same processor
        base = base.removesuffix(suffix)
    if base not in _DEFAULTS:
        raise ConversionError(f"image_processor_type {name!r} is not supported; supported: {sorted(_DEFAULTS)}")
    return base


def _size_dict(value: Any, key: str, int_means: str) -> dict:
    # transformers' own widening of old spellings: an int is the shortest edge for `size` of
    # these classes and a square for `crop_size`; a pair is (height, width).
    if isinstance(value, int) and not isinstance(value, bool):
        return {"shortest_edge": value} if int_means == "shortest_edge" else {"height": value, "width": value}
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return {"height": value[0], "width": value[1]}
    if isinstance(value, dict):
        return {k: v for k, v in value.items() if v is not None}
    raise ConversionError(f"{key} {value!r} is not a size vlmkit understands")


def _three(value: Any, key: str) -> list[float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [float(value)] * 3
    try:
        values = [float(v) for v in value]
    except (TypeError, ValueError):
        values = []
    if len(values) != 3:
        raise ConversionError(f"{key} {value!r} must be one number or three (RGB)")
    return values


def image_transform_from_hf(preprocessor_config: dict) -> ImageTransform:
    """An image processor's settings (preprocessor_config.json) -> the ImageTransform giving its pixels."""
    cfg = dict(preprocessor_config)
    kind = _processor_class(cfg)
    defaults = _DEFAULTS[kind]

    def get(key: str) -> Any:
        value = cfg.get(key)
        return defaults.get(key) if value is None else value  # null means "class default", as in HF

    for key in sorted(k for k in cfg if k.startswith("do_") and k not in _KNOWN_SWITCHES):
        if cfg[key]:
            raise ConversionError(f"{key}={cfg[key]!r} is not supported (vlmkit has no such step)")
    if cfg.get("use_square_size"):
        raise ConversionError(f"use_square_size={cfg['use_square_size']!r} is not supported")
    if not get("do_resize"):
        raise ConversionError("do_resize=False is not supported: the output size would follow each image")

    size = _size_dict(get("size"), "size", "height_width" if cfg.get("default_to_square") else "shortest_edge")
    crop = _size_dict(get("crop_size"), "crop_size", "square") if get("do_center_crop") else None
    if crop is not None and set(crop) != {"height", "width"}:
        raise ConversionError(f"crop_size {get('crop_size')!r} must give height and width")
    if crop is not None and crop["height"] != crop["width"]:
        raise ConversionError(f"crop_size {crop} is not square; vlmkit makes square images")

    if set(size) == {"shortest_edge"}:
        if crop is None:
            raise ConversionError(f"do_center_crop={get('do_center_crop')!r} with size {size}: the output would "
                                  "keep each image's aspect ratio; vlmkit needs a square crop")
        if crop["height"] > size["shortest_edge"]:
            raise ConversionError(f"crop_size {crop} is larger than size {size}: HF would pad with black")
        geometry = dict(size=crop["height"], resize_mode="shortest_crop", shortest_edge=size["shortest_edge"])
    elif set(size) == {"height", "width"}:
        if size["height"] != size["width"]:
            raise ConversionError(f"size {size} is not square; vlmkit makes square images")
        if crop is not None and crop != size:
            raise ConversionError(f"crop_size {crop} differs from size {size}; vlmkit cannot crop a squashed image")
        geometry = dict(size=size["height"], resize_mode="squash")
    else:
        raise ConversionError(f"size {size} is not supported; use {{'shortest_edge': n}} or "
                              "{'height': n, 'width': n}")

    resample = get("resample")
    if isinstance(resample, bool) or resample not in _PIL_FILTERS:
        raise ConversionError(f"resample {resample!r} is not supported; supported PIL codes: {_PIL_FILTERS}")
    if get("do_normalize"):
        mean, std = _three(get("image_mean"), "image_mean"), _three(get("image_std"), "image_std")
        if min(std) <= 0:
            raise ConversionError(f"image_std {get('image_std')!r} must be > 0")
    else:
        mean, std = [0.0] * 3, [1.0] * 3  # (x - 0) / 1 is x exactly
    factor = get("rescale_factor") if get("do_rescale") else 1.0
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0:
        raise ConversionError(f"rescale_factor {factor!r} must be a number > 0")
    # do_convert_rgb is not checked: vlmkit always converts, which HF does too for the RGB
    # images it can use when the switch is off.
    try:
        return ImageTransform(**geometry, interpolation=_PIL_FILTERS[resample], mean=tuple(mean), std=tuple(std),
                              rescale_factor=float(factor))
    except ValueError as e:  # e.g. a size that is not a positive int
        raise ConversionError(f"{e} (from {kind} settings)") from None


def image_processor_to_hf(transform: ImageTransform, kind: str) -> dict:
    """ImageTransform -> settings for preprocessor_config.json in the CLIP or SigLIP layout.

    Only the inference pipeline is written: `random_crop_scale` is training augmentation
    and has no place in an image processor.
    """
    if kind not in _KINDS:
        raise ConversionError(f"kind {kind!r} is not supported; supported: {sorted(_KINDS)}")
    t, s = transform, transform.size
    if t.resize_mode == "pad":
        raise ConversionError("resize_mode 'pad' (letterbox) has no equivalent in CLIPImageProcessor or "
                              "SiglipImageProcessor")
    if t.resize_mode == "shortest_crop":
        if kind == "siglip":
            raise ConversionError("resize_mode 'shortest_crop' has no SiglipImageProcessor layout (it resizes to "
                                  "height x width); use kind 'clip'")
        if t.shortest_edge is None:
            raise ConversionError("shortest_edge is None: vlmkit's original shortest_crop (crop the centred square, "
                                  "then resize) has no HF equivalent; set shortest_edge (= size for CLIP's recipe)")
        size = {"shortest_edge": t.shortest_edge}
    else:
        size = {"height": s, "width": s}
    out: dict[str, Any] = {
        "image_processor_type": _KINDS[kind],
        "do_resize": True, "size": size, "resample": _PIL_CODES[t.interpolation],
    }
    if kind == "clip":
        # For squash the crop is a no-op, but tools read crop_size as the model's input size.
        out.update(do_center_crop=True, crop_size={"height": s, "width": s})
    out.update({
        "do_rescale": True, "rescale_factor": t.rescale_factor,
        "do_normalize": True, "image_mean": list(t.mean), "image_std": list(t.std),
        "do_convert_rgb": True,
    })
    return out


# ----------------------------------------------------------------------------- Idefics3 / SmolVLM
_TILED_DEFAULTS = {
    "do_resize": True, "size": {"longest_edge": 4 * 364}, "resample": 1,
    "do_image_splitting": True, "max_image_size": {"longest_edge": 364},
    "do_rescale": True, "rescale_factor": 1 / 255,
    "do_normalize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
    "do_convert_rgb": True, "do_pad": True,
}
TILED_PROCESSORS = ("Idefics3ImageProcessor", "SmolVLMImageProcessor")


def _longest_edge(value: Any, key: str) -> int:
    edge = value.get("longest_edge") if isinstance(value, dict) else None
    if isinstance(edge, bool) or not isinstance(edge, int) or edge < 1:
        raise ConversionError(f"{key} {value!r} must be {{'longest_edge': n}}")
    return edge


def tiled_transform_from_hf(preprocessor_config: dict) -> ImageTransform:
    """Idefics3 / SmolVLM image-processor settings -> the tiled ImageTransform giving their pixels.

    do_pad is accepted and has no effect here: it pads images of one batch to a common size
    with all-zero tiles, which the model drops before its vision tower.
    """
    cfg = dict(preprocessor_config)
    name = str(cfg.get("image_processor_type")).removesuffix("Fast").removesuffix("Pil")
    if name not in TILED_PROCESSORS:
        raise ConversionError(f"image_processor_type {cfg.get('image_processor_type')!r} is not supported here; "
                              f"supported: {', '.join(TILED_PROCESSORS)}")

    def get(key: str) -> Any:
        value = cfg.get(key)
        return _TILED_DEFAULTS.get(key) if value is None else value

    known = {"do_resize", "do_image_splitting", "do_rescale", "do_normalize", "do_convert_rgb", "do_pad"}
    for key in sorted(k for k in cfg if k.startswith("do_") and k not in known):
        if cfg[key]:
            raise ConversionError(f"{key}={cfg[key]!r} is not supported (vlmkit has no such step)")
    if not get("do_resize"):
        raise ConversionError("do_resize=False is not supported: the tiles would follow each image's size")
    resample = get("resample")
    if isinstance(resample, bool) or resample not in _PIL_FILTERS:
        raise ConversionError(f"resample {resample!r} is not supported; supported PIL codes: {_PIL_FILTERS}")
    if get("do_normalize"):
        mean, std = _three(get("image_mean"), "image_mean"), _three(get("image_std"), "image_std")
    else:
        mean, std = [0.0] * 3, [1.0] * 3
    factor = get("rescale_factor") if get("do_rescale") else 1.0
    try:
        return ImageTransform(size=_longest_edge(get("max_image_size"), "max_image_size"), resize_mode="squash",
                              interpolation=_PIL_FILTERS[resample], mean=tuple(mean), std=tuple(std),
                              rescale_factor=float(factor),
                              tile_longest_edge=_longest_edge(get("size"), "size"),
                              split=bool(get("do_image_splitting")))
    except ValueError as e:
        raise ConversionError(f"{e} (from {name} settings)") from None


def tiled_processor_to_hf(transform: ImageTransform, name: str = "SmolVLMImageProcessor") -> dict:
    """A tiled ImageTransform -> Idefics3 / SmolVLM image-processor settings."""
    t = transform
    if not t.tiled:
        raise ConversionError("this preprocessing does not split images; Idefics3 / SmolVLM processors always "
                              "resize to a longest edge first (set tile_longest_edge)")
    return {"image_processor_type": name, "do_resize": True, "size": {"longest_edge": t.tile_longest_edge},
            "resample": _PIL_CODES[t.interpolation], "do_image_splitting": t.split,
            "max_image_size": {"longest_edge": t.size}, "do_rescale": True, "rescale_factor": t.rescale_factor,
            "do_normalize": True, "image_mean": list(t.mean), "image_std": list(t.std), "do_convert_rgb": True,
            "do_pad": True}

"""Pixel parity of ImageTransform with transformers' CLIP / SigLIP image processors, both ways.

The PIL processors (what AutoImageProcessor returns in transformers 5 without torchvision) must
give our pixels to float rounding. The torchvision ones resample in float and round once, where
PIL rounds to uint8 after each pass; measured on photos at 32/224/336 px, they differ from the
PIL ones by at most 1 uint8 level for bilinear and 2 for bicubic (up to ~20 on upscaled noise),
and for nearest they pick other source pixels (up to 255 levels), so that one is not compared.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from vlmkit.convert.hf_io import ConversionError
from vlmkit.convert.hf_processor import image_processor_to_hf, image_transform_from_hf
from vlmkit.data.images import ImageTransform

transformers = pytest.importorskip("transformers")
NEW_API = int(transformers.__version__.split(".")[0]) >= 5  # 5: `Pil` classes and `backend=`

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
FILTERS = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3}


def _photos() -> dict[str, Image.Image]:
    """Real photographs shipped by matplotlib (a dependency) and scikit-learn (dev), if present."""
    found = {}
    try:
        from matplotlib import cbook
        found["hopper"] = Image.open(cbook.get_sample_data("grace_hopper.jpg"))
    except Exception:  # sample data can be stripped from a matplotlib install
        pass
    try:
        import sklearn.datasets
        for name in ("china", "flower"):
            found[name] = Image.open(os.path.join(os.path.dirname(sklearn.datasets.__file__), "images", f"{name}.jpg"))
    except Exception:
        pass
    return {k: v.convert("RGB") for k, v in found.items()}


def _synthetic() -> dict[str, Image.Image]:
    rng = np.random.default_rng(0)

    def scene(w, h):  # gradients, a hard edge and noise: smooth and sharp content at once
        y, x = np.mgrid[0:h, 0:w]
        a = np.stack([x * 255 / max(w - 1, 1), y * 255 / max(h - 1, 1), (x + y) % 64 * 4], -1)
        a[h // 3:, w // 2:] = 255 - a[h // 3:, w // 2:]
        return Image.fromarray(np.clip(a + rng.normal(0, 12, a.shape), 0, 255).astype(np.uint8))

    palette = Image.new("P", (9, 7), 0)
    palette.putpalette([0, 0, 0, 200, 30, 60] + [0] * 762)
    palette.paste(1, (2, 2, 6, 5))
    palette.info["transparency"] = 0
    return {
        "37x53": scene(37, 53), "640x480": scene(640, 480), "wide300x20": scene(300, 20),
        "tall20x300": scene(20, 300), "square33": scene(33, 33),
        "noise41x29": Image.fromarray(rng.integers(0, 256, (29, 41, 3), dtype=np.uint8)),
        "rgba1x1": Image.new("RGBA", (1, 1), (10, 200, 30, 100)),
        "L50x33": scene(50, 33).convert("L"),
        "P_transparent": palette,
    }


PHOTOS = _photos()
IMAGES = {**PHOTOS, **_synthetic()}

SETTINGS = {  # HF processor settings (class name, kwargs) as a preprocessor_config.json holds them
    "clip_36_crop_32": ("CLIPImageProcessor", dict(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32},
                                                   image_mean=CLIP_MEAN, image_std=CLIP_STD)),
    "clip_32_crop_32": ("CLIPImageProcessor", dict(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                                   image_mean=CLIP_MEAN, image_std=CLIP_STD)),
    "siglip_32": ("SiglipImageProcessor", dict(size={"height": 32, "width": 32}, image_mean=[0.5] * 3,
                                               image_std=[0.5] * 3)),
    "siglip_raw_pixels": ("SiglipImageProcessor", dict(size={"height": 24, "width": 24}, do_rescale=False,
                                                       do_normalize=False)),
}


def pil_processor(cls_name: str, **kwargs):
    cls = getattr(transformers, cls_name + "Pil") if NEW_API else getattr(transformers, cls_name)
    return cls(**kwargs)


def hf_pixels(processor, image: Image.Image) -> torch.Tensor:
    # float32, except with neither rescale nor normalise, where HF hands back the uint8 values
    return processor(image, return_tensors="pt")["pixel_values"][0].to(torch.float32)


def auto_processor(path, backend: str | None = None):
    if backend is None:
        return transformers.AutoImageProcessor.from_pretrained(path)
    if NEW_API:
        return transformers.AutoImageProcessor.from_pretrained(path, backend=backend)
    return transformers.AutoImageProcessor.from_pretrained(path, use_fast=backend == "torchvision")


def level_tolerance(levels: float, std) -> float:
    """`levels` uint8 steps after normalisation by the smallest std, plus float rounding."""
    return levels / 255 / min(std) + 1e-5


# --- parity with the PIL processors -----------------------------------------------------------

@pytest.mark.parametrize("resample", list(FILTERS))
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_matches_hf_pil_processor(setting, resample):
    cls_name, kwargs = SETTINGS[setting]
    kwargs = {**kwargs, "resample": FILTERS[resample]}
    processor = pil_processor(cls_name, **kwargs)
    ours = image_transform_from_hf({"image_processor_type": cls_name, **kwargs})
    assert ours.interpolation == resample
    for name, image in IMAGES.items():
        expected = hf_pixels(processor, image)
        got = ours(image)
        assert got.shape == expected.shape, name
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0, msg=lambda m: f"{setting} {name}: {m}")


def test_photos_are_available():
    # Not a skip: matplotlib is a dependency, so at least one real photo is always compared.
    assert PHOTOS, "no sample photo found (matplotlib's grace_hopper.jpg)"


# --- round trip through a written preprocessor_config.json ------------------------------------

ROUND_TRIP = [
    (ImageTransform(size=32, resize_mode="shortest_crop", shortest_edge=36, mean=tuple(CLIP_MEAN),
                    std=tuple(CLIP_STD)), "clip"),
    (ImageTransform(size=32, resize_mode="shortest_crop", shortest_edge=32, interpolation="bilinear"), "clip"),
    (ImageTransform(size=28, resize_mode="squash", mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6)), "clip"),
    (ImageTransform(size=32, interpolation="bilinear"), "siglip"),
    (ImageTransform(size=30, interpolation="nearest", rescale_factor=1.0, mean=(0.0,) * 3, std=(1.0,) * 3), "siglip"),
]


@pytest.mark.parametrize("transform, kind", ROUND_TRIP)
def test_round_trip_through_auto_image_processor(tmp_path, transform, kind):
    settings = image_processor_to_hf(transform, kind)
    assert image_transform_from_hf(settings) == transform
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(settings, indent=2))

    exact = auto_processor(tmp_path, "pil")
    assert type(exact).__name__.startswith({"clip": "CLIPImageProcessor", "siglip": "SiglipImageProcessor"}[kind])
    for name, image in IMAGES.items():
        torch.testing.assert_close(transform(image), hf_pixels(exact, image), atol=1e-5, rtol=0,
                                   msg=lambda m: f"{name}: {m}")

    # What a user gets by default: the PIL class here, the torchvision one where it is installed.
    default = auto_processor(tmp_path)
    if getattr(default, "backend", "pil") == "pil":
        atol = 1e-5
    elif transform.interpolation == "nearest":
        return  # torchvision's nearest picks other source pixels; nothing to bound
    else:
        atol = level_tolerance(1 if transform.interpolation == "bilinear" else 2, transform.std)
    for name, image in PHOTOS.items():
        torch.testing.assert_close(transform(image), hf_pixels(default, image), atol=atol, rtol=0,
                                   msg=lambda m: f"{type(default).__name__} {name}: {m}")


@pytest.mark.parametrize("resample, levels", [("bilinear", 1), ("bicubic", 2)])
@pytest.mark.parametrize("setting", ["clip_36_crop_32", "siglip_32"])
def test_torchvision_processor_within_measured_tolerance(tmp_path, setting, resample, levels):
    from transformers.utils import is_torchvision_available

    if not (NEW_API and is_torchvision_available()):
        pytest.skip("torchvision is not installed: transformers uses the PIL processors, compared exactly above")
    cls_name, kwargs = SETTINGS[setting]
    settings = {"image_processor_type": cls_name, **kwargs, "resample": FILTERS[resample]}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(settings))
    fast = auto_processor(tmp_path, "torchvision")
    ours = image_transform_from_hf(settings)
    for name, image in PHOTOS.items():
        torch.testing.assert_close(ours(image), hf_pixels(fast, image), atol=level_tolerance(levels, ours.std),
                                   rtol=0, msg=lambda m: f"{name}: {m}")


# --- reading settings -------------------------------------------------------------------------

def test_from_hf_class_defaults_and_old_spellings():
    clip = image_transform_from_hf({"image_processor_type": "CLIPImageProcessorFast"})
    assert clip == ImageTransform(size=224, resize_mode="shortest_crop", shortest_edge=224, interpolation="bicubic",
                                  mean=tuple(CLIP_MEAN), std=tuple(CLIP_STD))
    old = image_transform_from_hf({"feature_extractor_type": "CLIPFeatureExtractor", "size": 336, "crop_size": 336,
                                   "resample": 2, "image_mean": None})
    assert (old.size, old.shortest_edge, old.interpolation, old.mean) == (336, 336, "bilinear", tuple(CLIP_MEAN))
    siglip = image_transform_from_hf({"image_processor_type": "SiglipImageProcessor", "size": [64, 64]})
    assert siglip == ImageTransform(size=64, resize_mode="squash", interpolation="bicubic")
    llava = image_transform_from_hf({"image_processor_type": "LlavaImageProcessor", "do_pad": False,
                                     "size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336}})
    assert (llava.size, llava.shortest_edge, llava.resize_mode) == (336, 336, "shortest_crop")
    raw = image_transform_from_hf({"image_processor_type": "SiglipImageProcessorPil", "do_rescale": False,
                                   "do_normalize": False, "image_mean": 0.3})
    assert (raw.rescale_factor, raw.mean, raw.std) == (1.0, (0.0,) * 3, (1.0,) * 3)
    scalar = image_transform_from_hf({"image_processor_type": "SiglipImageProcessor", "image_mean": 0.25})
    assert scalar.mean == (0.25,) * 3


CLIP = {"image_processor_type": "CLIPImageProcessor"}


@pytest.mark.parametrize("settings, key", [
    ({"image_processor_type": "LlavaNextImageProcessor"}, "image_processor_type"),
    ({}, "image_processor_type"),
    ({**CLIP, "resample": 4}, "resample"),
    ({**CLIP, "resample": 5}, "resample"),
    ({"image_processor_type": "LlavaImageProcessor", "do_pad": True}, "do_pad"),
    ({**CLIP, "do_resize": False}, "do_resize"),
    ({**CLIP, "do_center_crop": False}, "do_center_crop"),
    ({**CLIP, "crop_size": {"height": 224, "width": 200}}, "crop_size"),
    ({**CLIP, "size": {"shortest_edge": 200}}, "crop_size"),
    ({**CLIP, "size": {"shortest_edge": 224, "longest_edge": 448}}, "size"),
    ({"image_processor_type": "SiglipImageProcessor", "size": {"height": 224, "width": 256}}, "size"),
    ({"image_processor_type": "SiglipImageProcessor", "do_center_crop": True,
      "crop_size": {"height": 200, "width": 200}}, "crop_size"),
    ({**CLIP, "image_mean": [0.5, 0.5]}, "image_mean"),
    ({**CLIP, "image_std": [0.5, 0.0, 0.5]}, "image_std"),
    ({**CLIP, "rescale_factor": -1.0}, "rescale_factor"),
])
def test_from_hf_refuses_naming_the_key(settings, key):
    with pytest.raises(ConversionError, match=key):
        image_transform_from_hf(settings)


# --- writing settings -------------------------------------------------------------------------

@pytest.mark.parametrize("transform, kind, field", [
    (ImageTransform(size=32, resize_mode="pad"), "clip", "pad"),
    (ImageTransform(size=32, resize_mode="shortest_crop"), "clip", "shortest_edge"),
    (ImageTransform(size=32, resize_mode="shortest_crop", shortest_edge=36), "siglip", "shortest_crop"),
    (ImageTransform(size=32), "vit", "kind"),
])
def test_to_hf_refuses_naming_the_field(transform, kind, field):
    with pytest.raises(ConversionError, match=field):
        image_processor_to_hf(transform, kind)


def test_to_hf_layouts():
    clip = image_processor_to_hf(ImageTransform(size=32, resize_mode="shortest_crop", shortest_edge=36), "clip")
    assert clip["size"] == {"shortest_edge": 36} and clip["crop_size"] == {"height": 32, "width": 32}
    assert clip["image_processor_type"] == "CLIPImageProcessor" and clip["resample"] == 3
    siglip = image_processor_to_hf(ImageTransform(size=32, interpolation="bilinear"), "siglip")
    assert siglip["size"] == {"height": 32, "width": 32} and "crop_size" not in siglip
    assert siglip["image_processor_type"] == "SiglipImageProcessor" and siglip["resample"] == 2


# --- the new ImageTransform fields ------------------------------------------------------------

@pytest.mark.parametrize("mode", ["squash", "shortest_crop", "pad"])
def test_defaults_reproduce_the_original_pixels(mode):
    # The original pipeline: float32 division by 255, then mean/std, on the same resize.
    t = ImageTransform(size=24, resize_mode=mode, mean=tuple(CLIP_MEAN), std=tuple(CLIP_STD))
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    for image in IMAGES.values():
        before = torch.from_numpy(np.asarray(t.resize(image), dtype=np.float32) / 255.0).permute(2, 0, 1)
        assert torch.equal(t(image), ((before - mean) / std).contiguous())


def test_new_fields_stay_out_of_old_style_dicts():
    old = {"size": 96, "resize_mode": "shortest_crop", "mean": [0.5] * 3, "std": [0.5] * 3,
           "interpolation": "bicubic", "random_crop_scale": 1.0}  # a preprocessor.json from before
    t = ImageTransform.from_dict(old)
    assert t.shortest_edge is None and t.rescale_factor == 1 / 255 and t.to_dict() == old
    new = ImageTransform(size=32, resize_mode="shortest_crop", shortest_edge=36, rescale_factor=1.0)
    assert ImageTransform.from_dict(json.loads(json.dumps(new.to_dict()))) == new


@pytest.mark.parametrize("kwargs, field", [
    (dict(size=32, resize_mode="shortest_crop", shortest_edge=31), "shortest_edge"),
    (dict(size=32, resize_mode="squash", shortest_edge=36), "shortest_edge"),
    (dict(size=32, resize_mode="shortest_crop", shortest_edge=36.0), "shortest_edge"),
    (dict(rescale_factor=0.0), "rescale_factor"),
    (dict(rescale_factor="x"), "rescale_factor"),
])
def test_new_fields_are_validated(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ImageTransform(**kwargs)


def test_shortest_edge_on_a_sliver_and_in_training():
    # 4M x 1 resized to a short side of 8 would be 256M pixels: the crop window is resized instead.
    t = ImageTransform(size=8, resize_mode="shortest_crop", shortest_edge=8, random_crop_scale=0.5)
    x = t(Image.new("RGB", (4_000_000, 1), (255, 255, 255)))
    assert x.shape == (3, 8, 8) and torch.allclose(x, torch.ones_like(x))
    import random

    a = t(IMAGES["640x480"], train=True, rng=random.Random(3))
    assert a.shape == (3, 8, 8) and torch.equal(a, t(IMAGES["640x480"], train=True, rng=random.Random(3)))

"""Tests for vlmkit.data.images: safe decoding of awkward inputs and the pixel transform."""
from __future__ import annotations

import io
import json
import random
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from vlmkit.data.images import ImageDecodeError, ImageTransform, load_image


def encode(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but holds no pixel data (cheap 'bomb')."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


RED = Image.new("RGB", (16, 8), (255, 0, 0))


# --- decoding errors -------------------------------------------------------------------------

def test_truncated_png():
    data = encode(Image.effect_noise((64, 64), 50).convert("RGB"))
    with pytest.raises(ImageDecodeError, match="truncated or corrupt.*<bytes>"):
        load_image(data[: len(data) // 2])


def test_corrupt_png_data(tmp_path):
    data = bytearray(encode(Image.effect_noise((64, 64), 50).convert("RGB")))
    data[len(data) // 2: len(data) // 2 + 40] = b"\x00" * 40  # breaks IDAT (and its CRC)
    path = tmp_path / "bad.png"
    path.write_bytes(bytes(data))
    with pytest.raises(ImageDecodeError, match="bad.png"):
        load_image(path)


def test_not_an_image():
    with pytest.raises(ImageDecodeError, match="not an image.*<bytes>"):
        load_image(b"this is a text file, not a picture")


def test_missing_and_empty_file(tmp_path):
    with pytest.raises(ImageDecodeError, match="file not found.*nope.png"):
        load_image(tmp_path / "nope.png")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageDecodeError, match="empty"):
        load_image(str(tmp_path / "empty.png"))


def test_decompression_bomb_rejected_from_header_without_touching_pil_limit():
    before = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's bomb warning must not fire either
        with pytest.raises(ImageDecodeError, match="too large.*100000x100000"):
            load_image(png_header_only(100_000, 100_000))
    assert Image.MAX_IMAGE_PIXELS == before


def test_max_pixels_is_respected():
    with pytest.raises(ImageDecodeError, match="max_pixels=100"):
        load_image(encode(RED), max_pixels=100)
    assert load_image(encode(RED), max_pixels=128).size == (16, 8)


def test_zero_size_image():
    with pytest.raises(ImageDecodeError):
        load_image(png_header_only(0, 10))  # PIL refuses the header itself
    with pytest.raises(ImageDecodeError, match="zero-size.*<PIL image>"):
        load_image(Image.new("RGB", (0, 5)))


# --- modes and orientation -------------------------------------------------------------------

def rgb_at(im: Image.Image, xy=(0, 0)) -> tuple[int, int, int]:
    assert im.mode == "RGB"
    return im.getpixel(xy)


def test_tiny_and_wide_images():
    assert load_image(encode(Image.new("RGB", (1, 1), (1, 2, 3)))).size == (1, 1)
    wide = load_image(encode(Image.new("RGB", (5000, 1), (9, 9, 9))))
    assert wide.size == (5000, 1)


def test_alpha_modes_composite_on_white():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert rgb_at(load_image(encode(rgba))) == (255, 255, 255)
    half = Image.new("RGBA", (4, 4), (0, 0, 0, 128))
    assert rgb_at(load_image(half))[0] == pytest.approx(127, abs=2)
    la = Image.new("LA", (4, 4), (0, 0))
    assert rgb_at(load_image(encode(la))) == (255, 255, 255)


def test_palette_with_transparency():
    p = Image.new("P", (4, 4), 0)
    p.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    p.putpixel((1, 1), 1)
    out = load_image(encode(p, "GIF", transparency=0))
    assert rgb_at(out) == (255, 255, 255) and rgb_at(out, (1, 1)) == (255, 0, 0)


def test_cmyk_and_grey():
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # red
    assert rgb_at(load_image(encode(cmyk, "TIFF"))) == (255, 0, 0)
    assert rgb_at(load_image(encode(Image.new("L", (2, 2), 77)))) == (77, 77, 77)


def test_16_bit_and_float_are_scaled_not_clipped():
    a = np.array([[0, 32768, 65535]], dtype=np.uint16)
    out = load_image(encode(Image.fromarray(a)))  # 16-bit PNG opens as I;16
    assert [out.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]
    i32 = Image.fromarray(a.astype(np.int32))  # mode "I"
    assert rgb_at(load_image(i32), (1, 0)) == (128, 128, 128)
    f = Image.fromarray(np.full((2, 2), 0.5, dtype=np.float32))  # mode "F", [0, 1]
    assert rgb_at(load_image(f)) == (128, 128, 128)


def test_animated_gif_gives_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in [(255, 0, 0), (0, 0, 255)]]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    assert rgb_at(load_image(data)) == (255, 0, 0)


def test_exif_orientation_is_applied():
    im = Image.new("RGB", (40, 20), (0, 128, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    out = load_image(encode(im, "JPEG", exif=exif))
    assert out.size == (20, 40)


# --- transform -------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["squash", "shortest_crop", "pad"])
@pytest.mark.parametrize("size", [(1, 1), (300, 2), (17, 40)])
def test_transform_shape_and_range(mode, size):
    t = ImageTransform(size=32, resize_mode=mode)
    x = t(Image.new("RGB", size, (255, 255, 255)))
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert x.max().item() == pytest.approx(1.0)  # white -> (1 - 0.5) / 0.5


def test_transform_normalisation():
    t = ImageTransform(size=4, mean=(0.0, 0.5, 1.0), std=(1.0, 0.5, 0.25))
    x = t(Image.new("RGB", (8, 8), (255, 255, 255)))
    assert torch.allclose(x[:, 0, 0], torch.tensor([1.0, 1.0, 0.0]))


def test_resize_modes_differ_as_intended():
    # Three vertical bands: red | green | blue, three times wider than tall.
    bands = np.zeros((10, 30, 3), np.uint8)
    bands[:, :10, 0] = bands[:, 10:20, 1] = bands[:, 20:, 2] = 255
    im = Image.fromarray(bands)
    crop = ImageTransform(size=9, resize_mode="shortest_crop", interpolation="nearest")(im)
    assert (crop[1] > 0.9).all() and (crop[0] < -0.9).all()  # only the green centre survives
    squash = ImageTransform(size=9, resize_mode="squash", interpolation="nearest")(im)
    assert squash[0, 4, 0] > 0.9 and squash[2, 4, 8] > 0.9
    pad = ImageTransform(size=9, resize_mode="pad", interpolation="nearest")(im)
    assert pad[:, 0, :].abs().max() < 0.01  # mean-coloured padding normalises to ~0


def test_random_crop_only_in_training():
    im = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    t = ImageTransform(size=16, random_crop_scale=0.3)
    assert torch.equal(t(im), t(im))
    a, b = t(im, train=True, rng=random.Random(1)), t(im, train=True, rng=random.Random(1))
    assert torch.equal(a, b) and a.shape == (3, 16, 16)
    assert not torch.equal(a, t(im))


@pytest.mark.parametrize("field, value", [("size", 0), ("resize_mode", "stretch"), ("std", (1, 0, 1)),
                                          ("mean", (0.5, 0.5)), ("interpolation", "box"),
                                          ("random_crop_scale", 0.0)])
def test_transform_validation_names_field(field, value):
    with pytest.raises(ValueError, match=field):
        ImageTransform(**{field: value})


def test_to_dict_round_trip_and_unknown_key():
    t = ImageTransform(size=96, resize_mode="pad", mean=(0.1, 0.2, 0.3), interpolation="bilinear")
    back = ImageTransform.from_dict(json.loads(json.dumps(t.to_dict())))
    assert back == t and isinstance(back.mean, tuple)
    with pytest.raises(ValueError, match="crop_size"):
        ImageTransform.from_dict({**t.to_dict(), "crop_size": 3})

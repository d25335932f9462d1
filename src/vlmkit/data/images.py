"""Safe image decoding (`load_image`) and the model-side pixel pipeline (`ImageTransform`).

`load_image` turns a path, raw bytes or a PIL image into a fully decoded RGB image, or raises
`ImageDecodeError` saying what is wrong and where. `ImageTransform` resizes and normalises an
RGB image into a `[3, size, size]` float tensor; its `to_dict()` is a checkpoint's
preprocessor.json.
"""
from __future__ import annotations

import io
import math
import os
import random
import threading
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image, ImageOps

from vlmkit.config import ImageDataConfig


class ImageDecodeError(ValueError):
    """An image that cannot be used: missing, not an image, corrupt, too large or empty."""

    def __init__(self, problem: str, source: str):
        super().__init__(f"{problem}: {source}")
        self.problem = problem
        self.source = source


# PIL's own bomb guard (a process-wide setting) warns or raises at open time, before we can
# apply the caller's `max_pixels`. We lift it just while the header is parsed, under a lock
# so concurrent loaders never restore a stale value.
_PIL_GUARD_LOCK = threading.Lock()


@contextmanager
def _pil_guard_lifted() -> Iterator[None]:
    with _PIL_GUARD_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def load_image(src: str | os.PathLike | bytes | Image.Image, max_pixels: int = 64_000_000) -> Image.Image:
    """Decode `src` to an RGB image: EXIF orientation applied, first frame, fully loaded."""
    if isinstance(src, Image.Image):
        name, im = "<PIL image>", src
        _check_size(im.size, max_pixels, name)
    else:
        name, fp = _open_source(src)
        try:
            with _pil_guard_lifted():
                im = Image.open(fp)
        except Image.UnidentifiedImageError as e:
            raise ImageDecodeError("not an image (unrecognised format)", name) from e
        except Exception as e:  # PIL signals bad headers with many exception types
            raise ImageDecodeError(f"corrupt image header ({e})", name) from e
        # Checked on the header's claim, before a single pixel is decompressed.
        _check_size(im.size, max_pixels, name)
    try:
        im.load()  # decode now so corruption surfaces here, not later in a worker
    except Exception as e:  # truncated data is OSError; broken chunks can be anything
        raise ImageDecodeError(f"truncated or corrupt image data ({e})", name) from e
    _check_size(im.size, max_pixels, name)  # some formats (GIF) may grow while decoding
    try:
        im = ImageOps.exif_transpose(im)
    except Exception:
        pass  # malformed EXIF only loses the orientation; the pixels are still good
    return _to_rgb(im)


def _open_source(src: str | os.PathLike | bytes) -> tuple[str, Any]:
    if isinstance(src, (bytes, bytearray, memoryview)):
        if len(src) == 0:
            raise ImageDecodeError("empty data", "<bytes>")
        return "<bytes>", io.BytesIO(bytes(src))
    path = os.fspath(src)
    if not os.path.isfile(path):
        raise ImageDecodeError("file not found", str(path))
    if os.path.getsize(path) == 0:
        raise ImageDecodeError("empty file", str(path))
    with open(path, "rb") as f:  # read whole file so no handle stays open after decoding
        return str(path), io.BytesIO(f.read())


def _check_size(size: tuple[int, int], max_pixels: int, name: str) -> None:
    w, h = size
    if w <= 0 or h <= 0:
        raise ImageDecodeError(f"zero-size image ({w}x{h})", name)
    if w * h > max_pixels:
        raise ImageDecodeError(f"image too large ({w}x{h} = {w * h} pixels > max_pixels={max_pixels})", name)


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB; transparency is composited onto white."""
    if im.mode == "RGB":
        return im
    if im.mode.startswith("I") or im.mode == "F":
        return Image.fromarray(_to_uint8(np.asarray(im))).convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def _to_uint8(a: np.ndarray) -> np.ndarray:
    # PIL's own I/F -> L conversion clips instead of scaling, which turns 16-bit images white.
    if a.dtype.kind == "f":  # float images: [0, 1] if they fit, else assume [0, 255]
        a = np.nan_to_num(a.astype(np.float64))
        scale = 255.0 if a.size and a.max() <= 1.0 else 1.0
        return np.clip(np.rint(a * scale), 0, 255).astype(np.uint8)
    # Integer modes (I;16*, I) hold 16-bit data: 65535 / 257 = 255 maps the range exactly.
    return np.rint(np.clip(a.astype(np.float64), 0, 65535) / 257.0).astype(np.uint8)


_RESAMPLE = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
             "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}
_RESIZE_MODES = ("squash", "shortest_crop", "pad")
# Above this many pixels the intermediate of the `shortest_edge` resize is not materialised.
_MAX_RESIZED_PIXELS = 1 << 25
_LATER_FIELDS = ("shortest_edge", "rescale_factor", "tile_longest_edge", "split")
# Idefics3's bound on any side after its first resize ("4k resolution as absolute maximum").
_MAX_TILED_SIDE = 4096


def _tiled_size(height: int, width: int, longest: int) -> tuple[int, int]:
    """(height, width) with the longest side at `longest`, the other in proportion and even, at most 4096."""
    aspect = width / height
    if width >= height:
        width, height = longest, int(longest / aspect)
        height += height % 2
    else:
        height, width = longest, int(longest * aspect)
        width += width % 2
    height, width = max(height, 1), max(width, 1)
    aspect = width / height
    if width >= height and width > _MAX_TILED_SIDE:
        width, height = _MAX_TILED_SIDE, int(_MAX_TILED_SIDE / aspect)
    elif height > width and height > _MAX_TILED_SIDE:
        height, width = _MAX_TILED_SIDE, int(_MAX_TILED_SIDE * aspect)
    return max(height, 1), max(width, 1)


def _whole_tiles(height: int, width: int, tile: int) -> tuple[int, int]:
    """(height, width) rounded up to whole tiles, the longer side first, as Idefics3 rounds."""
    aspect = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / aspect) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * aspect) / tile) * tile
    return height, width


@dataclass
class ImageTransform:
    """RGB image -> normalised float tensor [3, size, size].

    resize_mode: "squash" (ignore aspect), "shortest_crop" (shortest side to `size`, centre
    crop, as CLIP does) or "pad" (letterbox with the mean colour, so padding normalises to 0).
    shortest_edge (only with "shortest_crop"): resize the whole image so its shortest side is
    this many pixels, then centre-crop `size` x `size`, in Hugging Face CLIPImageProcessor's
    order and rounding, which gives its pixels exactly; None keeps vlmkit's original crop of the
    centred square resized to `size` (same geometry up to sub-pixel offsets, other pixels).
    rescale_factor: uint8 value -> float before mean/std (HF's rescale_factor; 1.0 when a
    processor has do_rescale=False).
    random_crop_scale < 1 adds, only when `train=True`, a random crop of that fraction..1 of
    the area with the aspect kept; off by default because `shapes` captions name positions.
    tile_longest_edge (with resize_mode "squash"): image splitting as Idefics3 / SmolVLM do it,
    so a tower of `size` pixels reads a large image (see `tiles`); None turns it off. `split`
    False keeps only the global view (Idefics3's do_image_splitting=False).
    """

    size: int = 224
    resize_mode: str = "squash"
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    interpolation: str = "bicubic"
    random_crop_scale: float = 1.0
    shortest_edge: int | None = None
    rescale_factor: float = 1 / 255
    tile_longest_edge: int | None = None
    split: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"size must be a positive int, got {self.size!r}")
        if self.resize_mode not in _RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {_RESIZE_MODES}, got {self.resize_mode!r}")
        if self.interpolation not in _RESAMPLE:
            raise ValueError(f"interpolation must be one of {tuple(_RESAMPLE)}, got {self.interpolation!r}")
        for name in ("mean", "std"):
            value = getattr(self, name)
            try:
                value = tuple(float(v) for v in value)
            except (TypeError, ValueError):
                raise ValueError(f"{name} must be 3 numbers, got {value!r}") from None
            if len(value) != 3 or (name == "std" and min(value) <= 0):
                raise ValueError(f"{name} must be 3 numbers{' > 0' if name == 'std' else ''}, got {value!r}")
            setattr(self, name, value)  # lists from JSON become tuples
        if not 0.0 < float(self.random_crop_scale) <= 1.0:
            raise ValueError(f"random_crop_scale must be in (0, 1], got {self.random_crop_scale!r}")
        if self.shortest_edge is not None:
            se = self.shortest_edge
            if isinstance(se, bool) or not isinstance(se, int) or se < self.size:
                raise ValueError(f"shortest_edge must be an int >= size ({self.size}) or None, got {se!r}")
            if self.resize_mode != "shortest_crop":
                raise ValueError(f"shortest_edge is only used with resize_mode 'shortest_crop', "
                                 f"got resize_mode {self.resize_mode!r}")
        try:
            self.rescale_factor = float(self.rescale_factor)
        except (TypeError, ValueError):
            raise ValueError(f"rescale_factor must be a number > 0, got {self.rescale_factor!r}") from None
        if not (self.rescale_factor > 0 and math.isfinite(self.rescale_factor)):
            raise ValueError(f"rescale_factor must be a number > 0, got {self.rescale_factor!r}")
        edge = self.tile_longest_edge
        if edge is not None:
            if isinstance(edge, bool) or not isinstance(edge, int) or edge < self.size:
                raise ValueError(f"tile_longest_edge must be an int >= size ({self.size}) or None, got {edge!r}")
            if self.resize_mode != "squash":
                raise ValueError(f"tile_longest_edge needs resize_mode 'squash' (tiles and the global view are "
                                 f"squashed), got {self.resize_mode!r}")

    @property
    def tiled(self) -> bool:
        return self.tile_longest_edge is not None

    def __call__(self, img: Image.Image, train: bool = False, rng: random.Random | None = None) -> torch.Tensor:
        img = _to_rgb(img)
        if self.tiled:  # one tensor per image: the global view (`tiles` gives all views)
            return self.tiles(img)[0][-1]
        w, h = img.size
        box = (0.0, 0.0, float(w), float(h))  # region of the source to use, in source pixels
        if train and self.random_crop_scale < 1.0:
            rng = rng if rng is not None else random.Random()
            side = rng.uniform(self.random_crop_scale, 1.0) ** 0.5  # area fraction -> side fraction
            cw, ch = w * side, h * side
            x0, y0 = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
            box = (x0, y0, x0 + cw, y0 + ch)
        return self._normalise(self._resize(img, box))

    def _normalise(self, img: Image.Image) -> torch.Tensor:
        # float64 product then float32, as HF's rescale does; for 1/255 this equals the float32
        # division vlmkit used before, bit for bit, for every uint8 value.
        pixels = np.asarray(img, dtype=np.float64) * self.rescale_factor
        x = torch.from_numpy(pixels.astype(np.float32)).permute(2, 0, 1)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)
        return ((x - mean) / std).contiguous()

    def tiles(self, img: Image.Image) -> tuple[torch.Tensor, int, int]:
        """All views of an image, normalised: (pixels [n, 3, size, size], rows, cols); see `views`."""
        views, rows, cols = self.views(img)
        return torch.stack([self._normalise(v) for v in views]), rows, cols

    def views(self, img: Image.Image) -> tuple[list[Image.Image], int, int]:
        """All views of an image as RGB images of size x size: (views, rows, cols).

        Untiled: the one view, rows = cols = 0. Tiled, in Idefics3's order and rounding (so
        the pixels equal transformers'): the longest side goes to `tile_longest_edge` (the
        other kept in proportion, made even), both sides then up to whole tiles of `size`;
        an image larger than one tile becomes rows x cols tiles, row by row, followed by the
        whole image squashed to one tile (the global view). An image of one tile, or any
        image with `split` False, is the global view alone (rows = cols = 0).
        """
        img = _to_rgb(img)
        if not self.tiled:
            return [self.resize(img)], 0, 0
        s, resample = self.size, _RESAMPLE[self.interpolation]
        img = img.resize(_tiled_size(img.height, img.width, self.tile_longest_edge)[::-1], resample)
        if self.split:
            img = img.resize(_whole_tiles(img.height, img.width, s)[::-1], resample)
        rows = cols = 0
        views = []
        if self.split and (img.height > s or img.width > s):
            rows, cols = img.height // s, img.width // s
            views = [img.crop((c * s, r * s, (c + 1) * s, (r + 1) * s)) for r in range(rows) for c in range(cols)]
        views.append(img.resize((s, s), resample))
        return views, rows, cols

    def resize(self, img: Image.Image) -> Image.Image:
        """The geometric part alone (eval mode): an RGB image of size x size."""
        img = _to_rgb(img)
        return self._resize(img, (0.0, 0.0, float(img.size[0]), float(img.size[1])))

    def _resize(self, img: Image.Image, box: tuple[float, float, float, float]) -> Image.Image:
        # Resizing straight from a source box avoids materialising huge intermediates
        # (a 10000x1 image upscaled on its short side would need gigabytes).
        s, resample = self.size, _RESAMPLE[self.interpolation]
        x0, y0, x1, y1 = box
        bw, bh = x1 - x0, y1 - y0
        if self.resize_mode == "squash":
            return img.resize((s, s), resample, box=box)
        if self.resize_mode == "shortest_crop" and self.shortest_edge is not None:
            return self._resize_then_crop(img, box, resample)
        if self.resize_mode == "shortest_crop":
            side = min(bw, bh)
            cx, cy = x0 + (bw - side) / 2, y0 + (bh - side) / 2
            return img.resize((s, s), resample, box=(cx, cy, cx + side, cy + side))
        # pad: longest side to `s`, then centre on a mean-coloured square
        scale = s / max(bw, bh)
        nw, nh = max(1, min(s, round(bw * scale))), max(1, min(s, round(bh * scale)))
        fill = tuple(int(round(m * 255)) for m in self.mean)
        canvas = Image.new("RGB", (s, s), fill)
        canvas.paste(img.resize((nw, nh), resample, box=box), ((s - nw) // 2, (s - nh) // 2))
        return canvas

    def _resize_then_crop(self, img: Image.Image, box: tuple[float, float, float, float],
                          resample: Image.Resampling) -> Image.Image:
        # Hugging Face's CLIP order: the short side to `shortest_edge` with the long side
        # truncated to int (HF and torchvision compute `int(edge * long / short)`), resampled on
        # uint8 by PIL, then a centre crop at floor offsets. Resizing the full box and cropping is
        # what makes the pixels equal: resizing only the crop window samples differently.
        x0, y0, x1, y1 = box
        bw, bh = x1 - x0, y1 - y0
        edge, s = self.shortest_edge, self.size
        if bw <= bh:
            nw, nh = edge, int(edge * bh / bw)
        else:
            nw, nh = int(edge * bw / bh), edge
        left, top = (nw - s) // 2, (nh - s) // 2
        if nw * nh <= _MAX_RESIZED_PIXELS:
            return img.resize((nw, nh), resample, box=box).crop((left, top, left + s, top + s))
        # A sliver (say 10000x1) would need gigabytes at full size: resize just the crop
        # window; same geometry, but the pixels then differ from HF's by resampling detail.
        sx, sy = bw / nw, bh / nh
        window = (x0 + left * sx, y0 + top * sy, x0 + (left + s) * sx, y0 + (top + s) * sy)
        return img.resize((s, s), resample, box=window)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)  # JSON has no tuples
        # Fields added later are written only when they differ from their defaults, so a
        # checkpoint that does not use them stays readable by vlmkit versions without them.
        for f in fields(self):
            if f.name in _LATER_FIELDS and d[f.name] == f.default:
                del d[f.name]
        return d

    @classmethod
    def for_data(cls, data: ImageDataConfig, tower_size: int) -> "ImageTransform":
        """The preprocessing a run's data config asks for (`data.image_size` defaults to the tower's;
        a Stage 2 config's `split_longest_edge` turns image splitting on)."""
        return cls(size=data.image_size or tower_size, resize_mode=data.resize_mode, mean=data.mean, std=data.std,
                   tile_longest_edge=getattr(data, "split_longest_edge", None))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ImageTransform":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ImageTransform key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**d)

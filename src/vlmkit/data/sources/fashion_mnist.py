"""Fashion-MNIST from local IDX files (Debian package `dataset-fashion-mnist`), captioned by template.

The arrays are parsed once per process with numpy and kept in memory as uint8; `.images` and
`.labels` give batch code direct access without going through PIL.
"""
from __future__ import annotations

import functools
import gzip
import os
from pathlib import Path

import numpy as np

from .base import LabelledArrays

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
ROOT_ENV = "VLMKIT_FASHION_MNIST"
# Names chosen to read naturally in "a photo of the {}." (not "a trouser", "a ankle boot").
CLASSES = ["t-shirt", "trousers", "pullover", "dress", "coat",
           "sandal", "shirt", "sneaker", "bag", "ankle boot"]
TEMPLATES = ["a photo of the {}.", "a black and white photo of the {}.", "a picture of the {}.",
             "a low resolution photo of the {}.", "a grayscale photo of the {}.", "a small photo of the {}."]
_PREFIX = {"train": "train", "test": "t10k"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parse an IDX file (gzipped or raw) of unsigned bytes; ValueError names a malformed file."""
    path = Path(path)
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == b"\x1f\x8b":  # gzip magic, whatever the file is called
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise ValueError(f"{path}: corrupt gzip data ({e})") from e
    # Header: two zero bytes, type code (0x08 = unsigned byte), number of dimensions,
    # then one big-endian uint32 per dimension.
    if len(data) < 4 or data[0:2] != b"\x00\x00" or data[2] != 0x08 or not 1 <= data[3] <= 4:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (bad magic number {data[:4].hex()})")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: IDX header truncated")
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    expected = int(np.prod(shape))
    if len(data) - header != expected:
        raise ValueError(f"{path}: IDX header says shape {shape} ({expected} bytes) "
                         f"but the file holds {len(data) - header} bytes of data")
    return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


def _find(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):  # the Debian package ships .gz; accept unpacked copies too
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}[.gz] not found in {root}. Install it with "
        f"`apt-get install dataset-fashion-mnist`, or set {ROOT_ENV} to a folder holding the IDX files.")


@functools.lru_cache(maxsize=4)
def _load(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(f"{images_path}: expected images of shape [N, 28, 28], got {list(images.shape)}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise ValueError(f"{labels_path}: expected {len(images)} labels, got shape {list(labels.shape)}")
    if labels.size and labels.max() >= len(CLASSES):
        raise ValueError(f"{labels_path}: label {labels.max()} out of range 0..{len(CLASSES) - 1}")
    return images, labels  # read-only views (np.frombuffer), safe to share from the cache


class FashionMNIST(LabelledArrays):
    """28x28 greyscale clothing images (as RGB) with captions like "a photo of the coat."."""

    name = "fashion_mnist"
    classes = CLASSES
    templates = TEMPLATES

    def __init__(self, split: str = "train", root: str | os.PathLike | None = None,
                 keep_classes: list[str] | None = None, seed: int = 0):
        if split not in _PREFIX:
            raise ValueError(f"split must be one of {tuple(_PREFIX)}, got {split!r}")
        root = Path(root or os.environ.get(ROOT_ENV) or DEFAULT_ROOT)
        prefix = _PREFIX[split]
        images, labels = _load(_find(root, f"{prefix}-images-idx3-ubyte"),
                               _find(root, f"{prefix}-labels-idx1-ubyte"))
        self.split, self.seed = split, seed
        # Caption template per ORIGINAL index, so `keep_classes` does not change any caption.
        split_id = list(_PREFIX).index(split)
        template_ids = np.random.default_rng([seed, split_id]).integers(len(TEMPLATES), size=len(labels))
        if keep_classes is None:
            self.indices = np.arange(len(labels))
            self.images, self.labels, self.template_ids = images, labels, template_ids
        else:
            unknown = [c for c in keep_classes if c not in CLASSES]
            if unknown:
                raise ValueError(f"unknown class name(s) {unknown}; classes are {CLASSES}")
            keep = [CLASSES.index(c) for c in keep_classes]
            # Labels keep the full 10-class indexing; only the examples are restricted.
            self.indices = np.flatnonzero(np.isin(labels, keep))
            self.images, self.labels = images[self.indices], labels[self.indices]
            self.template_ids = template_ids[self.indices]


"""Your own image-caption pairs from a .jsonl or .csv file (or a folder holding captions.*).

Each record names an image (relative paths are relative to the captions file) and a caption.
The file is validated eagerly (errors name file and line); images are not: a missing or corrupt
one raises `ImageDecodeError` on access, which the loader skips and counts.
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from ..images import load_image
from .base import Example, Source

DIR_FILES = ("captions.jsonl", "captions.csv")


def _check_record(image: object, caption: object, where: str) -> tuple[str, str]:
    if not isinstance(image, str) or not image.strip():
        raise ValueError(f"{where}: 'image' must be a non-empty string, got {image!r}")
    if not isinstance(caption, str) or not caption.strip():
        raise ValueError(f"{where}: empty or missing caption")
    return image.strip(), caption.strip()


def _read_jsonl(path: Path) -> list[tuple[str, str]]:
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue  # blank lines (e.g. a trailing newline) are harmless
            where = f"{path}, line {lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{where}: expected an object with 'image' and 'caption'")
            records.append(_check_record(obj.get("image"), obj.get("caption"), where))
    return records


def _read_csv(path: Path) -> list[tuple[str, str]]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("image", "caption") if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}, line 1: header lacks column(s) {missing} (found {reader.fieldnames})")
        records = []
        for row in reader:
            # line_num counts physical lines read so far, so it is right even for quoted newlines.
            where = f"{path}, line {reader.line_num}"
            if None in row:
                raise ValueError(f"{where}: more fields than the header has columns")
            records.append(_check_record(row["image"], row["caption"], where))
    return records


class ImageTextPairs(Source):
    """A captions file, or a folder with captions.jsonl / captions.csv, as a `Source`."""

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        if path.is_dir():
            found = [path / n for n in DIR_FILES if (path / n).is_file()]
            if not found:
                raise FileNotFoundError(f"{path}: folder has none of {list(DIR_FILES)}")
            path = found[0]  # captions.jsonl wins if both exist
        if not path.is_file():
            raise FileNotFoundError(f"captions file not found: {path}")
        if path.suffix == ".jsonl":
            records = _read_jsonl(path)
        elif path.suffix == ".csv":
            records = _read_csv(path)
        else:
            raise ValueError(f"{path}: expected a .jsonl or .csv captions file")
        if not records:
            raise ValueError(f"{path}: no image-caption pairs")
        self.path = path
        self.name = path.parent.name if path.name in DIR_FILES else path.stem
        # Relative to the captions file; `/` keeps an absolute path as it is.
        self.image_paths = [path.parent / image for image, _ in records]
        self.captions = [r[1] for r in records]

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> Example:
        image_path = self.image_paths[index]
        return Example(load_image(image_path), self.captions[index], None, {"image_path": str(image_path)})

"""The built-in procedural world: coloured shapes on a 3x3 grid, captioned exactly.

A `Scene` is a list of `Obj`s (shape, colour, size, grid cell, pixel box); the image, the
caption and (later) VQA questions and grounding boxes are all functions of it. A few
colour-shape pairs (`HELDOUT_COMBOS`) never occur in "train"/"test" and occur exactly once
per "heldout" scene, for compositional zero-shot tests.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Any

from PIL import Image, ImageDraw

from .base import Example, Source

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLOURS = {  # far apart in RGB and in hue, so they stay distinct after resizing
    "red": (220, 20, 20), "green": (30, 160, 50), "blue": (30, 70, 220),
    "yellow": (245, 230, 0), "purple": (140, 40, 180), "orange": (255, 128, 0),
}
SIZES = ("small", "large")
POSITIONS = ("top left", "top", "top right", "left", "center", "right",
             "bottom left", "bottom", "bottom right")  # cell i is row i // 3, column i % 3
# Each colour and each shape still appears in training with other partners.
HELDOUT_COMBOS = (("red", "square"), ("green", "triangle"), ("blue", "diamond"), ("yellow", "cross"))
SPLITS = ("train", "test", "heldout")

_ALL_COMBOS = [(c, s) for c in COLOURS for s in SHAPES]
_SEEN_COMBOS = [cs for cs in _ALL_COMBOS if cs not in HELDOUT_COMBOS]
_SIZE_FRACTION = {"small": 0.45, "large": 0.8}  # of a grid cell's side
_MIN_IMAGE_SIZE = 32  # below this small shapes are a few pixels and stop being recognisable


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str
    cell: int                          # 0..8, reading order; see POSITIONS
    box: tuple[int, int, int, int]     # x0, y0, x1, y1 in pixels; x1, y1 exclusive

    @property
    def position(self) -> str:
        return POSITIONS[self.cell]

    def to_dict(self) -> dict[str, Any]:
        return {"shape": self.shape, "colour": self.colour, "size": self.size,
                "cell": self.cell, "position": self.position, "box": list(self.box)}


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]           # sorted by cell, so everything derived is canonical
    image_size: int = 64
    background: tuple[int, int, int] = (235, 235, 235)

    def to_dict(self) -> dict[str, Any]:
        return {"image_size": self.image_size, "background": list(self.background),
                "objects": [o.to_dict() for o in self.objects]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Scene":
        objs = tuple(Obj(o["shape"], o["colour"], o["size"], o["cell"], tuple(o["box"])) for o in d["objects"])
        return cls(objs, d["image_size"], tuple(d["background"]))


def cell_bounds(cell: int, image_size: int) -> tuple[int, int, int, int]:
    """Pixel box (x0, y0, x1, y1; x1, y1 exclusive) of grid cell 0..8; the cells tile the image."""
    edges = [round(k * image_size / 3) for k in range(4)]
    row, col = divmod(cell, 3)
    return edges[col], edges[row], edges[col + 1], edges[row + 1]


def sample_scene(rng: random.Random, image_size: int = 64, min_objects: int = 1,
                 max_objects: int = 2, heldout: bool = False) -> Scene:
    """Draw a scene; with `heldout`, exactly one object has a held-out colour-shape pair."""
    n = rng.randint(min_objects, max_objects)
    cells = sorted(rng.sample(range(9), n))
    combos = [rng.choice(_SEEN_COMBOS) for _ in range(n)]
    if heldout:
        combos[rng.randrange(n)] = rng.choice(HELDOUT_COMBOS)
    objects = []
    for cell, (colour, shape) in zip(cells, combos):
        size = rng.choice(SIZES)
        side = max(3, round(image_size / 3 * _SIZE_FRACTION[size]))
        # Jitter the box anywhere inside its cell, so objects never overlap or leave the image.
        cx0, cy0, cx1, cy1 = cell_bounds(cell, image_size)
        x0, y0 = rng.randint(cx0, cx1 - side), rng.randint(cy0, cy1 - side)
        objects.append(Obj(shape, colour, size, cell, (x0, y0, x0 + side, y0 + side)))
    grey = rng.randint(215, 250)  # slight variation so background colour is not a constant cue
    return Scene(tuple(objects), image_size, (grey, grey, grey))


def caption(scene: Scene) -> str:
    """E.g. "a small red circle at the top left and a large blue square at the bottom." """
    parts = [f"a {o.size} {o.colour} {o.shape} at the {o.position}" for o in scene.objects]
    return " and ".join(parts) + "."


def hard_negative(scene: Scene, rng: random.Random) -> Scene:
    """`scene` with one edit, so its caption is wrong in one detail: a contrastive hard negative.

    The edit changes one object's shape, colour or size, moves it to an empty cell, or swaps
    two objects' colours (same words, other binding). Held-out colour-shape pairs are never
    made, so they stay unseen by the text tower too.
    """
    objs = list(scene.objects)
    i = rng.randrange(len(objs))
    o = objs[i]
    edits = ["shape", "colour", "size"] + (["move"] if len(objs) < 9 else [])
    if len({p.colour for p in objs}) > 1:
        edits.append("swap")
    edit = rng.choice(edits)
    if edit == "shape":
        new = [replace(o, shape=s) for s in SHAPES if s != o.shape and (o.colour, s) in _SEEN_COMBOS]
    elif edit == "colour":
        new = [replace(o, colour=c) for c in COLOURS if c != o.colour and (c, o.shape) in _SEEN_COMBOS]
    elif edit == "size":
        new = [replace(o, size=next(s for s in SIZES if s != o.size))]
    elif edit == "move":  # the caption names only the cell, so the box moves with it
        free = [c for c in range(9) if c not in {p.cell for p in objs}]
        cell = rng.choice(free)
        (ox, oy, _, _), (nx, ny, _, _) = cell_bounds(o.cell, scene.image_size), cell_bounds(cell, scene.image_size)
        x0, y0, x1, y1 = o.box
        new = [replace(o, cell=cell, box=(x0 - ox + nx, y0 - oy + ny, x1 - ox + nx, y1 - oy + ny))]
    else:
        j = rng.choice([j for j, p in enumerate(objs) if p.colour != o.colour])
        if (o.colour, objs[j].shape) in _SEEN_COMBOS and (objs[j].colour, o.shape) in _SEEN_COMBOS:
            objs[j] = replace(objs[j], colour=o.colour)
            new = [replace(o, colour=scene.objects[j].colour)]
        else:  # the swap would make a held-out pair: change the colour alone instead
            new = [replace(o, colour=c) for c in COLOURS if c != o.colour and (c, o.shape) in _SEEN_COMBOS]
    objs[i] = rng.choice(new)
    return replace(scene, objects=tuple(sorted(objs, key=lambda p: p.cell)))


def render(scene: Scene, image_size: int | None = None) -> Image.Image:
    """Draw `scene`; a different `image_size` scales it (boxes in the scene stay as they are)."""
    size = image_size or scene.image_size
    k = size / scene.image_size
    im = Image.new("RGB", (size, size), scene.background)
    draw = ImageDraw.Draw(im)
    for o in scene.objects:
        x0, y0, x1, y1 = (round(v * k) for v in o.box)
        x1, y1 = x1 - 1, y1 - 1  # PIL boxes are inclusive
        cx, cy, fill = (x0 + x1) / 2, (y0 + y1) / 2, COLOURS[o.colour]
        if o.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif o.shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        elif o.shape == "triangle":
            draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
        elif o.shape == "diamond":
            draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
        elif o.shape == "cross":
            t = (x1 - x0) / 6  # arm half-thickness: a third of the width
            draw.rectangle((x0, cy - t, x1, cy + t), fill=fill)
            draw.rectangle((cx - t, y0, cx + t, y1), fill=fill)
        else:
            raise ValueError(f"unknown shape {o.shape!r}")
    return im


class Shapes(Source):
    """Procedural shapes scenes; example i of a split is a pure function of (seed, split, i)."""

    name = "shapes"
    classes = [f"{c} {s}" for c, s in _ALL_COMBOS]
    # Zero-shot prompts average over the size and position a class-only prompt leaves open.
    templates = [f"a {size} {{}} at the {pos}." for size in SIZES for pos in POSITIONS]

    def __init__(self, split: str = "train", size: int = 10_000, seed: int = 0, image_size: int = 64,
                 min_objects: int = 1, max_objects: int = 2):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        if image_size < _MIN_IMAGE_SIZE:
            raise ValueError(f"image_size must be >= {_MIN_IMAGE_SIZE}, got {image_size}")
        if not 1 <= min_objects <= max_objects <= 9:
            raise ValueError(f"need 1 <= min_objects <= max_objects <= 9, got {min_objects}, {max_objects}")
        self.split, self.size, self.seed = split, size, seed
        self.image_size, self.min_objects, self.max_objects = image_size, min_objects, max_objects

    def __len__(self) -> int:
        return self.size

    def scene(self, index: int) -> Scene:
        if not -self.size <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} examples")
        index %= self.size
        # A string seed is hashed with SHA-512 by `random`, so streams are stable across runs
        # and processes, and different splits never share a stream.
        rng = random.Random(f"shapes/{self.seed}/{self.split}/{index}")
        return sample_scene(rng, self.image_size, self.min_objects, self.max_objects,
                            heldout=self.split == "heldout")

    def hard_negative_caption(self, index: int) -> str:
        """The caption of example `index` with one detail wrong (see `hard_negative`); deterministic."""
        rng = random.Random(f"shapes-negative/{self.seed}/{self.split}/{index % max(self.size, 1)}")
        return caption(hard_negative(self.scene(index), rng))

    def __getitem__(self, index: int) -> Example:
        scene = self.scene(index)
        label = None
        if len(scene.objects) == 1:
            o = scene.objects[0]
            label = self.classes.index(f"{o.colour} {o.shape}")
        return Example(render(scene), caption(scene), label, {"scene": scene.to_dict()})

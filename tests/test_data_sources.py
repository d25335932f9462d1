"""Tests for vlmkit.data.sources: the shapes world, file-backed datasets and the registry."""
from __future__ import annotations

import gzip
import itertools
import random
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlmkit.data.images import ImageDecodeError
from vlmkit.data.sources import Digits, FashionMNIST, ImageTextPairs, Shapes, build_source
from vlmkit.data.sources import shapes as sh
from vlmkit.data.sources.easy_vqa import describe
from vlmkit.data.sources.fashion_mnist import DEFAULT_ROOT

# --- shapes ----------------------------------------------------------------------------------


def combos(scene_dict: dict) -> list[tuple[str, str]]:
    return [(o["colour"], o["shape"]) for o in scene_dict["objects"]]


def test_shapes_deterministic():
    a, b = Shapes(size=20, max_objects=3), Shapes(size=20, max_objects=3)
    for i in (0, 7, 19):
        ea, eb = a[i], b[i]
        assert ea.caption == eb.caption and ea.meta == eb.meta
        assert ea.image.tobytes() == eb.image.tobytes()
    assert a[-1].meta == a[19].meta
    with pytest.raises(IndexError):
        a[20]


def test_shapes_splits_and_seeds_use_different_streams():
    train, test = Shapes("train", size=200), Shapes("test", size=200)
    other_seed = Shapes("train", size=200, seed=1)
    for i in range(200):
        assert train.scene(i) != test.scene(i) and train.scene(i) != other_seed.scene(i)


def test_heldout_combos():
    seen_colours = {c for c, s in sh._SEEN_COMBOS}
    seen_shapes = {s for c, s in sh._SEEN_COMBOS}
    assert seen_colours == set(sh.COLOURS) and seen_shapes == set(sh.SHAPES)
    for split in ("train", "test"):
        ds = Shapes(split, size=300, max_objects=4)
        assert not any(cs in sh.HELDOUT_COMBOS for i in range(300) for cs in combos(ds.scene(i).to_dict()))
    held = Shapes("heldout", size=300, max_objects=4)
    for i in range(300):
        assert sum(cs in sh.HELDOUT_COMBOS for cs in combos(held.scene(i).to_dict())) == 1


def test_caption_describes_every_object_in_reading_order():
    ds = Shapes(size=100, min_objects=1, max_objects=4)
    for i in range(100):
        ex = ds[i]
        objs = ex.meta["scene"]["objects"]
        assert re.fullmatch(r"[a-z ]+\.", ex.caption)
        parts = ex.caption[:-1].split(" and ")
        assert parts == [f"a {o['size']} {o['colour']} {o['shape']} at the {o['position']}" for o in objs]
        assert [o["cell"] for o in objs] == sorted(o["cell"] for o in objs)


def test_boxes_inside_cells_and_drawn_there():
    ds = Shapes(size=100, image_size=64, max_objects=5)
    cells = [sh.cell_bounds(c, 64) for c in range(9)]
    assert sum((x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in cells) == 64 * 64
    for i in range(100):
        ex = ds[i]
        objs = ex.meta["scene"]["objects"]
        assert len({o["cell"] for o in objs}) == len(objs)
        for o in objs:
            x0, y0, x1, y1 = o["box"]
            cx0, cy0, cx1, cy1 = cells[o["cell"]]
            assert cx0 <= x0 < x1 <= cx1 and cy0 <= y0 < y1 <= cy1
            centre = ((x0 + x1 - 1) // 2, (y0 + y1 - 1) // 2)
            assert ex.image.getpixel(centre) == sh.COLOURS[o["colour"]]


def test_colours_distinct_and_labels_templates():
    for a, b in itertools.combinations(sh.COLOURS.values(), 2):
        assert np.linalg.norm(np.subtract(a, b)) > 90
    ds = Shapes(size=50, max_objects=1)
    ex = ds[0]
    o = ex.meta["scene"]["objects"][0]
    assert Shapes.classes[ex.label] == f"{o['colour']} {o['shape']}"
    assert f"a {o['size']} {{}} at the {o['position']}." in Shapes.templates
    assert Shapes.templates[0].format("red circle") == "a small red circle at the top left."
    assert len(Shapes.templates) == 18 and len(Shapes.classes) == 30
    assert Shapes(size=50, min_objects=2)[0].label is None


def test_scene_round_trip_and_render_scaling():
    scene = Shapes(size=5).scene(3)
    assert sh.Scene.from_dict(scene.to_dict()) == scene
    assert sh.render(scene, 128).size == (128, 128)


def test_hard_negative_is_one_edit_away():
    src = Shapes("train", 400, image_size=48, max_objects=3)
    edits = set()
    for i in range(len(src)):
        scene = src.scene(i)
        wrong = sh.hard_negative(scene, random.Random(i))
        assert sh.caption(wrong) != sh.caption(scene) and len(wrong.objects) == len(scene.objects)
        assert all((o.colour, o.shape) not in sh.HELDOUT_COMBOS for o in wrong.objects)
        before = {(o.cell, o.size, o.colour, o.shape) for o in scene.objects}
        after = {(o.cell, o.size, o.colour, o.shape) for o in wrong.objects}
        gone, made = sorted(before - after), sorted(after - before)
        if len(gone) == 2:  # two objects traded colours
            assert [(c, s, sh_) for c, s, _, sh_ in gone] == [(c, s, sh_) for c, s, _, sh_ in made]
            assert gone[0][2] == made[1][2] and gone[1][2] == made[0][2]
            edits.add("swap")
        else:
            assert len(gone) == len(made) == 1
            differ = [name for name, a, b in zip(("cell", "size", "colour", "shape"), gone[0], made[0]) if a != b]
            assert len(differ) == 1
            edits.add(differ[0])
    assert edits == {"cell", "size", "colour", "shape", "swap"}
    assert src.hard_negative_caption(7) == src.hard_negative_caption(7) != sh.caption(src.scene(7))


def test_sources_without_hard_negatives_say_so():
    with pytest.raises(NotImplementedError, match="cannot make hard-negative captions"):
        Digits("train").hard_negative_caption(0)


# --- fashion-mnist ---------------------------------------------------------------------------


def write_idx(path: Path, arr: np.ndarray, gz: bool) -> None:
    data = bytes([0, 0, 8, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_tiny_idx(tmp_path, gz):
    images = np.arange(6 * 28 * 28).reshape(6, 28, 28) % 256
    labels = np.array([0, 9, 3, 9, 1, 8])
    suffix = ".gz" if gz else ""
    write_idx(tmp_path / f"train-images-idx3-ubyte{suffix}", images, gz)
    write_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}", labels, gz)
    ds = FashionMNIST(root=tmp_path)
    assert len(ds) == 6 and ds.images.shape == (6, 28, 28) and ds.images.dtype == np.uint8
    ex = ds[1]
    assert ex.label == 9 and ex.image.size == (28, 28) and ex.image.mode == "RGB"
    assert ex.caption in [t.format("ankle boot") for t in FashionMNIST.templates]
    kept = FashionMNIST(root=tmp_path, keep_classes=["ankle boot", "bag"])
    assert list(kept.labels) == [9, 9, 8] and kept[0].caption == ds[1].caption
    with pytest.raises(ValueError, match="jumper"):
        FashionMNIST(root=tmp_path, keep_classes=["jumper"])


def test_fashion_mnist_malformed_and_missing(tmp_path):
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + struct.pack(">3I", 5, 28, 28) + b"x")
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(5), gz=False)
    with pytest.raises(ValueError, match="train-images-idx3-ubyte"):
        FashionMNIST(root=tmp_path)
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        FashionMNIST(split="test", root=tmp_path)


@pytest.mark.skipif(not Path(DEFAULT_ROOT, "train-labels-idx1-ubyte.gz").exists(), reason="Debian files absent")
def test_fashion_mnist_real_files():
    assert len(FashionMNIST("train", root=DEFAULT_ROOT)) == 60_000
    test = FashionMNIST("test", root=DEFAULT_ROOT)
    assert len(test) == 10_000 and np.bincount(test.labels).tolist() == [1000] * 10


# --- digits, easy-vqa ------------------------------------------------------------------------


def test_digits_split():
    train, test = Digits("train"), Digits("test")
    assert len(train) + len(test) == 1797 and not set(train.indices) & set(test.indices)
    ex = test[0]
    assert ex.image.size == (8, 8) and Digits.classes[ex.label] in ex.caption
    assert train.images.max() == 255 and list(Digits("train").indices) == list(train.indices)


def test_easy_vqa_captions_follow_answers():
    pytest.importorskip("easy_vqa")
    from vlmkit.data.sources import EasyVQA

    ds = EasyVQA("test")
    assert len(ds) == 1000 and len(ds.questions) > 5000 and "yes" in ds.answers
    for i in range(25):
        ex = ds[i]
        for question, answer in ex.meta["questions"]:
            if question.startswith("what color"):
                assert answer == ex.meta["colour"] and answer in ex.caption
            if question.startswith("what shape"):
                assert answer == ex.meta["shape"] and answer in ex.caption


def test_describe_uses_negation_and_elimination():
    assert describe([("is there not a red shape?", "no"), ("what shape is present?", "circle")]) == ("red", "circle")
    assert describe([("is no circle present?", "yes"), ("is there a triangle?", "no")]) == (None, "rectangle")
    assert describe([]) == (None, None)


# --- your own pairs, registry ----------------------------------------------------------------


@pytest.fixture
def pair_dir(tmp_path):
    Image.new("RGB", (5, 5), (0, 0, 255)).save(tmp_path / "a.png")
    return tmp_path


def test_pairs_jsonl_csv_and_folder(pair_dir):
    (pair_dir / "captions.jsonl").write_text('{"image": "a.png", "caption": "a blue square."}\n\n')
    (pair_dir / "pairs.csv").write_text(f'image,caption\n{pair_dir / "a.png"},"blue, square"\n')
    for ds in (ImageTextPairs(pair_dir / "captions.jsonl"), ImageTextPairs(pair_dir)):
        assert len(ds) == 1 and ds[0].caption == "a blue square." and ds[0].image.getpixel((0, 0)) == (0, 0, 255)
    assert ImageTextPairs(pair_dir / "pairs.csv")[0].caption == "blue, square"


def test_pairs_errors_name_file_and_line(pair_dir):
    bad = pair_dir / "bad.jsonl"
    bad.write_text('{"image": "a.png", "caption": "ok"}\n{"image": "a.png", "caption": \n')
    with pytest.raises(ValueError, match=r"bad.jsonl, line 2"):
        ImageTextPairs(bad)
    bad.write_text('{"image": "a.png", "caption": "  "}\n')
    with pytest.raises(ValueError, match=r"line 1: empty or missing caption"):
        ImageTextPairs(bad)
    (pair_dir / "bad.csv").write_text("path,caption\na.png,x\n")
    with pytest.raises(ValueError, match=r"bad.csv.*\['image'\]"):
        ImageTextPairs(pair_dir / "bad.csv")


def test_pairs_missing_image_fails_on_access_only(pair_dir):
    (pair_dir / "c.jsonl").write_text('{"image": "gone.png", "caption": "nothing."}\n')
    ds = ImageTextPairs(pair_dir / "c.jsonl")
    with pytest.raises(ImageDecodeError, match="gone.png"):
        ds[0]


def test_build_source(pair_dir):
    assert isinstance(build_source("shapes", "test", size=3), Shapes) and len(build_source("shapes", size=3)) == 3
    (pair_dir / "captions.csv").write_text("image,caption\na.png,a square.\n")
    assert isinstance(build_source(str(pair_dir)), ImageTextPairs)
    with pytest.raises(ValueError, match="shapes"):
        build_source("imagenet")
    with pytest.raises(TypeError, match="image_sise"):
        build_source("shapes", image_sise=32)


def test_preparing_data_leaves_the_global_rng_alone():
    """Decoding has no randomness: how many sets a run prepares, and when, must not move the
    draws that initialise its model (the DataLoader would take a seed from torch's global RNG)."""
    from vlmkit.data.images import ImageTransform
    from vlmkit.data.prepared import prepare

    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    prepare(Shapes("test", size=4, image_size=32), ImageTransform(size=32))
    assert torch.equal(torch.rand(3), expected)

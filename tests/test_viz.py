"""Tests for vlmkit.viz.plots: each figure is a readable PNG, and bad input fails clearly."""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vlmkit.viz.plots import plot_curves, plot_embedding_map, plot_similarity_matrix


def assert_png(path: Path) -> None:
    assert path.is_file()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 0 and image.height > 0
    assert not plt.get_fignums()  # nothing left open in pyplot


def test_similarity_matrix_with_images_and_captions(tmp_path: Path) -> None:
    images = [Image.new("RGB", (40 + 10 * i, 30), (40 * i, 100, 200)) for i in range(4)]
    captions = ["a red circle", "a very long caption " * 12, "", "Café — ünïcode | pipes"]
    sim = F.normalize(torch.randn(4, 8), dim=-1) @ F.normalize(torch.randn(4, 8), dim=-1).T
    path = plot_similarity_matrix(sim, tmp_path / "nested" / "sim.png", images=images, captions=captions)
    assert path == tmp_path / "nested" / "sim.png"
    assert_png(path)


def test_similarity_matrix_plain_and_constant(tmp_path: Path) -> None:
    assert_png(plot_similarity_matrix(np.random.rand(3, 5), tmp_path / "plain.png"))
    assert_png(plot_similarity_matrix(torch.ones(2, 2), tmp_path / "constant.png", title="all equal"))


def test_similarity_matrix_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="non-empty"):
        plot_similarity_matrix(torch.zeros(0, 3), tmp_path / "x.png")
    with pytest.raises(ValueError, match="non-empty"):
        plot_similarity_matrix(torch.zeros(3), tmp_path / "x.png")
    with pytest.raises(ValueError, match="images"):
        plot_similarity_matrix(torch.zeros(2, 2), tmp_path / "x.png", images=[Image.new("RGB", (8, 8))])
    with pytest.raises(ValueError, match="captions"):
        plot_similarity_matrix(torch.zeros(2, 3), tmp_path / "x.png", captions=["a", "b"])
    assert not (tmp_path / "x.png").exists()


def test_embedding_map_labelled_and_unlabelled(tmp_path: Path) -> None:
    torch.manual_seed(0)
    img, txt = torch.randn(12, 16), torch.randn(12, 16)
    labels = [f"class {i % 3}" for i in range(12)]
    assert_png(plot_embedding_map(img, txt, tmp_path / "labelled.png", image_labels=labels, text_labels=labels))
    # Unequal counts (no pair lines), no labels, and a single text.
    assert_png(plot_embedding_map(img, txt[:1], tmp_path / "plain.png"))


def test_embedding_map_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="non-empty"):
        plot_embedding_map(torch.zeros(0, 4), torch.zeros(2, 4), tmp_path / "x.png")
    with pytest.raises(ValueError, match="widths"):
        plot_embedding_map(torch.zeros(2, 4), torch.zeros(2, 5), tmp_path / "x.png")
    with pytest.raises(ValueError, match="image_labels"):
        plot_embedding_map(torch.zeros(2, 4), torch.zeros(2, 4), tmp_path / "x.png", image_labels=["a"])


def test_curves_with_eval_records(tmp_path: Path) -> None:
    records = [{"step": s, "loss": 3.0 / s, "lr": 1e-3} for s in range(1, 21)]
    records += [{"step": 10, "eval/loss": 0.5, "eval/image_to_text_R@1": 0.2},
                {"step": 20, "eval/loss": 0.4, "eval/image_to_text_R@1": 0.3},
                {"step": 20, "split": "val", "loss": 0.45},  # eval given by a split field
                {"epoch": 1, "loss": 9.0},  # no step: skipped
                {"step": 5, "loss": None}]  # no value: skipped
    assert_png(plot_curves(records, tmp_path / "curves.png", keys=("loss", "lr")))
    assert_png(plot_curves(records, tmp_path / "loss_only.png", eval_keys=()))


def test_curves_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least one record"):
        plot_curves([], tmp_path / "x.png")
    with pytest.raises(ValueError, match="no record"):
        plot_curves([{"step": 1, "acc": 0.5}], tmp_path / "x.png")

"""Tests for vlmkit.evaluation: retrieval recall, zero-shot accuracy and report files."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vlmkit.evaluation.report import write_report
from vlmkit.evaluation.retrieval import retrieval_metrics, similarity
from vlmkit.evaluation.zero_shot import zero_shot_accuracy
from vlmkit.inference.zero_shot import build_classifier


def loop_recall(sim: torch.Tensor, k: int) -> float:
    """Reference Recall@K by direct loops: rank = others scoring >= the pair's own score."""
    hits = 0
    for i in range(sim.shape[0]):
        rank = sum(1 for j in range(sim.shape[1]) if j != i and sim[i, j] >= sim[i, i])
        hits += rank < k
    return hits / sim.shape[0]


# ------------------------------------------------------------------ retrieval
def test_identity_embeddings_are_perfect() -> None:
    emb = torch.eye(20)
    metrics = retrieval_metrics(emb, emb, ks=(1, 5))
    assert all(metrics[f"{d}_R@{k}"] == 1.0 for d in ("image_to_text", "text_to_image", "mean") for k in (1, 5))
    assert metrics["image_to_text_median_rank"] == metrics["text_to_image_median_rank"] == 1.0


def test_permutation_and_random_match_loops() -> None:
    # Texts are a shifted copy: image i's caption sits at i+1, so R@1 = 0 and R@2 depends on order.
    img = torch.eye(6)
    assert retrieval_metrics(img, img.roll(1, dims=0), ks=(1,))["image_to_text_R@1"] == 0.0

    torch.manual_seed(0)
    img = F.normalize(torch.randn(50, 8), dim=-1)
    txt = F.normalize(img + 0.8 * torch.randn(50, 8), dim=-1)
    metrics = retrieval_metrics(img, txt, ks=(1, 5, 10), chunk_size=7)  # chunks that don't divide N
    sim = similarity(img, txt)
    for k in (1, 5, 10):
        assert metrics[f"image_to_text_R@{k}"] == pytest.approx(loop_recall(sim, k))
        assert metrics[f"text_to_image_R@{k}"] == pytest.approx(loop_recall(sim.T, k))
        assert metrics[f"mean_R@{k}"] == pytest.approx((loop_recall(sim, k) + loop_recall(sim.T, k)) / 2)


def test_ties_give_no_free_credit() -> None:
    constant = torch.ones(4, 3) / 3**0.5
    metrics = retrieval_metrics(constant, constant, ks=(1, 4))
    assert metrics["image_to_text_R@1"] == 0.0 and metrics["text_to_image_R@1"] == 0.0
    assert metrics["image_to_text_R@4"] == 1.0  # all four candidates fit in the top 4
    # One duplicate pair: images 0 and 1 are identical, so each ties with the other's text.
    img = torch.eye(3)[[0, 0, 1]]
    metrics = retrieval_metrics(img, torch.eye(3)[[0, 0, 1]], ks=(1, 2))
    assert metrics["image_to_text_R@1"] == pytest.approx(1 / 3)
    assert metrics["image_to_text_R@2"] == 1.0


def test_retrieval_errors() -> None:
    with pytest.raises(ValueError, match="same shape"):
        retrieval_metrics(torch.eye(3), torch.eye(4)[:, :3])
    with pytest.raises(ValueError, match="2-D"):
        retrieval_metrics(torch.ones(3), torch.ones(3))
    with pytest.raises(ValueError, match="at least one"):
        retrieval_metrics(torch.zeros(0, 4), torch.zeros(0, 4))


# ------------------------------------------------------------------ zero-shot
CLASSES = ["cat", "dog", "bird", "fish"]
TEMPLATES = ["a photo of a {}.", "a drawing of a {}."]


def fake_encoder(texts: list[str]) -> torch.Tensor:
    """One-hot on the class named in the text, scaled by the template to test normalisation."""
    rows = []
    for t in texts:
        (cls,) = [i for i, c in enumerate(CLASSES) if f" {c}." in t]
        rows.append(F.one_hot(torch.tensor(cls), len(CLASSES)).float() * (3.0 if "drawing" in t else 1.0))
    return torch.stack(rows)


def test_build_classifier_is_normalised_template_mean() -> None:
    seen: list[int] = []
    classifier = build_classifier(lambda b: seen.append(len(b)) or fake_encoder(b), CLASSES, TEMPLATES, batch_size=3)
    assert torch.allclose(classifier, torch.eye(4))
    assert seen == [3, 3, 2]  # 8 prompts in batches of 3
    with pytest.raises(ValueError, match="placeholder"):
        build_classifier(fake_encoder, CLASSES, ["a photo"])


def test_zero_shot_accuracy_known_values() -> None:
    classifier = build_classifier(fake_encoder, CLASSES, TEMPLATES)
    # Images 0-3 sit on their class; image 4 (a "cat") leans towards "dog" with "cat" second.
    image_emb = torch.cat([torch.eye(4), F.normalize(torch.tensor([[0.5, 1.0, 0.0, 0.0]]), dim=-1)])
    labels = torch.tensor([0, 1, 2, 3, 0])
    res = zero_shot_accuracy(image_emb, labels, classifier, ks=(1, 2, 10), classnames=CLASSES)
    assert res["top1_accuracy"] == pytest.approx(0.8)
    assert res["top2_accuracy"] == 1.0 and res["top10_accuracy"] == 1.0  # k capped at C
    assert res["per_class_accuracy"] == {"cat": 0.5, "dog": 1.0, "bird": 1.0, "fish": 1.0}
    assert res["mean_per_class_accuracy"] == pytest.approx(0.875)
    assert res["confusion_matrix"][0] == [1, 1, 0, 0] and res["confusion_classes"] == [0, 1, 2, 3]
    assert res["num_samples"] == 5


def test_zero_shot_class_subset() -> None:
    classifier = torch.eye(4)
    image_emb = F.normalize(torch.tensor([[0.5, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.2]]), dim=-1)
    labels = torch.tensor([0, 2])
    assert zero_shot_accuracy(image_emb, labels, classifier, ks=(1,))["top1_accuracy"] == 0.5
    # Without "dog" among the candidates the cat image is right, labels still use full indices.
    res = zero_shot_accuracy(image_emb, labels, classifier, ks=(1,), class_subset=[2, 0])
    assert res["top1_accuracy"] == 1.0
    assert res["confusion_classes"] == [2, 0] and res["confusion_matrix"] == [[1, 0], [0, 1]]
    assert set(res["per_class_accuracy"]) == {0, 2}
    with pytest.raises(ValueError, match="not in class_subset"):
        zero_shot_accuracy(image_emb, labels, classifier, class_subset=[0, 1])


def test_zero_shot_tie_is_a_miss_and_errors() -> None:
    res = zero_shot_accuracy(torch.ones(1, 2), torch.tensor([1]), torch.eye(2), ks=(1, 2))
    assert res["top1_accuracy"] == 0.0 and res["top2_accuracy"] == 1.0
    with pytest.raises(ValueError, match="labels"):
        zero_shot_accuracy(torch.eye(2), torch.tensor([0, 5]), torch.eye(2))


# ------------------------------------------------------------------ report
def test_write_report(tmp_path: Path) -> None:
    results = {
        "image_to_text_R@1": 0.123456,
        "num_samples": 5,
        "per_class_accuracy": {"cat": 0.5, "a|b": 1.0},
        "confusion_matrix": [[1, 0], [0, 1]],
        "tensor_value": torch.tensor(0.25),
    }
    json_path, md_path = write_report(results, tmp_path / "out", "eval", "Zero-shot")
    assert json_path == tmp_path / "out" / "eval.json" and md_path.suffix == ".md"
    data = json.loads(json_path.read_text())
    assert data["confusion_matrix"] == [[1, 0], [0, 1]] and data["tensor_value"] == 0.25

    md = md_path.read_text().splitlines()
    assert md[0] == "# Zero-shot" and md[2] == "| metric | value |"
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1].rstrip(" |") for line in md[4:]}
    assert rows["image_to_text_R@1"] == "0.1235" and rows["num_samples"] == "5"
    assert rows["per_class_accuracy.cat"] == "0.5000" and rows["tensor_value"] == "0.2500"
    assert "per_class_accuracy.a\\|b" in rows
    assert not any("confusion" in key for key in rows)

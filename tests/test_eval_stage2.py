"""Tests for Stage 2 evaluation (VQA, captions, POPE, grounding) and the attention heatmap figure."""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from PIL import Image

from vlmkit.evaluation.captions import caption_scores, tokenize
from vlmkit.data.boxes import format_box, parse_box
from vlmkit.evaluation.grounding import box_iou, grounding_scores
from vlmkit.evaluation.pope import parse_yes_no, pope_scores
from vlmkit.evaluation.report import write_report
from vlmkit.evaluation.vqa import normalize_answer, vqa_accuracy
from vlmkit.viz.attention import plot_attention_heatmap


# ------------------------------------------------------------------ VQA
@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("  Yes. ", "yes"),
        ('"Yes."', "yes"),
        ('"yes".', "yes"),
        ("'Two'", "two"),
        ("\u201cRed\u201d", "red"),
        ("A   red\n car", "a red car"),
        ("3.5", "3.5"),
        ("3.", "3"),
        ("rock 'n' roll", "rock 'n' roll"),  # quotes that don't surround the answer stay
        ("", ""),
    ],
)
def test_normalize_answer(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


def test_vqa_accuracy_overall_and_per_kind() -> None:
    preds = ["Yes.", "2", "blue", '"Red"', "three"]
    answers = ["yes", "2", "red", "red", "3"]
    kinds = ["yes/no", "count", "color", "color", "count"]
    res = vqa_accuracy(preds, answers, kinds)
    assert res["accuracy"] == pytest.approx(3 / 5) and res["count"] == 5
    assert list(res["per_kind"]) == ["color", "count", "yes/no"]  # sorted
    assert res["per_kind"]["color"] == {"accuracy": 0.5, "count": 2}
    assert res["per_kind"]["count"] == {"accuracy": 0.5, "count": 2}
    assert res["per_kind"]["yes/no"] == {"accuracy": 1.0, "count": 1}
    assert "per_kind" not in vqa_accuracy(preds, answers)


def test_vqa_accuracy_errors() -> None:
    with pytest.raises(ValueError, match="3 predictions for 2 answers"):
        vqa_accuracy(["a", "b", "c"], ["a", "b"])
    with pytest.raises(ValueError, match="1 kinds for 2 answers"):
        vqa_accuracy(["a", "b"], ["a", "b"], ["k"])
    with pytest.raises(ValueError, match="at least one"):
        vqa_accuracy([], [])


# ------------------------------------------------------------------ captions
REFS = [
    ["a black dog runs on the grass", "a dog running across a lawn"],
    ["two people ride bikes down a street"],
    ["a plate of food with rice and beans"],
]


def test_tokenize() -> None:
    assert tokenize("Don't -- a Red-and-white BUS, ok?") == "dont a red and white bus ok"


def test_caption_scores_identical_beats_different() -> None:
    exact = caption_scores([refs[0] for refs in REFS], REFS)
    assert set(exact) == {"bleu1", "bleu2", "bleu3", "bleu4", "cider", "count"}
    for n in range(1, 5):
        assert exact[f"bleu{n}"] == pytest.approx(1.0, abs=1e-6)  # every prediction is a reference
    assert exact["count"] == 3

    wrong = caption_scores(["a cat sleeps on a sofa", "a red car parked", "the sky is blue today"], REFS)
    assert exact["cider"] > 1.0 > wrong["cider"] >= 0.0
    assert exact["bleu4"] > wrong["bleu4"]
    # Case and punctuation are tokenized away.
    shouty = caption_scores(["A black dog runs on the grass!", "Two people, ride bikes down a street.",
                             "A plate of food, with rice and beans..."], REFS)
    assert shouty["bleu4"] == pytest.approx(1.0, abs=1e-6) and shouty["cider"] == pytest.approx(exact["cider"])


def test_caption_scores_single_sample_quirks() -> None:
    # CIDEr's IDF over one sample is all zeros; BLEU-4 of a 3-word match is smoothed, not 0.
    res = caption_scores(["a b c"], [["a b c"]])
    assert res["cider"] == 0.0 and res["bleu3"] == pytest.approx(1.0, abs=1e-6)
    assert 0.0 < res["bleu4"] < 0.05


def test_caption_scores_errors() -> None:
    with pytest.raises(ValueError, match="2 predictions for 1 reference lists"):
        caption_scores(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="at least one prediction"):
        caption_scores([], [])
    with pytest.raises(ValueError, match=r"references\[1\] is empty"):
        caption_scores(["a dog", "a cat"], [["a dog"], []])
    with pytest.raises(ValueError, match=r"references\[0\] must be a list"):
        caption_scores(["a dog"], ["a dog"])  # a bare string, not a list of captions
    with pytest.raises(ValueError, match="no words"):
        caption_scores(["a dog"], [["", "?!"]])


# ------------------------------------------------------------------ POPE
@pytest.mark.parametrize(
    ("text", "expected"),
    [("Yes.", "yes"), ("no, there is not", "no"), ("**Yes**", "yes"), ("NO", "no"),
     ("There is no dog.", None), ("yesterday", None), ("", None)],
)
def test_parse_yes_no(text: str, expected: str | None) -> None:
    assert parse_yes_no(text) == expected


def test_pope_scores_hand_example() -> None:
    preds = ["Yes.", "yes", "No", "yes", "no", "I cannot tell", "Maybe", "No."]
    answers = ["yes", "yes", "yes", "no", "no", "yes", "no", "no"]
    # tp=2 (0,1); fp=1 (3); fn=2 (2, unparsed 5); tn=3 (4, 7, unparsed 6); correct = 0,1,4,7.
    res = pope_scores(preds, answers)
    assert res["confusion"] == {"tp": 2, "fp": 1, "fn": 2, "tn": 3}
    assert res["accuracy"] == pytest.approx(4 / 8)  # unparsed are wrong even on "no" answers
    assert res["precision"] == pytest.approx(2 / 3)
    assert res["recall"] == pytest.approx(2 / 4)
    assert res["f1"] == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
    assert res["yes_ratio"] == pytest.approx(3 / 8)
    assert res["count"] == 8 and res["unparsed"] == 2


def test_pope_scores_zero_division_and_errors() -> None:
    res = pope_scores(["no", "no"], ["no", "no"])  # never "yes": no precision/recall to divide
    assert res["accuracy"] == 1.0 and res["precision"] == res["recall"] == res["f1"] == 0.0
    assert res["yes_ratio"] == 0.0
    with pytest.raises(ValueError, match="'maybe' at index 1"):
        pope_scores(["yes", "no"], ["yes", "maybe"])
    with pytest.raises(ValueError, match="1 predictions for 2 answers"):
        pope_scores(["yes"], ["yes", "no"])
    with pytest.raises(ValueError, match="at least one"):
        pope_scores([], [])


# ------------------------------------------------------------------ grounding
def test_box_iou_known_values() -> None:
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert box_iou((0, 0, 10, 10), (2, 2, 4, 4)) == pytest.approx(4 / 100)
    assert box_iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0  # touching edges
    assert box_iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0
    with pytest.raises(ValueError, match="4 numbers"):
        box_iou((0, 0, 1), (0, 0, 1, 1))


def test_format_box() -> None:
    assert format_box((64, 80, 224, 248), 640, 400) == "[10, 20, 35, 62]"
    assert format_box((0, 0, 640, 400), 640, 400) == "[0, 0, 100, 100]"
    assert format_box((-20, 10, 700, 30), 640, 400) == "[0, 3, 100, 8]"  # clamped; 2.5 rounds up
    assert format_box((100, 100, 101, 101), 1000, 1000) == "[10, 10, 11, 11]"  # thin box kept >= 1%
    with pytest.raises(ValueError, match="x1 > x0"):
        format_box((10, 10, 5, 20), 100, 100)
    with pytest.raises(ValueError, match="positive"):
        format_box((0, 0, 1, 1), 0, 100)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[10, 20, 35, 62]", (10.0, 20.0, 35.0, 62.0)),
        ("The dog is at [ 10 20 35 62 ] in the image.", (10.0, 20.0, 35.0, 62.0)),
        ("[1.5,2,3.25, 4]", (1.5, 2.0, 3.25, 4.0)),
        ("[1, 2, 3, 4] and [5, 6, 7, 8]", (1.0, 2.0, 3.0, 4.0)),
        ("no box here", None),
        ("[1, 2, 3]", None),
        ("[30, 20, 10, 62]", None),  # x1 <= x0
        ("[10, 62, 35, 62]", None),  # y1 <= y0
        ("[10, 20, 35, 120]", None),  # outside 0..100
        ("[-5, 20, 35, 60] [1, 2, 3, 4]", None),  # first box invalid: no second guess
    ],
)
def test_parse_box(text: str, expected: tuple | None) -> None:
    assert parse_box(text) == expected


def test_format_parse_round_trip_within_one_percent() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        w, h = (int(v) for v in rng.integers(20, 2000, size=2))
        x0, x1 = sorted(rng.uniform(0, w, size=2))
        y0, y1 = sorted(rng.uniform(0, h, size=2))
        if x1 - x0 < 0.02 * w or y1 - y0 < 0.02 * h:
            continue  # thin boxes get widened by format_box, by design
        parsed = parse_box(format_box((x0, y0, x1, y1), w, h))
        assert parsed is not None
        exact = (100 * x0 / w, 100 * y0 / h, 100 * x1 / w, 100 * y1 / h)
        assert all(abs(p - e) <= 0.5 + 1e-9 for p, e in zip(parsed, exact))


def test_grounding_scores() -> None:
    boxes = [(0, 0, 100, 100), (0, 0, 100, 50), (50, 50, 150, 150), (10, 10, 20, 20)]
    preds = [
        "[0, 0, 50, 50]",  # exact (200x200 image)
        "It is at [0, 0, 50, 50].",  # true box is [0, 0, 50, 25]: IoU 0.5, a hit at >= 0.5
        "[0, 0, 25, 25]",  # true [25, 25, 75, 75]: no overlap
        "somewhere on the left",  # unparsed
    ]
    res = grounding_scores(preds, boxes, 200, [200, 200, 200, 200])
    assert res["accuracy@0.5"] == pytest.approx(2 / 4)
    assert res["mean_iou"] == pytest.approx((1.0 + 0.5 + 0.0 + 0.0) / 4)
    assert res["count"] == 4 and res["unparsed"] == 1
    assert grounding_scores(preds, boxes, 200, 200, threshold=0.75)["accuracy@0.75"] == pytest.approx(1 / 4)
    # Per-image sizes: the same percent box hits on a 100x100 image.
    assert grounding_scores(["[0, 0, 50, 50]"], [(0, 0, 50, 50)], [100], [100])["mean_iou"] == 1.0


def test_grounding_scores_errors() -> None:
    with pytest.raises(ValueError, match="2 predictions for 1 boxes"):
        grounding_scores(["a", "b"], [(0, 0, 1, 1)], 10, 10)
    with pytest.raises(ValueError, match="at least one"):
        grounding_scores([], [], 10, 10)
    with pytest.raises(ValueError, match="2 values of width for 1 predictions"):
        grounding_scores(["a"], [(0, 0, 1, 1)], [10, 10], 10)
    with pytest.raises(ValueError, match="threshold"):
        grounding_scores(["a"], [(0, 0, 1, 1)], 10, 10, threshold=0)
    with pytest.raises(ValueError, match=r"boxes\[0\] must be 4 numbers"):
        grounding_scores(["a"], [(0, 0, 1)], 10, 10)


def test_stage2_results_fit_write_report(tmp_path: Path) -> None:
    results = {"vqa": vqa_accuracy(["yes"], ["yes"], ["yes/no"]), "pope": pope_scores(["yes"], ["no"])}
    _, md_path = write_report(results, tmp_path, "stage2", "Stage 2")
    md = md_path.read_text()
    assert "vqa.per_kind.yes/no.accuracy" in md and "pope.confusion.fp" in md


def test_order_answers_are_scored_apart_from_vqa(monkeypatch) -> None:
    from vlmkit.data.conversation import Conversation, Message
    from vlmkit.data.vqa_sets import ConversationSet
    from vlmkit.evaluation import vlm_eval

    truth = [("colour", "red"), ("order", "red circle, blue square"), ("order", "blue square")]
    convs = [Conversation([Message("user", "<image>\nq"), Message("assistant", a)], [0], {"kind": k, "answer": a})
             for k, a in truth]
    predictions = ["red", "Red circle, blue square.", "red circle"]
    monkeypatch.setattr(vlm_eval, "generate_answers", lambda *args, **kwargs: predictions)
    results, _ = vlm_eval.evaluate_vlm(None, None, ConversationSet(None, convs))
    assert results["vqa"]["count"] == 1                      # the VQA figure keeps its kinds
    assert results["order"] == {"accuracy": 0.5, "count": 2}


# ------------------------------------------------------------------ attention figure
def make_image() -> Image.Image:
    pixels = np.zeros((60, 90, 3), dtype=np.uint8)
    pixels[:, :45] = (200, 60, 60)
    pixels[:, 45:] = (60, 60, 200)
    return Image.fromarray(pixels)


def assert_png(path: Path, min_side: int = 200) -> None:
    assert path.is_file()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width >= min_side and image.height >= min_side // 2
        assert image.width < 5000 and image.height < 5000
    assert not plt.get_fignums()  # nothing left open in pyplot


def test_attention_heatmap_square_grid(tmp_path: Path) -> None:
    attention = torch.softmax(torch.randn(3, 16), dim=-1)
    attention[2] = 1 / 16  # a constant map must not divide by zero
    path = plot_attention_heatmap(make_image(), attention, [" a", "dog", "\n"], tmp_path / "sub" / "att.png",
                                  title="What the model looked at")
    assert path == tmp_path / "sub" / "att.png"
    assert_png(path)


def test_attention_heatmap_rect_grid_and_panel_cap(tmp_path: Path) -> None:
    attention = np.random.default_rng(0).random((20, 6))
    tokens = [f"tok{i}" for i in range(20)]
    path = plot_attention_heatmap(make_image(), attention, tokens, tmp_path / "rect.png", grid=(2, 3), max_panels=5)
    assert_png(path)
    # Mean panel only.
    assert_png(plot_attention_heatmap(make_image(), attention[:1], ["x"], tmp_path / "one.png", grid=(3, 2)), 100)


def test_attention_heatmap_errors(tmp_path: Path) -> None:
    image = make_image()
    with pytest.raises(ValueError, match="2 tokens for 3 attention rows"):
        plot_attention_heatmap(image, torch.ones(3, 4), ["a", "b"], tmp_path / "x.png")
    with pytest.raises(ValueError, match="T, N >= 1"):
        plot_attention_heatmap(image, torch.ones(0, 4), [], tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"\[T, N\]"):
        plot_attention_heatmap(image, torch.ones(4), ["a"] * 4, tmp_path / "x.png")
    with pytest.raises(ValueError, match="square patch grid from N=5"):
        plot_attention_heatmap(image, torch.ones(1, 5), ["a"], tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"grid \(2, 2\) does not match N=6"):
        plot_attention_heatmap(image, torch.ones(1, 6), ["a"], tmp_path / "x.png", grid=(2, 2))
    with pytest.raises(ValueError, match="PIL image"):
        plot_attention_heatmap(np.zeros((8, 8, 3)), torch.ones(1, 4), ["a"], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()

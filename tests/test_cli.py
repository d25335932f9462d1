"""The command line and the Python API on a tiny trained model."""
import json
import sys

import numpy as np
import pytest

import vlmkit
from vlmkit.cli import main
from vlmkit.data.sources import build_source


@pytest.fixture(scope="module")
def shapes_images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    source = build_source("shapes", "test", size=6)
    paths = []
    for i in range(len(source)):
        path = folder / f"scene{i}.png"
        source[i].image.save(path)
        paths.append(path)
    return folder, paths, [source[i].caption for i in range(len(source))]


def test_presets_lists_every_preset(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    for name in ("tiny", "shapes", "clip-vit-b32"):
        assert name in out


def test_help_for_every_command(capsys):
    for argv in (["train", "clip", "--help"], ["train", "vlm", "--help"], ["eval", "clip", "--help"],
                 ["eval", "vqa", "--help"], ["ask", "--help"], ["chat", "--help"], ["classify", "--help"],
                 ["embed", "--help"], ["search", "--help"], ["demo", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
    assert "--labels" in capsys.readouterr().out


def test_classify(tiny_run, shapes_images, capsys):
    _, paths, _ = shapes_images
    labels = ["red circle", "blue square", "green cross"]
    assert main(["classify", str(paths[0]), "--model", str(tiny_run.model_dir), "--labels", *labels]) == 0
    ranked = vlmkit.load(tiny_run.model_dir).classify(paths[0], labels)   # checked by test_python_api
    assert capsys.readouterr().out.splitlines() == [f"{p:7.2%}  {label}" for label, p in ranked]


def test_embed_writes_arrays(tiny_run, shapes_images, tmp_path):
    _, paths, captions = shapes_images
    out = tmp_path / "emb.npz"
    assert main(["embed", "--model", str(tiny_run.model_dir), "--images", *map(str, paths[:3]),
                 "--texts", *captions[:2], "--out", str(out)]) == 0
    arrays = np.load(out)
    assert arrays["images"].shape == (3, 64) and arrays["texts"].shape == (2, 64)
    np.testing.assert_allclose(np.linalg.norm(arrays["images"], axis=1), 1.0, rtol=1e-5)


def test_search_both_directions(tiny_run, shapes_images, tmp_path, capsys):
    folder, paths, captions = shapes_images
    assert main(["search", "--model", str(tiny_run.model_dir), "--query", captions[0], "--folder", str(folder),
                 "--top-k", "3"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 3
    (tmp_path / "captions.txt").write_text("\n".join(captions))
    assert main(["search", "--model", str(tiny_run.model_dir), "--image", str(paths[0]),
                 "--captions", str(tmp_path / "captions.txt")]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 5


def test_eval_writes_a_report(tiny_run, tmp_path, capsys):
    assert main(["eval", "clip", "--model", str(tiny_run.model_dir), "--size", "50", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert 0 <= results["text_to_image_R@1"] <= 1 and "heldout_combos/top1_accuracy" in results
    assert "| text_to_image_R@1 |" in (tmp_path / "results.md").read_text()


@pytest.mark.parametrize("argv, message", [
    (["train", "clip", "--preset", "tiny", "--set", "train.stepz=3"], "unknown config key 'train.stepz'"),
    (["train", "clip", "--preset", "nope"], "unknown preset 'nope'"),
    (["classify", "nothing.png", "--model", "/no/such/dir", "--labels", "a", "b"], "no such checkpoint"),
])
def test_bad_input_gives_a_clear_error(argv, message, capsys, tmp_path):
    assert main(argv + (["--out", str(tmp_path)] if argv[0] == "train" else [])) == 2
    assert message in capsys.readouterr().err


def test_a_missing_optional_package_names_its_extra(tiny_run, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "uvicorn", None)   # as if `pip install vlmkit` without [serve]
    assert main(["serve", "--model", str(tiny_run.model_dir)]) == 2
    assert "pip install 'vlmkit[serve]'" in capsys.readouterr().err


def test_quiet_keeps_results_and_drops_messages(tiny_run, shapes_images, capsys):
    _, paths, _ = shapes_images
    out = ["embed", "--model", str(tiny_run.model_dir), "--texts", "a red circle"]
    assert main(["-q", *out, "--out", str(paths[0].parent / "q.npz")]) == 0
    assert capsys.readouterr().err == ""
    assert main([*out, "--out", str(paths[0].parent / "v.npz")]) == 0
    assert "wrote" in capsys.readouterr().err


def test_python_api(tiny_run, shapes_images, tmp_path):
    _, paths, captions = shapes_images
    model = vlmkit.load(tiny_run.model_dir)
    best = model.search_images(captions[0], [str(p) for p in paths], top_k=6)
    assert sorted(i for i, _ in best) == list(range(6))
    # One template: the softmax of the image's cosine similarity to each label's prompt, times the scale.
    labels = ["red circle", "blue square", "green cross"]
    ranked = model.classify(paths[0], labels, templates=["a photo of a {}."])
    similarity = model.embed_images([paths[0]]) @ model.embed_texts([f"a photo of a {x}." for x in labels]).T
    probs = (model.model.scale_and_bias()[0].item() * similarity).softmax(-1)[0].tolist()
    expected = sorted(zip(labels, probs), key=lambda p: -p[1])
    assert [label for label, _ in ranked] == [label for label, _ in expected]
    assert [p for _, p in ranked] == pytest.approx([p for _, p in expected], rel=1e-4)
    with pytest.raises(ValueError, match="no '\\{\\}'"):
        model.classify(paths[0], ["a", "b"], templates=["a photo"])
    with pytest.raises(ValueError, match="non-empty"):
        model.embed_texts([""])
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    from vlmkit.data.images import ImageDecodeError

    with pytest.raises(ImageDecodeError, match="broken.png"):
        model.embed_images([str(tmp_path / "broken.png")])
    long_text = "a red circle " * 500  # overlong: truncated to the model's limit, not an error
    assert model.embed_texts([long_text]).shape == (1, model.embed_dim)


@pytest.mark.slow
def test_demo_end_to_end_in_a_few_steps(tmp_path, capsys):
    """The main job wires everything: train, evaluate, pictures, report (quality is the benchmark's job)."""
    assert main(["demo", "--out", str(tmp_path), "--smoke"]) == 0
    out = capsys.readouterr().out
    assert "REPORT.md" in out and "text_to_image_R@1" in out and "vqa_accuracy" in out
    report = (tmp_path / "REPORT.md").read_text()
    assert "never seen" in report and "| question | truth | answer |" in report
    for name in ("stage1/similarity.png", "stage1/embedding_map.png", "stage1/loss_curve.png", "stage1/heldout_0.png",
                 "stage2/model/model.safetensors", "stage2/eval.md", "question_image_0.png"):
        assert (tmp_path / name).is_file(), name

"""A tiny Stage 1 run learns; checkpoints reload exactly; resume equals an uninterrupted run."""
import json
import os
import signal

import pytest
import torch

from vlmkit.checkpoint import CheckpointError, latest_checkpoint, load_model, read_config, save_checkpoint
from vlmkit.data.prepared import DataError
from vlmkit.presets import preset
from vlmkit.training import contrastive
from vlmkit.training.trainer import Trainer


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_tiny_run_learns(tiny_run):
    run_dir = tiny_run.model_dir.parent
    losses = [r["loss"] for r in _records(run_dir) if "loss" in r]
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3  # the loss falls
    # among 200 pairs chance is R@1 0.005, R@5 0.025
    for direction in ("text_to_image", "image_to_text"):
        assert tiny_run.results[f"{direction}_R@5"] > 0.4
        assert tiny_run.results[f"{direction}_R@1"] > 0.1
    assert tiny_run.results["heldout_combos/top5_accuracy"] > 5 / 30


def test_run_writes_its_pictures(tiny_run):
    from PIL import Image

    run_dir = tiny_run.model_dir.parent
    for name in ("similarity.png", "embedding_map.png", "loss_curve.png"):
        with Image.open(run_dir / name) as im:
            assert im.size[0] > 200 and im.size[1] > 200, name


def test_checkpoint_files_and_reload(tiny_run):
    """The saved weights, tokenizer and preprocessing reproduce the run's own final evaluation."""
    import vlmkit
    from vlmkit.data.prepared import prepare
    from vlmkit.data.sources import build_source
    from vlmkit.evaluation.clip_eval import evaluate_dual_encoder, zero_shot_sets

    model_dir = tiny_run.model_dir
    for name in ("config.json", "model.safetensors", "tokenizer.json", "preprocessor.json", "metrics.jsonl"):
        assert (model_dir / name).is_file(), name
    assert read_config(model_dir)["kind"] == "dual_encoder"
    m = vlmkit.load(model_dir, device="cpu")
    data = preset("tiny").data       # the run's evaluation data, as train_clip draws it
    source = build_source(data.source, data.eval_split, size=2 * data.eval_size, **data.source_options)
    pairs = prepare(source, m.transform, limit=2 * data.eval_size)
    sets = zero_shot_sets(source, pairs, m.transform, data.eval_size, data.source_options)
    results = evaluate_dual_encoder(m.model, m.tokenizer, pairs, sets, retrieval_size=data.eval_size)
    # The run evaluated in fp32 on a CPU, as here: the same figures. A GPU run evaluates in bf16.
    assert results == pytest.approx(tiny_run.results, abs=0.02 if torch.cuda.is_available() else 1e-9)


def test_saved_model_gives_the_same_outputs(tmp_path):
    model = contrastive.DualEncoder(preset("tiny").model).eval()
    save_checkpoint(tmp_path / "ck", model, "dual_encoder", preset("tiny").model.to_dict())
    again = load_model(tmp_path / "ck")
    pixels, ids = torch.randn(2, 3, 48, 48), torch.randint(0, 400, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(model(pixels, ids)[:2], again(pixels, ids)[:2], rtol=0, atol=0)


def _no_retraining(*args, **kwargs):
    raise AssertionError("a resumed run trained its tokenizer again")


@pytest.mark.parametrize("options", [{}, {"train.augment": "dihedral", "train.dedupe_captions": True,
                                       "train.hard_negatives": True}],
                         ids=["plain", "augmented"])
def test_resume_equals_uninterrupted(tmp_path, monkeypatch, options):
    cfg = preset("tiny").override({"train.steps": 16, "train.save_every": 100, "data.train_size": 512,
                                   "data.eval_size": 64, "train.log_every": 1, **options})
    straight = contrastive.train_clip(cfg, tmp_path / "a")

    original = Trainer.train_step

    def interrupt_at_7(self):
        logs = original(self)
        if self.step == 6:  # a real SIGINT, as from Ctrl-C, in the middle of the run
            os.kill(os.getpid(), signal.SIGINT)
        return logs

    monkeypatch.setattr(Trainer, "train_step", interrupt_at_7)
    first = contrastive.train_clip(cfg, tmp_path / "b")
    assert first.status == "interrupted"
    assert latest_checkpoint(tmp_path / "b" / "checkpoints").name == "step-0000007"
    monkeypatch.setattr(Trainer, "train_step", original)
    # A resumed run is a new process in real life, where training the tokenizer again can give
    # other ids (the trainer breaks ties in hash order): it must read the run's own.
    monkeypatch.setattr(contrastive.Tokenizer, "train", _no_retraining)
    resumed = contrastive.train_clip(cfg, tmp_path / "b")
    assert resumed.status == "done"

    a, b = _records(tmp_path / "a"), _records(tmp_path / "b")
    assert [r["step"] for r in a] == [r["step"] for r in b]  # no repeated or missing log lines
    a_loss, b_loss = ([r["loss"] for r in rec if "loss" in r] for rec in (a, b))
    assert b_loss == pytest.approx(a_loss, rel=1e-5)
    wa, wb = load_model(straight.model_dir).state_dict(), load_model(resumed.model_dir).state_dict()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-5, atol=1e-6)


def test_crash_during_save_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    model = contrastive.DualEncoder(preset("tiny").model)
    cfg = preset("tiny").model.to_dict()
    save_checkpoint(tmp_path / "ck" / "step-0000001", model, "dual_encoder", cfg)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("vlmkit.checkpoint.save_file", boom)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path / "ck" / "step-0000002", model, "dual_encoder", cfg)
    with pytest.raises(OSError):  # replacing an existing checkpoint fails before touching it
        save_checkpoint(tmp_path / "ck" / "step-0000001", model, "dual_encoder", cfg)
    assert latest_checkpoint(tmp_path / "ck").name == "step-0000001"
    load_model(tmp_path / "ck" / "step-0000001")


def test_damaged_checkpoints_give_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_model(tmp_path / "nothing")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="missing model.safetensors"):
        load_model(tmp_path / "half")
    model = contrastive.DualEncoder(preset("tiny").model)
    save_checkpoint(tmp_path / "ck", model, "dual_encoder", preset("tiny").model.to_dict())
    (tmp_path / "ck" / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="unreadable weights"):
        load_model(tmp_path / "ck")
    other = preset("tiny").model.override({"embed_dim": 32})
    save_checkpoint(tmp_path / "ck2", contrastive.DualEncoder(other), "dual_encoder",
                    preset("tiny").model.to_dict())
    with pytest.raises(CheckpointError, match="has shape"):
        load_model(tmp_path / "ck2")


def _pairs_folder(tmp_path, n_good, n_bad):
    from PIL import Image

    lines = []
    for i in range(n_good):
        Image.new("RGB", (20, 20), (10 * i % 255, 0, 0)).save(tmp_path / f"g{i}.png")
        lines.append({"image": f"g{i}.png", "caption": f"picture number {i}"})
    for i in range(n_bad):
        (tmp_path / f"b{i}.png").write_bytes(b"not a png at all")
        lines.append({"image": f"b{i}.png", "caption": "broken"})
    lines.append({"image": "missing.png", "caption": "gone"}) if n_bad else None
    (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    return tmp_path


def test_bad_images_are_skipped_and_counted(tmp_path):
    from vlmkit.data.images import ImageTransform
    from vlmkit.data.prepared import prepare
    from vlmkit.data.sources import build_source

    folder = _pairs_folder(tmp_path, n_good=30, n_bad=1)
    data = prepare(build_source(str(folder)), ImageTransform(size=16), max_bad_fraction=0.1)
    assert len(data) == 30 and data.skipped == 2
    with pytest.raises(DataError, match=r"2 of 32 images .* could not be read .*max_bad_fraction"):
        prepare(build_source(str(folder)), ImageTransform(size=16), max_bad_fraction=0.05)


def test_a_rerun_with_another_config_is_refused_unless_asked(tmp_path):
    """Resuming with the old optimizer and schedule under a new run_config.json would lie: a
    changed key is an error naming it, --resume accepts only keys safe to change, and
    --overwrite starts again."""
    from vlmkit.training.run import RunConfigChanged

    small = {"train.steps": 4, "train.save_every": 2, "data.train_size": 128, "data.eval_size": 16,
             "train.batch_size": 32}
    cfg = preset("tiny").override(small)
    contrastive.train_clip(cfg.override({"train.steps": 2}), tmp_path / "run")
    saved = (tmp_path / "run" / "run_config.json").read_text()
    with pytest.raises(RunConfigChanged, match=r"train\.lr: 0\.003 -> 0\.001.*--overwrite"):
        contrastive.train_clip(cfg.override({"train.steps": 2, "train.lr": 1e-3}), tmp_path / "run")
    with pytest.raises(RunConfigChanged, match=r"only \*\.steps"):
        contrastive.train_clip(cfg.override({"train.lr": 1e-3}), tmp_path / "run", existing="resume")
    assert (tmp_path / "run" / "run_config.json").read_text() == saved   # nothing was touched
    with pytest.raises(RunConfigChanged, match=r"train\.steps: 2 -> 4.*--resume continues it"):
        contrastive.train_clip(cfg, tmp_path / "run")

    longer = contrastive.train_clip(cfg, tmp_path / "run", existing="resume")   # from step 2 on to 4
    assert longer.status == "done"
    assert [r["step"] for r in _records(tmp_path / "run") if "loss" in r] == [2, 4]   # each step once

    again = contrastive.train_clip(cfg.override({"train.lr": 1e-3}), tmp_path / "run", existing="overwrite")
    assert again.status == "done"
    assert json.loads((tmp_path / "run" / "run_config.json").read_text())["train"]["lr"] == 1e-3
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a vlmkit run folder; nothing was deleted"):
        contrastive.train_clip(cfg, tmp_path / "elsewhere", existing="overwrite")
    assert (tmp_path / "elsewhere" / "notes.txt").read_text() == "mine"

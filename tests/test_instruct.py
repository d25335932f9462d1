"""Stage 2 end to end on tiny configs: a run that learns, resume, the CLI commands, data errors."""
from __future__ import annotations

import json
import logging
import sys

import pytest
import torch

from vlmkit.cli import main
from vlmkit.data.prepared import DataError
from vlmkit.evaluation.hooks import VlmHooks
from vlmkit.presets import vlm_preset
from vlmkit.training import instruct
from vlmkit.training.instruct import train_vlm

# Single-object scenes and one question kind: a colour is visible in every pixel of the
# object, so even a tiny model trained for seconds must beat chance (1/6) by far.
LEARNABLE = {"data.source_options": {"image_size": 48, "max_objects": 1, "kinds": ["colour", "caption"]},
             "data.train_size": 600, "data.eval_size": 40,
             "align.skip": True, "instruct.tasks": ["colour"], "instruct.vision": "frozen",
             "instruct.train.steps": 300, "instruct.train.batch_size": 32, "instruct.train.save_every": 150}


@pytest.fixture(scope="module")
def vlm_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("vlm_run")
    run = train_vlm(vlm_preset("tiny").override(LEARNABLE), out, progress=False, hooks=VlmHooks())
    assert run.status == "done"
    return out, run


def test_a_tiny_stage2_run_learns_a_visual_question(vlm_run):
    out, run = vlm_run
    colour = run.results["vqa"]["per_kind"]["colour"]
    assert colour["count"] == 40
    assert colour["accuracy"] >= 0.6, colour
    losses = [json.loads(line)["loss"] for line in (out / "instruct" / "metrics.jsonl").read_text().splitlines()
              if "loss" in line]
    assert losses[-1] < 0.5 * losses[0]
    for name in ("model/model.safetensors", "model/tokenizer.json", "model/preprocessor.json", "eval.md",
                 "eval.json", "answers.jsonl", "run_config.json"):
        assert (out / name).is_file(), name


def test_a_finished_run_resumes_without_training_again(vlm_run, monkeypatch):
    out, run = vlm_run
    # Nor its tokenizer: trained again in a new process, it could number tokens differently.
    monkeypatch.setattr(instruct.LMTokenizer, "train", lambda *a, **k: pytest.fail("tokenizer trained again"))
    again = train_vlm(vlm_preset("tiny").override(LEARNABLE), out, progress=False, hooks=VlmHooks())
    assert again.status == "done"
    assert again.results["vqa"]["accuracy"] == run.results["vqa"]["accuracy"]


def test_cached_frozen_tower_tokens_train_exactly_like_pixels(tmp_path, monkeypatch):
    short = {**LEARNABLE, "data.train_size": 100, "instruct.train.steps": 6, "instruct.train.log_every": 1}
    cached = train_vlm(vlm_preset("tiny").override(short), tmp_path / "cached", progress=False)
    monkeypatch.setattr(instruct, "_frozen_vision_tokens", lambda *args: None)
    plain = train_vlm(vlm_preset("tiny").override(short), tmp_path / "plain", progress=False)
    assert cached.status == plain.status == "done"
    losses = [[json.loads(line)["loss"] for line in (d / "instruct" / "metrics.jsonl").read_text().splitlines()
               if "loss" in line] for d in (tmp_path / "cached", tmp_path / "plain")]
    assert len(losses[0]) == 6
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


def test_task_repeats_oversample_a_kind_and_must_name_one_the_data_has(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="vlmkit")
    short = {**LEARNABLE, "data.train_size": 40, "instruct.tasks": None, "instruct.train.steps": 1}
    runs = {}
    for name, repeats in (("once", {}), ("twice", {"colour": 2})):
        train_vlm(vlm_preset("tiny").override({**short, "instruct.task_repeats": repeats}), tmp_path / name,
                  progress=False)
        runs[name] = int(caplog.text.split("phase instruct: ")[-1].split()[0])
    assert runs["twice"] == runs["once"] + 40      # one colour question per scene, now twice
    with pytest.raises(DataError, match=r"task_repeats names kinds \['grounding'\]"):
        train_vlm(vlm_preset("tiny").override({**short, "instruct.task_repeats": {"grounding": 3}}),
                  tmp_path / "absent", progress=False)


def test_align_then_instruct_with_lora_and_a_stage1_tower(tiny_run, tmp_path):
    cfg = vlm_preset("tiny").override({
        "vision_init": str(tiny_run.model_dir), "data.train_size": 40, "data.eval_size": 4,
        "align.language_model": "frozen", "align.vision": "frozen", "align.train.steps": 3,
        "instruct.language_model": "lora", "instruct.lora_rank": 4, "instruct.train.steps": 3,
    })
    run = train_vlm(cfg, tmp_path, progress=False)
    assert run.status == "done"
    saved = json.loads((tmp_path / "model" / "config.json").read_text())
    assert saved["kind"] == "vlm" and saved["model"]["vision"]["width"] == 64
    assert (tmp_path / "align" / "model").is_dir() and (tmp_path / "instruct" / "model").is_dir()


def test_cli_caption_ask_chat_eval(vlm_run, tmp_path, capsys):
    import vlmkit
    from vlmkit.data.sources.shapes import Shapes

    out, _ = vlm_run
    model = str(out / "model")
    image = tmp_path / "scene.png"
    Shapes("heldout", size=1, image_size=48, max_objects=1)[0].image.save(image)
    assert main(["ask", str(image), "What colour is the circle?", "--model", model, "--max-tokens", "4",
                 "--heatmap", str(tmp_path / "heat.png")]) == 0
    assert (tmp_path / "heat.png").is_file()
    assert main(["caption", str(image), "--model", model, "--max-tokens", "6"]) == 0
    capsys.readouterr()
    other = tmp_path / "other.png"
    Shapes("heldout", size=2, image_size=48, max_objects=2)[1].image.save(other)
    question = "Is the circle in <image> the same colour as in <image>?"
    assert main(["ask", str(image), str(other), question, "--model", model, "--max-tokens", "4"]) == 0
    answer = vlmkit.load(model, device="cpu").ask([image, other], question, max_new_tokens=4)
    assert capsys.readouterr().out.strip() == answer.strip()
    assert main(["eval", "vqa", "--model", model, "--size", "5", "--out", str(tmp_path / "ev")]) == 0
    assert json.loads((tmp_path / "ev" / "vqa.json").read_text())["vqa"]["count"] > 0
    capsys.readouterr()


def test_cli_errors_are_one_line(vlm_run, tiny_run, tmp_path, capsys):
    out, _ = vlm_run
    assert main(["ask", str(tmp_path / "missing.png"), "hi", "--model", str(out / "model")]) == 2
    assert "missing.png" in capsys.readouterr().err
    assert main(["ask", str(tmp_path / "missing.png"), "hi", "--model", str(tiny_run.model_dir)]) == 2
    assert "needs a Stage 2 (vlm) checkpoint" in capsys.readouterr().err
    assert main(["train", "vlm", "--preset", "tiny", "--out", str(tmp_path / "x"), "--set", "instruct.lr=1"]) == 2
    assert "unknown config key 'instruct.lr'" in capsys.readouterr().err


def test_chat_reads_commands_and_keeps_going_after_a_bad_image(vlm_run, tmp_path, capsys, monkeypatch):
    import io

    from vlmkit.data.sources.shapes import Shapes

    out, _ = vlm_run
    image = tmp_path / "scene.png"
    Shapes("test", size=1, image_size=48, max_objects=1)[0].image.save(image)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG not really")
    script = f"/image {tmp_path / 'bad.png'}\n/image {image}\nWhat colour is the circle?\n/reset\n/quit\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(script))
    assert main(["chat", "--model", str(out / "model"), "--max-tokens", "4"]) == 0
    printed = capsys.readouterr().out
    assert "could not attach" in printed and "bad.png" in printed
    assert "image attached" in printed and "assistant>" in printed and "conversation cleared" in printed


def test_llava_json_data_trains(tmp_path):
    from vlmkit.data.sources.shapes import Shapes

    shapes = Shapes("train", size=12, image_size=48, max_objects=1)
    records = []
    for i in range(12):
        ex = shapes[i]
        ex.image.save(tmp_path / f"{i}.png")
        records.append({"id": str(i), "image": f"{i}.png",
                        "conversations": [{"from": "human", "value": "<image>\nDescribe the image."},
                                          {"from": "gpt", "value": ex.caption}]})
    for i in range(0, 8, 2):  # several images per conversation, placed by their markers
        records.append({"id": f"pair{i}", "image": [f"{i}.png", f"{i + 1}.png"],
                        "conversations": [{"from": "human",
                                           "value": "First <image>, then <image>. Describe the second."},
                                          {"from": "gpt", "value": shapes[i + 1].caption}]})
    records.append({"id": "broken", "image": "broken.png",
                    "conversations": [{"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "x"}]})
    (tmp_path / "broken.png").write_bytes(b"not a png")
    (tmp_path / "data.json").write_text(json.dumps(records))
    cfg = vlm_preset("tiny").override({"data.source": str(tmp_path / "data.json"),
                                       "data.eval_source": str(tmp_path / "data.json"), "data.max_bad_fraction": 0.2,
                                       "align.skip": True, "instruct.train.steps": 2})
    run = train_vlm(cfg, tmp_path / "run", progress=False, hooks=VlmHooks())
    assert run.status == "done"
    assert run.results["vqa"]["count"] == 16        # the conversation with the unreadable image was dropped

    (tmp_path / "bad.json").write_text(json.dumps([{"id": "q", "conversations": [{"from": "robot", "value": "hi"}]}]))
    with pytest.raises(ValueError, match=r"bad.json.*record 0.*'q'"):
        train_vlm(cfg.override({"data.source": str(tmp_path / "bad.json")}), tmp_path / "run2", progress=False)


def test_without_the_metrics_extra_the_model_is_saved_and_captions_are_reported_skipped(tmp_path, monkeypatch):
    """`pip install vlmkit` alone: BLEU/CIDEr cannot run; nothing else may be lost."""
    for name in ["pycocoevalcap"] + [m for m in sys.modules if m.startswith("pycocoevalcap.")]:
        monkeypatch.setitem(sys.modules, name, None)   # as if never installed, even if imported before
    cfg = vlm_preset("tiny").override({"data.train_size": 40, "data.eval_size": 6, "align.train.steps": 1,
                                       "instruct.train.steps": 1})
    run = train_vlm(cfg, tmp_path, progress=False, hooks=VlmHooks())
    assert (tmp_path / "model" / "model.safetensors").is_file()
    assert "pip install 'vlmkit[metrics]'" in run.results["caption"]["skipped"]
    assert "vqa" in run.results and "skipped" in (tmp_path / "eval.md").read_text()


def test_image_splitting_trains_and_answers(tmp_path, monkeypatch):
    """data.split_longest_edge: a 48 px tower reads 96 px images as 2x2 tiles and a global view,
    marked with Idefics3's row/column tokens; training, evaluation and the assistant agree."""
    import vlmkit
    from vlmkit.data.sources.shapes import Shapes
    from vlmkit.inference.assistant import Request

    tiled = {**LEARNABLE, "data.split_longest_edge": 96, "data.max_length": 200, "data.train_size": 200,
             "data.eval_size": 10, "instruct.train.steps": 40, "instruct.train.log_every": 1}
    run = train_vlm(vlm_preset("tiny").override(tiled), tmp_path / "cached", progress=False, hooks=VlmHooks())
    assert run.status == "done" and run.results["vqa"]["count"] == 10
    losses = [json.loads(line)["loss"] for line in (tmp_path / "cached" / "instruct" / "metrics.jsonl").read_text()
              .splitlines() if "loss" in line]
    assert losses[-1] < 0.7 * losses[0]

    model = vlmkit.load(run.model_dir, device="cpu")
    assert model.model.cfg.image_prompt == "idefics3" and model.transform.tile_longest_edge == 96
    image = Shapes("heldout", size=1, image_size=48, max_objects=1)[0].image
    ids, pixels = model.prepare(Request([{"role": "user", "content": "<image>\nWhat colour is the shape?"}],
                                         [image]))
    K = model.model.cfg.image_tokens
    assert len(pixels) == 5 and ids.count(model.tokenizer.image_id) == 5 * K
    assert model.tokenizer.token_id("<row_2_col_2>") in ids
    assert model.ask(image, "What colour is the shape?", max_new_tokens=4).strip()

    # The frozen tower's cached tokens index views, not images: the same losses as from pixels.
    short = {**tiled, "data.train_size": 60, "instruct.train.steps": 4}
    train_vlm(vlm_preset("tiny").override(short), tmp_path / "a", progress=False)
    monkeypatch.setattr(instruct, "_frozen_vision_tokens", lambda *args: None)
    train_vlm(vlm_preset("tiny").override(short), tmp_path / "b", progress=False)
    a, b = ([json.loads(line)["loss"] for line in (tmp_path / d / "instruct" / "metrics.jsonl").read_text()
             .splitlines() if "loss" in line] for d in ("a", "b"))
    assert len(a) == 4 and a == pytest.approx(b, rel=1e-4)


def test_image_splitting_with_a_pretrained_lm_adds_its_markers(tmp_path):
    """The LM's vocabulary grows by the tile markers; its own embeddings stay as they were."""
    from vlmkit.checkpoint import load_model, save_checkpoint
    from vlmkit.config import DecoderConfig
    from vlmkit.data.lm_tokenizer import LMTokenizer
    from vlmkit.models.decoder import DecoderLM

    tokenizer = LMTokenizer.train(["What colour is the shape? red blue green"] * 5, vocab_size=300, min_frequency=1)
    torch.manual_seed(0)
    lm = DecoderLM(DecoderConfig(vocab_size=tokenizer.vocab_size - 1, width=32, depth=1, heads=4, kv_heads=2,
                                 mlp_dim=64, max_positions=256, tie_embeddings=False))  # <image> lies past it
    save_checkpoint(tmp_path / "lm", lm, "decoder", lm.cfg.to_dict(), tokenizer)
    short = {**LEARNABLE, "data.split_longest_edge": 96, "data.max_length": 200, "data.train_size": 40,
             "data.eval_size": 5, "instruct.train.steps": 2, "lm_init": str(tmp_path / "lm")}
    run = train_vlm(vlm_preset("tiny").override(short), tmp_path / "run", progress=False)
    assert run.status == "done"
    trained = load_model(run.model_dir).language_model
    grown = LMTokenizer.from_pretrained(run.model_dir)
    assert trained.cfg.vocab_size == grown.vocab_size == tokenizer.vocab_size + 38   # 2 markers + 6 x 6 row/col
    assert grown.token_id("<row_6_col_6>") < trained.cfg.vocab_size


def test_grow_vocabulary_keeps_old_rows_and_ties():
    from vlmkit.config import DecoderConfig
    from vlmkit.models.decoder import DecoderLM

    for tie in (True, False):
        cfg = DecoderConfig(vocab_size=10, width=8, depth=1, heads=2, kv_heads=1, mlp_dim=16, tie_embeddings=tie)
        state = DecoderLM(cfg).state_dict()
        grown_cfg, grown = instruct.grow_vocabulary(cfg, state, 13)
        model = DecoderLM(grown_cfg)
        model.load_state_dict(grown)
        assert torch.equal(model.embed.weight[:10], state["embed.weight"])
        assert torch.allclose(model.embed.weight[10:], state["embed.weight"].mean(0).expand(3, -1))
        assert (model.lm_head.weight is model.embed.weight) == tie


def test_text_replay_mixes_in_the_lms_own_answers(tmp_path, monkeypatch):
    """data.text_replay: plain-text conversations answered by the LM before training join the data.

    The generator is replaced by fixed answers (the tiny random LM only writes newlines): what is
    tested is how the recipe keeps, cuts and mixes them in.
    """
    from vlmkit.data.text_replay import replay_prompts
    from vlmkit.inference.engine import Engine

    seen = {}

    def fixed(self, prompts, pixels, params, *args, **kwargs):
        tokenizer = seen["tokenizer"]
        texts = ["Cats purr. They sle", "Trains run on rails!", "\n\n", "no sentence end"]
        outs = [tokenizer.encode(texts[i % 4]) for i in range(len(prompts))]
        return [o + [tokenizer.eos_id] if i % 4 == 1 else o for i, o in enumerate(outs)]

    real = instruct._with_text_replay

    def spy(model, tokenizer, data, cfg, **kwargs):
        seen["tokenizer"] = tokenizer
        mixed = real(model, tokenizer, data, cfg, **kwargs)
        seen["added"] = mixed.conversations[len(data.conversations):]
        return mixed

    monkeypatch.setattr(Engine, "generate", fixed)
    monkeypatch.setattr(instruct, "_with_text_replay", spy)
    short = {**LEARNABLE, "data.train_size": 40, "data.eval_size": 5, "instruct.train.steps": 3,
             "instruct.tasks": None, "data.text_replay": 12, "data.max_length": 128,
             "instruct.task_repeats": {"text": 2}}
    run = train_vlm(vlm_preset("tiny").override(short), tmp_path / "run", progress=False)
    assert run.status == "done"
    added = seen["added"]
    assert [c.messages[0].content for c in added] == [p for i, p in enumerate(replay_prompts(12)) if i % 4 != 2]
    assert [c.messages[1].content for c in added][:3] == ["Cats purr.", "Trains run on rails!", "no sentence end"]
    assert all(c.meta["kind"] == "text" and not c.images for c in added)
    saved = [json.loads(line) for line in (tmp_path / "run" / "text_replay.jsonl").read_text().splitlines()]
    assert [r["answer"] for r in saved] == [c.messages[1].content for c in added]
    with pytest.raises(ValueError, match="at most 400 distinct prompts"):
        replay_prompts(401)


def test_a_tower_read_at_an_inner_layer_trains_only_what_that_layer_uses():
    """The projector reads block -2's raw output: the last block and the final norm never run,
    so nothing of theirs may be marked trainable (DDP stops on parameters without gradient)."""
    from vlmkit.config import PhaseConfig, VLMConfig
    from vlmkit.models.vlm import VisionLanguageModel

    tiny = vlm_preset("tiny").model.to_dict()
    model = VisionLanguageModel(VLMConfig.from_dict({**tiny, "vision": {**tiny["vision"], "depth": 3},
                                                     "vision_layer": -2, "image_token_id": 5}))
    instruct.set_trainable(model, PhaseConfig(vision="full"))
    model.vision_tokens(torch.randn(2, 3, 48, 48)).sum().backward()
    tower = dict(model.vision_tower.named_parameters())
    trainable = {name for name, p in tower.items() if p.requires_grad}
    assert trainable == {name for name, p in tower.items() if p.grad is not None}
    assert not any(name.startswith(("norm.", "blocks.2.")) for name in trainable)
    assert any(name.startswith("blocks.1.") for name in trainable)


def test_micro_batches_weigh_every_answer_token_as_one_batch_does(tmp_path):
    """Answers differ in length, so a mean of per-micro-batch means is not the batch's mean:
    8 conversations in one batch or in two micro-batches of 4 must train the same weights."""
    from safetensors.torch import load_file

    short = {"data.train_size": 48, "data.eval_size": 4, "align.skip": True, "instruct.tasks": None,
             "instruct.train.steps": 3, "instruct.train.log_every": 1}
    runs = {}
    for name, batch, accum in (("whole", 8, 1), ("split", 4, 2)):
        cfg = vlm_preset("tiny").override({**short, "instruct.train.batch_size": batch,
                                           "instruct.train.grad_accum": accum})
        train_vlm(cfg, tmp_path / name, progress=False)
        runs[name] = load_file(tmp_path / name / "model" / "model.safetensors")
    for key, value in runs["whole"].items():
        torch.testing.assert_close(runs["split"][key], value, rtol=1e-5, atol=1e-5, msg=key)

"""Every named preset, Stage 1 and Stage 2, as `vlmkit presets` lists them.

Each config validates and survives the JSON round trip `--config` reads; what it names
exists (data source and its options, question kinds, the Stage 1 tower a Stage 2 preset
starts from); and its model builds as training builds it. Small models run a forward pass
on the CPU; large ones (the CLIP and SigLIP shapes, LiT's MiniLM tower, llava-smol's
SmolLM2) are built on the meta device: shapes only, no memory. Nothing is downloaded and no
pretrained weights are read (test_bert.py and test_gguf.py check those).
"""
import inspect

import pytest
import torch

from vlmkit.cli import main
from vlmkit.config import ClipRunConfig, VLMConfig, VlmRunConfig
from vlmkit.data.sources import SOURCES
from vlmkit.data.sources.base import Source
from vlmkit.data.sources.shapes_vqa import KINDS
from vlmkit.models.dual_encoder import DualEncoder
from vlmkit.models.vlm import VisionLanguageModel
from vlmkit.presets import PRESETS, VLM_PRESETS, preset, vlm_preset

SMALL = 20_000_000   # parameters: a model this size or smaller is built for real and run
# Question kinds per Stage 2 source (easy_vqa: see easy_vqa.question_kind).
QUESTION_KINDS = {"shapes": set(KINDS), "easy_vqa": {"yes/no", "colour", "shape"}}
# Stage 2 presets whose `vision_init` is a checkpoint of this Stage 1 preset (their docstrings say which).
STAGE1_TOWER = {"shapes": "shapes", "easy-vqa": "easy-vqa", "llava-smol": "easy-vqa"}


def build(cls, cfg):
    """(model, runs): built on the CPU if it is small (runs=True), else on the meta device."""
    with torch.device("meta"):
        shape_only = cls(cfg)
    if sum(p.numel() for p in shape_only.parameters()) > SMALL:
        return shape_only, False
    torch.manual_seed(0)
    return cls(cfg).eval(), True


def test_the_cli_lists_exactly_the_registered_presets(capsys):
    assert main(["presets"]) == 0
    listed: dict[str, list[str]] = {}   # heading -> the names under it
    for line in capsys.readouterr().out.splitlines():
        if not line.startswith(" "):
            listed[line] = []
            continue
        name, *description = line.split()
        assert description, f"preset {name!r} has no description"
        list(listed.values())[-1].append(name)
    assert listed == {"train clip --preset:": list(PRESETS), "train vlm --preset:": list(VLM_PRESETS)}


@pytest.mark.parametrize("name", list(PRESETS))
def test_stage1_preset(name):
    cfg = preset(name)
    assert ClipRunConfig.from_dict(cfg.to_dict()) == cfg
    data, vision = cfg.data, cfg.model.vision
    assert data.source in SOURCES
    assert set(data.source_options) <= set(inspect.signature(SOURCES[data.source]).parameters)
    # A generated world is drawn at the tower's resolution (shapes: one 16 px patch per grid cell).
    assert data.source_options.get("image_size", vision.image_size) == vision.image_size
    if cfg.train.hard_negatives:
        assert SOURCES[data.source].hard_negative_caption is not Source.hard_negative_caption

    model, runs = build(DualEncoder, cfg.model)
    tokens = vision.grid ** 2 + int(vision.class_token)
    assert model.vision.pos_embed.shape == (1, tokens, vision.width)
    if runs:
        ids = torch.randint(1, cfg.model.text.vocab_size, (2, min(9, cfg.model.text.max_length)))
        with torch.no_grad():
            image, text, scale, bias = model(torch.randn(2, 3, vision.image_size, vision.image_size), ids,
                                             torch.ones_like(ids))
        assert image.shape == text.shape == (2, cfg.model.embed_dim)
        assert (bias is None) == (cfg.model.loss == "infonce")


@pytest.mark.parametrize("name", list(VLM_PRESETS))
def test_stage2_preset(name):
    cfg = vlm_preset(name)
    assert VlmRunConfig.from_dict(cfg.to_dict()) == cfg
    kinds = QUESTION_KINDS[cfg.data.source] | ({"text"} if cfg.data.text_replay else set())
    for phase in (cfg.align, cfg.instruct):
        assert set(phase.tasks or ()) | set(phase.task_repeats) <= kinds
    if name in STAGE1_TOWER:   # training swaps in the checkpoint's tower: the preset must fit it
        tower = preset(STAGE1_TOWER[name]).model.vision
        assert cfg.model.vision == tower
        VLMConfig.from_dict({**cfg.model.to_dict(), "vision": tower.to_dict()})
    # An image and a question fit the context with room for the answer.
    K = cfg.model.image_tokens
    assert K + 32 <= min(cfg.data.max_length, cfg.model.decoder.max_positions)

    # As train_vlm builds it: a from-scratch LM takes its trained tokenizer's vocabulary size.
    decoder = cfg.model.decoder if cfg.lm_init else cfg.model.decoder.replace(vocab_size=cfg.tokenizer_vocab)
    image_id = decoder.vocab_size - 1
    model, runs = build(VisionLanguageModel, cfg.model.replace(decoder=decoder.to_dict(), image_token_id=image_id))
    assert model.language_model.embed.weight.shape == (decoder.vocab_size, decoder.width)
    if runs:
        ids = torch.tensor([[1, 2] + [image_id] * K + [3, 4, 5]])
        size = cfg.model.vision.image_size
        with torch.no_grad():
            logits = model(ids, pixels=torch.randn(1, 3, size, size))
        assert logits.shape == (1, K + 5, decoder.vocab_size)

import json

import pytest
import torch

from vlmkit.config import ClipRunConfig, ConfigError, DualEncoderConfig, VisionConfig
from vlmkit.models.dual_encoder import DualEncoder
from vlmkit.presets import preset, vlm_preset


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match="unknown key 'widht'.*known keys"):
        VisionConfig.from_dict({"widht": 64})


def test_nested_unknown_key_names_the_path():
    with pytest.raises(ConfigError, match=r"model\.vision: unknown key 'pach_size'"):
        ClipRunConfig.from_dict({"model": {"vision": {"pach_size": 8}}})


@pytest.mark.parametrize("data, message", [
    ({"patch_size": "8"}, "expected an integer"),
    ({"width": 65, "heads": 4}, "not divisible by heads"),
    ({"image_size": 30, "patch_size": 8}, "not a multiple of patch_size"),
    ({"act": "relu"}, "not one of"),
    ({"class_token": 1}, "expected true or false"),
])
def test_bad_values_are_named(data, message):
    with pytest.raises(ConfigError, match=message):
        VisionConfig.from_dict(data)


def test_cls_pool_needs_class_token():
    with pytest.raises(ConfigError, match="class_token"):
        DualEncoderConfig.from_dict({"vision": {"class_token": False}, "vision_pool": "cls"})


def test_json_round_trip(tmp_path):
    cfg = preset("shapes")
    cfg.save(tmp_path / "run.json")
    assert ClipRunConfig.load(tmp_path / "run.json") == cfg
    assert json.loads((tmp_path / "run.json").read_text())["model"]["vision"]["patch_size"] == cfg.model.vision.patch_size


def test_malformed_json_file(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ClipRunConfig.load(tmp_path / "bad.json")


def test_dotted_overrides_are_checked():
    cfg = preset("tiny").override({"train.steps": 7, "model.vision.depth": 1})
    assert cfg.train.steps == 7 and cfg.model.vision.depth == 1
    with pytest.raises(ConfigError, match="unknown config key 'train.stepz'"):
        preset("tiny").override({"train.stepz": 7})
    with pytest.raises(ConfigError, match="must be positive"):
        preset("tiny").override({"train.steps": 0})
    with pytest.raises(ConfigError, match="task_repeats must map question kinds to whole numbers"):
        vlm_preset("tiny").override({"instruct.task_repeats": {"grounding": 0.5}})


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ConfigError, match="available: tiny"):
        preset("nope")


def test_clip_vit_b32_has_clips_image_tower_size():
    with torch.device("meta"):
        model = DualEncoder(preset("clip-vit-b32").model)
    n = sum(p.numel() for p in model.vision.parameters()) + model.vision_proj.weight.numel()
    assert abs(n - 87_849_216) / 87_849_216 < 0.001  # OpenAI ViT-B/32 visual: 87.85M parameters

"""Shared fixtures: one tiny Stage 1 run per test session, reused by the API and CLI tests."""
from __future__ import annotations

import pytest
import torch

from vlmkit.presets import preset
from vlmkit.training.contrastive import train_clip

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_run")
    run = train_clip(preset("tiny"), out)
    assert run.status == "done"
    return run


@pytest.fixture(scope="session")
def tiny_vlm_dir(tmp_path_factory):
    """A tiny random Stage 2 checkpoint that never ends its answers early (for serving tests)."""
    from vlmkit.serving.local import stand_in_model

    return stand_in_model(tmp_path_factory.mktemp("tiny_vlm") / "model")

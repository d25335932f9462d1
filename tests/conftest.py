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
    """A tiny random Stage 2 checkpoint that never ends its answers early (for serving tests).

    Its end-of-turn logit is pinned at 0 (the row of the LM head is zero) while the other
    random logits' maximum is positive, so greedy answers always run to max_tokens.
    """
    from vlmkit.checkpoint import save_checkpoint
    from vlmkit.config import VLMConfig
    from vlmkit.data.images import ImageTransform
    from vlmkit.data.lm_tokenizer import LMTokenizer
    from vlmkit.models.vlm import VisionLanguageModel

    corpus = ["What colour is the circle?", "red", "blue", "a small red circle at the top left.",
              "Is there a green square?", "yes", "no", "Describe the image."] * 5
    tokenizer = LMTokenizer.train(corpus, vocab_size=300, min_frequency=1)
    torch.manual_seed(0)
    cfg = VLMConfig.from_dict({
        "vision": {"image_size": 32, "patch_size": 8, "width": 32, "depth": 2, "heads": 4, "mlp_dim": 64},
        "decoder": {"vocab_size": tokenizer.vocab_size, "width": 48, "depth": 2, "heads": 6, "kv_heads": 2,
                    "mlp_dim": 96, "max_positions": 160, "tie_embeddings": False, "init_std": 0.2},
        "image_token_id": tokenizer.image_id,
    })
    model = VisionLanguageModel(cfg).eval()
    with torch.no_grad():
        model.language_model.lm_head.weight[tokenizer.eos_id] = 0
    out = tmp_path_factory.mktemp("tiny_vlm") / "model"
    save_checkpoint(out, model, "vlm", cfg.to_dict(), tokenizer, ImageTransform(size=32).to_dict())
    return out

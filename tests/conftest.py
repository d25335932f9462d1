"""Shared fixtures: one tiny Stage 1 run per test session, reused by the API and CLI tests.
Under CI, a skipped test fails unless its reason is on CI_ALLOWED_SKIPS (at the end)."""
from __future__ import annotations

import os

import pytest
import torch

from vlmkit.presets import preset
from vlmkit.training.contrastive import train_clip

torch.set_num_threads(2)
# "auto" precision means fp32 in tests, so exact comparisons hold on CPUs with native bf16
# too; the tests of bf16 and int8 ask for them by name. Subprocesses inherit it.
os.environ["VLMKIT_PRECISION"] = "fp32"

pytest_plugins = ["pytester"]   # test_skip_policy.py runs pytest on a copy of this file


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    from vlmkit.evaluation.hooks import ClipHooks

    out = tmp_path_factory.mktemp("tiny_run")
    run = train_clip(preset("tiny"), out, hooks=ClipHooks())   # the final evaluation and pictures
    assert run.status == "done"
    return run


STAND_IN_CORPUS = ["What colour is the circle?", "Describe the image.", "Is there a green square?",
                   "How many shapes are there?", "red", "blue", "green", "yes", "no", "circle", "square",
                   "a small red circle at the top left."] * 5


@pytest.fixture(scope="session")
def tiny_vlm_dir(tmp_path_factory):
    """A tiny random Stage 2 checkpoint whose answers always run to max_tokens (for serving tests).

    Its end-of-turn logit is pinned at 0 (that row of the LM head is zero) while the other
    random logits' maximum is positive, so greedy answers never end early.
    """
    from vlmkit.checkpoint import save_checkpoint
    from vlmkit.config import VLMConfig
    from vlmkit.data.images import ImageTransform
    from vlmkit.data.lm_tokenizer import LMTokenizer
    from vlmkit.models.vlm import VisionLanguageModel

    tokenizer = LMTokenizer.train(STAND_IN_CORPUS, vocab_size=300, min_frequency=1)
    cfg = VLMConfig.from_dict({
        "vision": {"image_size": 32, "patch_size": 8, "width": 32, "depth": 2, "heads": 4, "mlp_dim": 64},
        "decoder": {"vocab_size": tokenizer.vocab_size, "width": 48, "depth": 2, "heads": 6, "kv_heads": 2,
                    "mlp_dim": 96, "max_positions": 160, "tie_embeddings": False, "init_std": 0.2},
        "image_token_id": tokenizer.image_id,
    })
    with torch.random.fork_rng():   # the same weights every session, and other tests' RNG untouched
        torch.manual_seed(0)
        model = VisionLanguageModel(cfg).eval()
    with torch.no_grad():
        model.language_model.lm_head.weight[tokenizer.eos_id] = 0
    out = tmp_path_factory.mktemp("tiny_vlm") / "model"
    save_checkpoint(out, model, "vlm", cfg.to_dict(), tokenizer, ImageTransform(size=32).to_dict())
    return out


# ----------------------------------------------------------------------------- skips under CI
# CI (CI=true) runs on a fresh clone after scripts/setup.sh, which installs everything the
# suite uses; a test that skips there did not run because set-up failed. So under CI a skip
# is a failure unless its reason contains one of these phrases.
CI_ALLOWED_SKIPS = (
    "needs a CUDA GPU",              # CI machines have no GPU: use this phrase in a GPU test's reason
    # Not a dependency: only transformers' optional torchvision image processors need it (the
    # PIL ones, which transformers uses without it, are compared exactly in the same file).
    "torchvision is not installed",
)


def _on_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _fail_unlisted_skip(report) -> None:
    if not (report.skipped and _on_ci()) or hasattr(report, "wasxfail"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    reason = reason.removeprefix("Skipped: ")
    if not any(allowed in reason for allowed in CI_ALLOWED_SKIPS):
        report.outcome = "failed"
        report.longrepr = (f"{report.nodeid} skipped under CI ({reason}); that reason is not on "
                           "the allow-list CI_ALLOWED_SKIPS in tests/conftest.py")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    """A test that skips (marker, fixture or body) under CI becomes an error or a failure."""
    report = yield
    _fail_unlisted_skip(report)
    return report


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_make_collect_report(collector):
    """A module that skips as a whole (`pytest.importorskip` at the top) becomes a collection error."""
    report = yield
    _fail_unlisted_skip(report)
    return report

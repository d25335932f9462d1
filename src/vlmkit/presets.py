"""Named presets: a model shape plus the data and training defaults that go with it."""
from __future__ import annotations

from typing import Callable

from vlmkit.config import ClipRunConfig, ConfigError


def _tiny() -> dict:
    """Seconds on a CPU: for tests."""
    return {
        "model": {
            "vision": {"image_size": 48, "patch_size": 16, "width": 64, "depth": 2, "heads": 4, "mlp_dim": 128},
            "text": {"vocab_size": 400, "width": 64, "depth": 2, "heads": 4, "mlp_dim": 128,
                     "max_positions": 64, "max_length": 32},
            "embed_dim": 64,
            "vision_pool": "cls",
        },
        "data": {"source": "shapes", "train_size": 2000, "eval_size": 200, "source_options": {"image_size": 48}},
        "train": {"steps": 150, "batch_size": 64, "lr": 3e-3, "warmup_steps": 10, "save_every": 75,
                  "log_every": 5},
    }


def _shapes() -> dict:
    """The demo: about 5 minutes on a 2-core CPU to R@1 > 0.9 on the shapes world."""
    return {
        "model": {
            # 48 px images in 16 px patches: one patch per cell of the world's 3x3 grid.
            "vision": {"image_size": 48, "patch_size": 16, "width": 128, "depth": 4, "heads": 4, "mlp_dim": 512},
            "text": {"vocab_size": 400, "width": 128, "depth": 2, "heads": 4, "mlp_dim": 512,
                     "max_positions": 64, "max_length": 40},
            "embed_dim": 128,
            "vision_pool": "cls",
        },
        "data": {"source": "shapes", "train_size": 60000, "eval_size": 1000, "source_options": {"image_size": 48}},
        "train": {"steps": 800, "batch_size": 256, "lr": 2e-3, "warmup_steps": 50, "weight_decay": 0.05,
                  "save_every": 200, "eval_every": 400},
    }


def _fashion_mnist() -> dict:
    """Contrastive training on Fashion-MNIST captions; zero-shot classification by prompts."""
    return {
        "model": {
            "vision": {"image_size": 28, "patch_size": 7, "width": 128, "depth": 4, "heads": 4, "mlp_dim": 512},
            "text": {"vocab_size": 400, "width": 128, "depth": 2, "heads": 4, "mlp_dim": 512,
                     "max_positions": 64, "max_length": 32},
            "embed_dim": 128,
            "vision_pool": "mean",
        },
        "data": {"source": "fashion_mnist", "eval_size": 10000},
        "train": {"steps": 1200, "batch_size": 256, "lr": 2e-3, "warmup_steps": 100, "weight_decay": 0.05,
                  "save_every": 400},
    }


def _fashion_mnist_lit() -> dict:
    """LiT: the real all-MiniLM-L6-v2 text tower, locked; only the image tower learns."""
    cfg = _fashion_mnist()
    cfg["model"]["text"] = {"max_length": 32}
    cfg["train"].update({"text_init": "minilm", "lock_text": True})
    return cfg


def _clip_vit_b32() -> dict:
    """The shape of OpenAI's CLIP ViT-B/32 (image tower exact; text tower BERT-style, same size)."""
    return {
        "model": {
            "vision": {"image_size": 224, "patch_size": 32, "width": 768, "depth": 12, "heads": 12,
                       "mlp_dim": 3072, "norm_pre": True, "patch_bias": False, "act": "quick_gelu",
                       "norm_eps": 1e-5},
            "text": {"vocab_size": 49408, "width": 512, "depth": 12, "heads": 8, "mlp_dim": 2048,
                     "max_positions": 77, "max_length": 77, "act": "quick_gelu", "norm_eps": 1e-5},
            "embed_dim": 512,
            "vision_pool": "cls",
        },
        "data": {"source": "shapes", "resize_mode": "shortest_crop",
                 "mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]},
        "train": {"batch_size": 256, "lr": 5e-4},
    }


def _siglip_b16() -> dict:
    """The shape of SigLIP B/16 at 224 px, with the sigmoid loss."""
    return {
        "model": {
            "vision": {"image_size": 224, "patch_size": 16, "width": 768, "depth": 12, "heads": 12,
                       "mlp_dim": 3072, "class_token": False, "act": "gelu_tanh"},
            "text": {"vocab_size": 32000, "width": 768, "depth": 12, "heads": 12, "mlp_dim": 3072,
                     "max_positions": 64, "max_length": 64, "act": "gelu_tanh", "norm_eps": 1e-6},
            "embed_dim": 768,
            "vision_pool": "mean",
            "loss": "siglip",
            "init_logit_scale": 2.302585,
        },
        "data": {"source": "shapes"},
        "train": {"batch_size": 256, "lr": 5e-4},
    }


PRESETS: dict[str, Callable[[], dict]] = {
    "tiny": _tiny,
    "shapes": _shapes,
    "fashion-mnist": _fashion_mnist,
    "fashion-mnist-lit": _fashion_mnist_lit,
    "clip-vit-b32": _clip_vit_b32,
    "siglip-b16": _siglip_b16,
}


def preset(name: str) -> ClipRunConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
    return ClipRunConfig.from_dict(PRESETS[name](), f"preset {name}")


def describe_presets() -> list[tuple[str, str]]:
    return [(name, (fn.__doc__ or "").strip()) for name, fn in PRESETS.items()]
